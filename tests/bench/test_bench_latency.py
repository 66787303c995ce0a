"""`tierkv bench latency` on a tiny random-weight Llama on CPU; GPU busy % interval logic on synthetic traces."""

from __future__ import annotations

import json

import pytest
import torch

from engine.bench.gpu_busy import STEP_MARK, busy_fraction, profile_steps, trace_intervals
from engine.bench.roofline import Hardware, ModelCost, step_seconds
from engine.cli import main

INPUT_LEN, OUTPUT_LEN = 12, 5
BATCHES = (1, 3)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "latency.json"
    rc = main(["bench", "latency", "--arch", "tiny-llama", "--device", "cpu",
               "--batch-sizes", ",".join(map(str, BATCHES)), "--input-len", str(INPUT_LEN),
               "--output-len", str(OUTPUT_LEN), "--max-num-seqs", "4", "--gpu-busy",
               "--bandwidth-bytes", str(1 << 22), "--matmul-size", "128", "--json", str(path)])
    assert rc == 0
    return json.loads(path.read_text())


@pytest.mark.slow
def test_every_batch_produces_exact_token_counts(report):
    assert [b["batch_size"] for b in report["batches"]] == list(BATCHES)
    for b in report["batches"]:
        assert b["output_tokens"] == b["batch_size"] * OUTPUT_LEN
        assert 0 < b["ttft_p50_s"] <= b["ttft_p99_s"]
        assert b["itl_p50_s"] <= b["itl_p99_s"]
        assert b["decode_steps"] >= 1


@pytest.mark.slow
def test_roofline_step_is_weights_plus_live_kv(report):
    hw = Hardware(**report["hardware"])
    cost = ModelCost(**report["model_cost"])
    for b in report["batches"]:
        n = b["batch_size"]
        # Pure-decode steps of the whole batch: each request's context grows from INPUT_LEN + 1 on.
        expected = [step_seconds(cost, hw, n, n, n * (INPUT_LEN + k)) for k in range(1, OUTPUT_LEN)]
        assert b["roofline_step_s"] == pytest.approx(sum(expected) / len(expected), rel=1e-12)
        assert b["roofline_fraction"] == pytest.approx(b["roofline_step_s"] / b["decode_step_s"], rel=1e-12)


@pytest.mark.slow
def test_hf_baseline_and_ratio(report):
    hf = report["hf_batch1"]
    assert hf["decode_tok_s"] == pytest.approx(1 / hf["per_token_s"], rel=1e-12)
    ours = report["batches"][0]
    assert report["batch1_speedup_vs_hf"] == pytest.approx(hf["per_token_s"] / ours["decode_step_s"], rel=1e-12)
    assert report["gpu_busy"] == []  # asked for, but CPU has no device timeline


def test_busy_fraction_is_the_clipped_union():
    intervals = [(1.0, 3.0), (2.0, 4.0), (4.0, 5.0), (7.0, 8.0), (-5.0, 0.5), (9.5, 20.0), (12.0, 13.0)]
    # Window [0, 10]: [0, 0.5] + [1, 5] + [7, 8] + [9.5, 10] = 0.5 + 4 + 1 + 0.5 = 6.
    assert busy_fraction(intervals, (0.0, 10.0)) == 0.6
    assert busy_fraction([], (0.0, 10.0)) == 0.0
    assert busy_fraction([(0.0, 10.0), (2.0, 3.0)], (0.0, 10.0)) == 1.0
    with pytest.raises(ValueError, match="positive length"):
        busy_fraction(intervals, (5.0, 5.0))


def test_trace_intervals_take_device_work_inside_the_step_window():
    trace = {"traceEvents": [
        {"ph": "X", "cat": "user_annotation", "name": STEP_MARK, "ts": 100, "dur": 50},
        {"ph": "X", "cat": "user_annotation", "name": STEP_MARK, "ts": 160, "dur": 40},
        {"ph": "X", "cat": "gpu_user_annotation", "name": STEP_MARK, "ts": 90, "dur": 200},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 101, "dur": 10},
        {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 110, "dur": 30},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 140, "dur": 10},
        {"ph": "X", "cat": "gpu_memset", "name": "Memset", "ts": 170, "dur": 5},
        {"ph": "X", "cat": "kernel", "name": "attn", "ts": 195, "dur": 20},
        {"ph": "i", "cat": "kernel", "name": "marker", "ts": 120},
    ]}
    work, window = trace_intervals(trace)
    assert window == (100, 200)
    assert sorted(work) == [(110, 140), (140, 150), (170, 175), (195, 215)]
    # [110, 150] + [170, 175] + [195, 200] = 50 of 100.
    assert busy_fraction(work, window) == 0.5
    with pytest.raises(ValueError, match=STEP_MARK):
        trace_intervals({"traceEvents": []})


def test_measure_finds_the_step_window_in_a_real_profiler_trace():
    import torch

    from engine.bench.gpu_busy import measure

    if torch.cuda.is_available():
        pytest.skip("on CPU only: with CUDA the fraction is not known in advance")
    calls = []
    fraction, intervals = measure(lambda: calls.append(torch.ones(256).sum()), 3, warmup_steps=2)
    assert len(calls) == 5
    assert (fraction, intervals) == (0.0, 0)


def test_measure_keeps_the_trace_it_measured(tmp_path):
    import gzip

    from engine.bench.gpu_busy import measure

    path = tmp_path / "busy.json.gz"
    measure(lambda: torch.ones(256).sum(), 3, warmup_steps=1, trace_path=str(path))
    with gzip.open(path, "rt") as f:
        trace = json.load(f)
    marks = [e for e in trace["traceEvents"]
             if e.get("name") == STEP_MARK and e.get("ph") == "X" and e.get("cat") != "gpu_user_annotation"]
    assert len(marks) == 3


def test_only_the_steps_after_the_warm_up_are_recorded():
    calls = []

    def step():
        calls.append(len(calls))
        torch.ones(64).sum()

    trace = profile_steps(step, num_steps=4, warmup_steps=3)
    marks = [e for e in trace["traceEvents"]
             if e.get("name") == STEP_MARK and e.get("ph") == "X" and e.get("cat") != "gpu_user_annotation"]
    assert calls == list(range(7))
    assert len(marks) == 4


@pytest.mark.slow
def test_long_prefill_token_threshold_reaches_the_measured_engine(tmp_path):
    path = tmp_path / "latency.json"
    rc = main(["bench", "latency", "--arch", "tiny-llama", "--device", "cpu", "--batch-sizes", "1,3",
               "--input-len", "40", "--output-len", "4", "--long-prefill-token-threshold", "16", "--no-baseline",
               "--bandwidth-bytes", str(1 << 22), "--matmul-size", "128", "--json", str(path)])
    assert rc == 0
    report = json.loads(path.read_text())
    assert report["config"]["long_prefill_token_threshold"] == 16
    assert [b["output_tokens"] for b in report["batches"]] == [4, 12]
