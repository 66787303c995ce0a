"""`tierkv bench serve` against a real tiny-model server on loopback; the dataset and arrivals alone."""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import sys

import pytest

from engine.bench.serve import arrival_offsets, choose_vocabulary
from engine.bench.serve_dataset import WORDS, DatasetConfig, build_conversations, single_token_words
from engine.cli import main
from engine.server.cli import build_server
from tests.engine.tiny_models import make_tiny_model
from tests.server.conftest import TINY_FLAGS, RunningServer

NUM_PROMPTS, TURNS, OUTPUT_LEN = 8, 2, 4
SHAPE = ["--num-prefixes", "2", "--prefix-len", "24", "--input-len", "4", "--output-len", str(OUTPUT_LEN),
         "--turns", str(TURNS), "--num-prompts", str(NUM_PROMPTS), "--disable-tqdm"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = make_tiny_model(tmp_path_factory.mktemp("bench_serve") / "llama", "llama")
    running = RunningServer(build_server, [model, *TINY_FLAGS])
    yield running
    running.stop()


def _bench(server, tmp_path, *flags: str) -> dict:
    path = tmp_path / "result.json"
    rc = main(["bench", "serve", "--base-url", server.base_url, *SHAPE, "--result-json", str(path), *flags])
    assert rc == 0
    return json.loads(path.read_text())


def test_completions_counts_hits_json_and_plot(server, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "ttft.png"
    result = _bench(server, tmp_path, "--request-rate", "inf", "--plot", str(png))
    s = result["summary"]
    assert (s["completed"], s["failed"]) == (NUM_PROMPTS, 0)
    assert s["output_tokens"] == NUM_PROMPTS * OUTPUT_LEN
    requests = result["requests"]
    assert [r["index"] for r in requests] == list(range(NUM_PROMPTS))
    for r in requests:
        assert r["output_tokens"] == OUTPUT_LEN
        assert len(r["itls"]) == OUTPUT_LEN - 1
        assert 0 < r["ttft"] < r["e2e"]
    # Our server reports cached_tokens: every second turn reuses its first turn's prompt.
    assert s["hit_basis"] == "server"
    second = next(row for row in s["by_turn"] if row["turn"] == 2)
    assert second["requests"] == NUM_PROMPTS // TURNS and second["cached_rate"] > 0
    assert all(r["hit_source"] == "conversation hit" for r in requests if r["turn"] == 1)
    gpu = s["prefix_cache"]["gpu"]
    assert gpu["queries"] == s["input_tokens"] and gpu["hit_rate"] > 0
    assert gpu["hits"] == s["cached_tokens"]["cached"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_chat_endpoint_at_a_rate_with_a_concurrency_cap(server, tmp_path):
    result = _bench(server, tmp_path, "--endpoint", "/v1/chat/completions", "--request-rate", "50",
                    "--max-concurrency", "2")
    s = result["summary"]
    assert (s["completed"], s["output_tokens"]) == (NUM_PROMPTS, NUM_PROMPTS * OUTPUT_LEN)
    assert all(len(r["itls"]) == OUTPUT_LEN - 1 for r in result["requests"])
    assert next(row for row in s["by_turn"] if row["turn"] == 2)["cached_rate"] > 0


def test_refused_requests_are_counted_failed(server, tmp_path):
    path = tmp_path / "result.json"
    rc = main(["bench", "serve", "--base-url", server.base_url, *SHAPE, "--model", "no-such-model",
               "--result-json", str(path)])
    s = json.loads(path.read_text())["summary"]
    assert rc == 1 and (s["completed"], s["failed"]) == (0, NUM_PROMPTS)


def test_soak_clients_that_go_away_leave_nothing_stuck(server, tmp_path):
    """Half the clients close their stream after the first token: the rest all complete, the server
    holds no request afterwards, and its memory was sampled throughout."""
    n = 24
    path = tmp_path / "soak.json"
    rc = main(["bench", "serve", "--base-url", server.base_url, "--num-prefixes", "2", "--prefix-len", "24",
               "--input-len", "4", "--output-len", "12", "--num-prompts", str(n), "--disconnect-fraction", "0.5",
               "--server-sample-s", "0.2", "--max-concurrency", "12", "--disable-tqdm", "--result-json", str(path)])
    result = json.loads(path.read_text())
    s = result["summary"]
    chooser = random.Random(0 + 1)   # --seed 0: the same requests go away every run
    expected = sum(chooser.random() < 0.5 for _ in range(n))
    assert rc == 0 and (s["completed"], s["failed"], s["disconnected"]) == (n - expected, 0, expected)
    gone = [r for r in result["requests"] if r["disconnected"]]
    assert len(gone) == expected and all(r["ttft"] > 0 and r["e2e"] is None for r in gone)
    assert all(r["output_tokens"] == 12 for r in result["requests"] if not r["disconnected"])
    assert s["server"]["after_drain"]["running"] == 0 and s["server"]["after_drain"]["waiting"] == 0
    assert s["server"]["samples"] >= 1 and s["server"]["rss_mb"]["max"] > 0
    with pytest.raises(SystemExit, match="--disconnect-fraction must be 0 with --turns > 1"):
        main(["bench", "serve", "--turns", "2", "--num-prompts", "4", "--disconnect-fraction", "0.5"])


def test_bad_options_name_the_option():
    with pytest.raises(SystemExit, match="--num-prompts must be a multiple of --turns"):
        main(["bench", "serve", "--num-prompts", "5", "--turns", "2"])
    with pytest.raises(SystemExit, match="--endpoint must be"):
        main(["bench", "serve", "--endpoint", "/v1/embeddings"])


def test_an_unreachable_server_is_a_clear_error():
    with pytest.raises(SystemExit, match=r"http://127.0.0.1:1 failed: ConnectError"):
        main(["bench", "serve", "--base-url", "http://127.0.0.1:1", "--disable-tqdm"])


def test_plot_without_matplotlib_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with pytest.raises(SystemExit, match=r"pip install 'tierkv\[bench\]'"):
        main(["bench", "serve", "--plot", "x.png"])


def test_dataset_is_deterministic_and_shares_prefixes_exactly():
    config = DatasetConfig(num_conversations=6, num_prefixes=3, prefix_len=20, input_len=5, turns=3, seed=7)
    convs = build_conversations(config)
    assert convs == build_conversations(config)
    assert convs != build_conversations(DatasetConfig(**{**config.__dict__, "seed": 8}))
    for c in convs:
        assert c.group == c.index % 3 and c.first_in_group == (c.index < 3)
        assert c.system_prefix == convs[c.group].system_prefix
        assert len(c.system_prefix.split()) == 20 and all(len(u.split()) == 5 for u in c.user_texts)
    assert len({c.system_prefix for c in convs}) == 3
    assert len({u for c in convs for u in c.user_texts}) == 6 * 3


def test_each_turn_extends_the_previous_prompt_and_answer():
    conv = build_conversations(DatasetConfig(1, 1, 8, 3, 3, seed=0))[0]
    answers = [" first answer", " second answer"]
    for turn in (1, 2):
        before = conv.completion_prompt(turn - 1, answers)
        assert conv.completion_prompt(turn, answers) == f"{before}{answers[turn - 1]} {conv.user_texts[turn]}"
        previous = conv.chat_messages(turn - 1, answers)
        assert conv.chat_messages(turn, answers)[:len(previous)] == previous
    assert conv.chat_messages(2, answers)[0] == {"role": "system", "content": conv.system_prefix}


def test_single_token_words_keeps_words_that_are_one_token_alone_and_after_a_space():
    # A made-up tokenizer: words of up to 4 letters are one token, longer ones two.
    def count(text: str) -> int:
        return sum(1 if len(w) <= 4 else 2 for w in text.split())

    assert single_token_words(["the", "river", "sun"], count) == ["the", "sun"]
    assert set(single_token_words(WORDS, count)) == {w for w in WORDS if len(w) <= 4}


def test_vocabulary_is_the_single_token_words_when_the_server_counts_tokens():
    async def count(text: str) -> int:  # words of up to 3 letters are one token
        return sum(1 if len(w) <= 3 else 2 for w in text.split())

    words, unit = asyncio.run(choose_vocabulary(count))
    assert unit == "tokens" and words == [w for w in WORDS if len(w) <= 3]
    assert asyncio.run(choose_vocabulary(None)) == (list(WORDS), "words")

    async def bytes_count(text: str) -> int:  # a byte-level tokenizer: too few words survive
        return len(text)

    assert asyncio.run(choose_vocabulary(bytes_count)) == (list(WORDS), "words")


def test_arrivals_are_seeded_gamma_intervals_of_mean_one_over_rate():
    offsets = arrival_offsets(2000, rate=4.0, burstiness=0.5, seed=1)
    assert offsets == arrival_offsets(2000, rate=4.0, burstiness=0.5, seed=1)
    gaps = [b - a for a, b in zip(offsets, offsets[1:])]
    assert offsets[0] == 0 and statistics.fmean(gaps) == pytest.approx(0.25, rel=0.1)
    assert arrival_offsets(3, rate=float("inf"), burstiness=1.0, seed=0) == [0.0, 0.0, 0.0]
