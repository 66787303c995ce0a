"""On a CUDA device: the engine's greedy tokens equal Hugging Face transformers' on the same GPU.

fp32: identical for single prompts, mixed chunked batches and prefix hits (tiny Llama/Qwen2/Qwen3).
bf16: the first 32 greedy tokens are identical for at least 95% of 64 prompts (bf16 rounding may flip a
near-tie, nothing more). Skipped without CUDA (the CPU path is covered by tests/engine).
"""

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams
from tests.engine.tiny_models import make_tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ARCHS = ("llama", "qwen2", "qwen3")


@torch.inference_mode()
def hf_greedy_batch(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy tokens from HF generate, one prompt at a time (no padding to perturb the numerics)."""
    outs = []
    for prompt in prompts:
        ids = torch.tensor([prompt], device=model.device)
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
        outs.append(gen[0, len(prompt):].tolist())
    return outs


def _prompts(n: int, vocab: int, seed: int, lo: int = 1, hi: int = 80) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


@pytest.fixture(scope="module")
def fp32_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_tiny")
    return {arch: make_tiny_model(root / arch, arch) for arch in ARCHS}


def _hf(path: str, dtype: torch.dtype):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to("cuda").eval()


@pytest.mark.parametrize("enforce_eager,async_scheduling", [(False, True), (True, False)])
@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_greedy_equals_hf(arch, enforce_eager, async_scheduling, fp32_dirs):
    hf = _hf(fp32_dirs[arch], torch.float32)
    llm = LLM(fp32_dirs[arch], dtype="float32", device="cuda", max_num_batched_tokens=48, max_num_seqs=8,
              enforce_eager=enforce_eager, async_scheduling=async_scheduling)
    vocab = llm.engine.model_config.vocab_size
    shared = _prompts(1, vocab, seed=7, lo=40, hi=40)[0]
    # Mixed lengths chunked over several steps, plus prompts sharing a 40-token prefix (prefix hits).
    prompts = _prompts(10, vocab, seed=1) + [shared + p for p in _prompts(4, vocab, seed=2, hi=20)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    single = llm.generate({"prompt_token_ids": prompts[0]}, params, use_tqdm=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    want = hf_greedy_batch(hf, prompts, 16)
    assert single[0].outputs[0].token_ids == want[0]
    assert [o.outputs[0].token_ids for o in outs] == want
    assert llm.engine.core.stats().prefix_cache_hits > 0


def _corpus_text(packages: tuple[str, ...] = ("json", "http", "logging")) -> bytes:
    """A byte corpus with real structure that does not change with this repository: the sources of a
    few packages of Python's standard library (440 KB, fixed for a given Python version).

    The repository's own text was used first, so every commit trained a different model with
    different near-ties: the same engine scored 62, 59 and (on a larger stdlib corpus) 56-57 of 64,
    every divergence an exact bf16 tie or a top-2 gap under 0.035 standard deviations of the logits,
    and an older commit gave the same tokens as the newer one on the same model.
    """
    root = Path(json.__file__).resolve().parents[1]
    files = [f for pkg in packages for f in sorted((root / pkg).glob("*.py"))]
    return b"\n".join(f.read_bytes() for f in files)


def _train_bytes_lm(path: str, corpus: torch.Tensor, steps: int = 3000) -> None:
    """Train the tiny model as a byte-level LM (token i = byte i) for a few seconds, then save it in bf16.

    Random weights give near-uniform next-token distributions: there, bf16 rounding alone flips so many
    near-ties that HF's own batched and unbatched bf16 runs agree on only ~28/64 prompts (measured on the
    H100). A model that has learnt something has the peaked distributions real checkpoints have, so
    what this test compares is the engine's arithmetic, not the coin flips of ties. On the H100 (78 s of
    training): 63/64 identical on this corpus, the one divergence a top-2 gap of 0.018 standard
    deviations; 64/64 on the json and collections packages alone.
    """
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to("cuda").train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, corpus.numel() - 257, (64,), generator=gen)
        batch = torch.stack([corpus[s:s + 257] for s in starts.tolist()]).to("cuda")
        loss = model(batch[:, :-1], labels=batch[:, :-1]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    for old in Path(path).glob("model*.safetensors*"):
        old.unlink()
    model.to(torch.bfloat16).save_pretrained(path)


@pytest.mark.slow
def test_bf16_first_32_tokens_match_hf_for_95_percent(tmp_path):
    path = make_tiny_model(tmp_path / "bf16", "qwen3", hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=4, head_dim=32)
    corpus = torch.tensor(list(_corpus_text()), dtype=torch.long)
    _train_bytes_lm(path, corpus)
    hf = _hf(path, torch.bfloat16)
    llm = LLM(path, dtype="bfloat16", device="cuda", max_num_seqs=64)
    rng = random.Random(3)
    prompts = []
    for _ in range(64):
        start, length = rng.randrange(corpus.numel() - 200), rng.randint(8, 200)
        prompts.append(corpus[start:start + length].tolist())
    # HF's min_new_tokens bans EOS until 32 tokens; min_tokens does the same here (ignore_eos would not).
    params = SamplingParams(temperature=0, max_tokens=32, min_tokens=32)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    want = hf_greedy_batch(hf, prompts, 32)
    same = sum(o.outputs[0].token_ids == w for o, w in zip(outs, want))
    print(f"bf16: {same}/64 prompts with identical first 32 greedy tokens")
    assert same >= 61
