"""`tierkv bench throughput` on a tiny random-weight Llama on CPU, HF baseline and roofline on."""

from __future__ import annotations

import json

import pytest

from engine.bench.roofline import Hardware, ModelCost, step_seconds
from engine.cli import main

NUM_PROMPTS, INPUT_LEN, OUTPUT_LEN, HF_BATCH = 5, 12, 4, 2

# tiny-llama: 2 layers of (q 64x64, k and v 64x32, o 64x64, gate/up/down 64x128, 2 norms of 64),
# a final norm, an untied 512x64 lm_head; float32. The input embedding is not read in full.
LAYER_PARAMS = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64) + 64
LM_HEAD_PARAMS = 512 * 64
KV_BYTES_PER_TOKEN = 2 * 2 * 2 * 16 * 4  # layers, K and V, kv heads, head dim, float32


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "throughput.json"
    rc = main(["bench", "throughput", "--arch", "tiny-llama", "--device", "cpu",
               "--num-prompts", str(NUM_PROMPTS), "--input-len", str(INPUT_LEN), "--output-len", str(OUTPUT_LEN),
               "--hf-batch-size", str(HF_BATCH), "--max-num-seqs", "4", "--warmup-prompts", "2",
               "--bandwidth-bytes", str(1 << 22), "--matmul-size", "128", "--json", str(path)])
    assert rc == 0
    return json.loads(path.read_text())


@pytest.mark.slow
def test_token_counts_are_exact(report):
    engine = report["engine"]
    assert engine["requests"] == NUM_PROMPTS
    assert engine["output_tokens"] == NUM_PROMPTS * OUTPUT_LEN
    assert engine["prompt_tokens"] == NUM_PROMPTS * INPUT_LEN
    assert report["hf"]["output_tokens"] == HF_BATCH * OUTPUT_LEN
    # Every prompt token and every output token but the last goes through the model once.
    records = report["roofline"]["step_records"]
    assert sum(r[0] for r in records) == NUM_PROMPTS * (INPUT_LEN + OUTPUT_LEN - 1)
    assert len(records) == engine["steps"] == report["roofline"]["steps"]


@pytest.mark.slow
def test_model_cost_counts_the_loaded_weights(report):
    assert report["model_cost"] == {"weight_bytes": 4 * (LAYER_PARAMS + LM_HEAD_PARAMS),
                                    "layer_params": LAYER_PARAMS, "lm_head_params": LM_HEAD_PARAMS,
                                    "kv_bytes_per_token": KV_BYTES_PER_TOKEN}


@pytest.mark.slow
def test_rates_and_ratios_come_from_the_reported_numbers(report):
    engine, hf, roof = report["engine"], report["hf"], report["roofline"]
    assert engine["output_tok_s"] == pytest.approx(engine["output_tokens"] / engine["elapsed_s"], rel=1e-12)
    assert engine["requests_per_s"] == pytest.approx(NUM_PROMPTS / engine["elapsed_s"], rel=1e-12)
    assert engine["total_tok_s"] == pytest.approx(
        (engine["prompt_tokens"] + engine["output_tokens"]) / engine["elapsed_s"], rel=1e-12)
    assert hf["output_tok_s"] == pytest.approx(hf["output_tokens"] / hf["elapsed_s"], rel=1e-12)
    assert report["ours_vs_hf"] == pytest.approx(engine["output_tok_s"] / hf["output_tok_s"], rel=1e-12)
    hw = Hardware(**report["hardware"])
    cost = ModelCost(**report["model_cost"])
    assert roof["seconds"] == pytest.approx(sum(step_seconds(cost, hw, *r) for r in roof["step_records"]),
                                            rel=1e-12)
    assert roof["output_tok_s"] == pytest.approx(engine["output_tokens"] / roof["seconds"], rel=1e-12)
    assert roof["fraction"] == pytest.approx(engine["output_tok_s"] / roof["output_tok_s"], rel=1e-12)


def test_step_seconds_is_the_slower_of_bytes_and_flops():
    hw = Hardware("test", bandwidth_bytes_per_s=1000.0, peak_flops=100.0)
    cost = ModelCost(weight_bytes=500, layer_params=10, lm_head_params=5, kv_bytes_per_token=2)
    # Decode of 2 sequences with 100 context tokens: bytes 500 + 102*2 = 704 -> 0.704 s;
    # FLOPs 2*10*2 + 2*5*2 = 60 -> 0.6 s.
    assert step_seconds(cost, hw, num_tokens=2, num_seqs=2, context_tokens=100) == pytest.approx(0.704)
    # Prefill of 50 tokens: bytes 500 + 100*2 = 700 -> 0.7 s; FLOPs 1000 + 10 = 1010 -> 10.1 s.
    assert step_seconds(cost, hw, num_tokens=50, num_seqs=1, context_tokens=50) == pytest.approx(10.1)
