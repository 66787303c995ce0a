"""Offloading through the HTTP server: `--kv-transfer-config`, the OpenAI `user` field reaching the
policy, and the connector's `tierkv_offload_*` counters on /metrics."""

from __future__ import annotations

import json
import time

from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import greedy

KV_CONFIG = {"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
             "kv_connector_extra_config": {
                 "block_size": 256, "cpu_bytes_to_use": "64MiB",
                 "policy": {"class": "tests.connector.user_policy:UserAllowList", "users": ["alice"]}}}
# The tiny tokenizer is one token per byte: 600 tokens = 2 full 256-token blocks and a partial one.
ALICE = "".join(chr(ord("a") + (7 * i) % 26) for i in range(600))
BOB = "".join(chr(ord("a") + (11 * i) % 26) for i in range(600))


def offload_samples(client) -> dict[str, tuple[dict, float]]:
    """`tierkv_offload_*` samples of /metrics (no buckets): name -> (labels, value)."""
    out = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            if s.name.startswith("tierkv_offload_") and not s.name.endswith("_bucket"):
                out[s.name + "".join(f"[{v}]" for k, v in sorted(s.labels.items()) if k != "model_name")] = \
                    (s.labels, s.value)
    return out


def test_user_field_reaches_the_policy_and_metrics_count_it(start_tiny_server, tiny_llm):
    server = start_tiny_server("--served-model-name", "tiny-offload", "--kv-transfer-config", json.dumps(KV_CONFIG))
    with server.client() as client:
        for user, prompt in (("alice", ALICE), ("bob", BOB)):
            response = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 5, "temperature": 0,
                                                            "user": user})
            assert response.status_code == 200
            reference = tiny_llm.generate(prompt, greedy(5), use_tqdm=False)[0].outputs[0].text
            assert response.json()["choices"][0]["text"] == reference
        deadline = time.monotonic() + 30
        while (samples := offload_samples(client)).get("tierkv_offload_saved_blocks_total", ({}, 0))[1] < 2:
            assert time.monotonic() < deadline, f"alice's blocks were never saved: {samples}"
            time.sleep(0.05)

    assert all(labels["model_name"] == "tiny-offload" for labels, _ in samples.values())
    values = {name: value for name, (_, value) in samples.items()}
    # Only alice's request is offloaded: one Lookup (a miss), her 600 prompt tokens computed, and the
    # 2 blocks her prompt and decode filled saved. Bob's request never touches the store.
    assert values["tierkv_offload_lookups_total"] == 1
    assert values["tierkv_offload_recomputed_tokens_total"] == 600
    assert values["tierkv_offload_saved_blocks_total"] == 2
    assert values["tierkv_offload_save_seconds_count"] >= 1
    assert "tierkv_offload_loaded_tokens_total" not in values
    assert "tierkv_offload_dropped_saves_total" not in values
    assert not any(name.startswith("tierkv_offload_store_errors") for name in values)
