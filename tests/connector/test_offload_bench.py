"""`tierkv bench offload` with tiny shapes on CPU: every tier at two prompt lengths, twice; every row's
hit loads what its cold run saved, at a positive rate beside a positive copy ceiling."""

from __future__ import annotations

import argparse
import json

import pytest

from engine.bench import offload


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tierkv bench offload")
    offload.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_bench_offload_every_tier_and_length(tmp_path, capsys):
    out = tmp_path / "offload.json"
    args = _args("--arch", "tiny-llama", "--prompt-lens", "600,1100", "--repeats", "2", "--start-redis",
                 "--start-moto", "--decode-requests", "3", "--decode-tokens", "40", "--json", str(out))
    assert offload.run(args) == 0

    table = capsys.readouterr().out
    assert "offload: tiny-llama (random weights), float32 on cpu, 256-token blocks, medians of 2 repeats" in table
    assert "on/off mean" in table and "load in flight (1025-token prompt from memory" in table
    report = json.loads(out.read_text())
    assert [(row["tier"], row["prompt_tokens"]) for row in report["ttft"]] == [
        (tier, n) for n in (600, 1100) for tier in ("memory", "redis", "obj")]
    for row in report["ttft"]:
        # The prompt's whole blocks below its last token, found in that tier alone and loaded.
        whole = (row["prompt_tokens"] - 1) // 256 * 256
        assert row["hit_tokens"] == row["loaded_tokens"] == whole and row["dropped_saves"] == 0
        assert len(row["runs"]) == 2
        for run in row["runs"]:
            assert run["saved_bytes"] >= run["loaded_bytes"] > 0
            assert run["cold_ttft_s"] > 0 and run["hit_ttft_s"] > 0
            for rate in ("load_gb_per_s", "h2d_copy_gb_per_s", "save_gb_per_s", "d2h_copy_gb_per_s",
                         "load_of_copy", "save_of_copy"):
                assert run[rate] > 0, (row["tier"], row["prompt_tokens"], rate)
            # Redis and S3 rows beside their bare clients reading the same bytes; memory has none.
            has_raw = row["tier"] != "memory"
            assert (run["raw_gb_per_s"] is not None and run["raw_gb_per_s"] > 0) == has_raw
            assert (run["load_of_raw"] is not None and run["load_of_raw"] > 0) == has_raw
        for name, band in row["bands"].items():
            assert band is None or band[0] <= band[1] <= band[2], name
    off, on = report["decode"]
    assert (off["saving"], on["saving"]) == ("off", "on")
    # 2 x 3 decodes of 40 tokens: 39 gaps each; prompts of 224, 232, 240 tokens all cross 256 while decoding.
    assert off["itl_samples"] == on["itl_samples"] == 2 * 3 * 39
    assert off["saved_blocks"] == 0 and on["saved_blocks"] == 2 * 3
    assert report["decode_on_over_off"]["itl_mean"] > 0
    flight = report["load_in_flight"]
    assert flight["loaded_tokens"] == 2 * 4 * 256 and flight["gaps_during"] > 0 and flight["p99_ratio"] > 0
    # Each window's steps, and in each the step that returned the loaded request's token.
    assert len(flight["windows"]) == 2 and sum(len(w) for w in flight["windows"]) == flight["window_steps"]
    assert all(sum(step["loaded_token"] for step in w) <= 1 for w in flight["windows"])


def test_bench_offload_refuses_a_prompt_past_the_model(capsys):
    # Llama-3-8B has 8192 positions: an 8192-token prompt leaves no room for its token (no engine starts).
    with pytest.raises(SystemExit, match="the longest prompt is 8191"):
        offload.run(_args("--arch", "llama-3-8b", "--prompt-len", "4096,8192", "--device", "cpu"))


def test_bench_offload_peer_engine_loads_what_this_engine_saved(tmp_path, capsys):
    out = tmp_path / "offload.json"
    args = _args("--arch", "tiny-llama", "--prompt-lens", "600", "--repeats", "2", "--start-kvstore", "--peer-engine",
                 "--cpu-bytes", "64MiB", "--no-load-in-flight", "--decode-requests", "2", "--decode-tokens", "4",
                 "--json", str(out))
    assert offload.run(args) == 0
    assert "memory (peer)" in capsys.readouterr().out
    own, peer = json.loads(out.read_text())["ttft"]
    assert (own["tier"], peer["tier"]) == ("memory", "memory (peer)")
    # The second engine found both whole blocks of each prompt in the daemon's slab and loaded them.
    assert [(run["hit_tokens"], run["loaded_tokens"]) for run in peer["runs"]] == [(512, 512)] * 2
    for run in peer["runs"]:
        assert run["saved_bytes"] == run["loaded_bytes"] > 0 and run["load_gb_per_s"] > 0
        assert run["cold_ttft_s"] > 0 and run["hit_ttft_s"] > 0


def test_bench_offload_peer_engine_needs_a_daemon():
    with pytest.raises(SystemExit, match="--peer-engine shares a daemon's slab"):
        offload.run(_args("--arch", "tiny-llama", "--prompt-lens", "600", "--peer-engine", "--device", "cpu"))
