"""`tierkv bench offload` on a tiny model: every tier measured, hits load what the cold run saved."""

from __future__ import annotations

import argparse
import json

from engine.bench import offload


def test_bench_offload_smoke(tiny_model, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="tierkv bench offload")
    offload.add_arguments(parser)
    out = tmp_path / "offload.json"
    args = parser.parse_args(["--model", tiny_model, "--prompt-len", "1100", "--start-redis", "--start-moto",
                              "--decode-requests", "3", "--decode-tokens", "40", "--json", str(out)])
    assert offload.run(args) == 0

    table = capsys.readouterr().out
    assert "time to first token, 1100-token prompt, 256-token blocks" in table
    assert "saving on / off: mean" in table
    report = json.loads(out.read_text())
    assert [row["tier"] for row in report["ttft"]] == ["memory", "redis", "obj"]
    for row in report["ttft"]:
        # The prompt's 4 full blocks, found in that tier alone and loaded (1100 = 4 * 256 + 76).
        assert row["hit_tokens"] == row["loaded_tokens"] == 4 * 256
        assert row["cold_ttft_s"] > 0 and row["hit_ttft_s"] > 0
        assert row["load_gb_per_s"] > 0 and row["copy_gb_per_s"] > 0
    off, on = report["decode"]
    assert (off["saving"], on["saving"]) == ("off", "on")
    # 3 decodes of 40 tokens: 39 gaps each; prompts of 224, 232, 240 tokens all cross 256 while decoding.
    assert off["itl_samples"] == on["itl_samples"] == 3 * 39
    assert off["saved_blocks"] == 0 and on["saved_blocks"] == 3
