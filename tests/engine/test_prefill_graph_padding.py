"""A one-sequence prefill padded as its CUDA graph pads it (engine/runner/prefill_graphs.py) writes the
KV and gives the first token of the unpadded step: the padding rows after the real ones change no
real row.

CUDA graphs cannot be captured here, so the runner's prefill graphs are swapped for a subclass that
runs the forward over the same static, padded inputs the graph was captured over, and the results
are compared with an engine without them, for whole short prompts, suffixes over a cached prefix
(the step after an offload hit) and both attention variants. The KV is compared to fp32 rounding:
the CPU reference attention pads its batch to the longest sequence, and a longer one rounds the
last bits differently (1.4e-6 against values up to 4.7, measured); greedy tokens after that can
flip on the near-ties of a random-weight model.
"""

import random

import pytest
import torch

from engine import LLM, SamplingParams
from engine.runner.prefill_graphs import PrefillGraphs

FIRST = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)


class PaddedEagerPrefills(PrefillGraphs):
    """The prefill graphs' staging and padding, with the forward run instead of a replayed graph."""

    def __init__(self, *args, long_context_tokens: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.long_context_tokens = long_context_tokens
        self.replayed: list[tuple[int, int]] = []

    def replay(self, step, size):
        _, _ = self.stage(step, size)
        long = step.attn.max_seq_len >= self.long_context_tokens
        self.replayed.append((step.num_tokens, size))
        return self.forward(*self.inputs(size, long))


def _with_padded_prefills(llm: LLM, long_context_tokens: int) -> PaddedEagerPrefills:
    runner = llm.engine.core.runner
    graphs = PaddedEagerPrefills(runner._forward, runner.state.block_tables.shape[1], runner.block_size,
                                 runner.device, long_context_tokens=long_context_tokens)
    runner.prefill_graphs = graphs
    return graphs


@pytest.mark.parametrize("long_context_tokens", [1 << 30, 1])
def test_padded_prefills_give_the_unpadded_tokens(tiny_model_dirs, long_context_tokens):
    rng = random.Random(5)
    path = tiny_model_dirs["qwen3"]
    plain = LLM(path, dtype="float32", block_size=16, max_model_len=1024)
    padded = LLM(path, dtype="float32", block_size=16, max_model_len=1024)
    graphs = _with_padded_prefills(padded, long_context_tokens)
    vocab = plain.engine.model_config.vocab_size
    prefix = [rng.randrange(vocab) for _ in range(5 * 16)]
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in (3, 17, 130)]
    prompts += [prefix + [rng.randrange(vocab) for _ in range(n)] for n in (1, 9, 40)]   # suffixes over a hit
    for prompt in prompts:
        want = plain.generate({"prompt_token_ids": prompt}, FIRST, use_tqdm=False)[0].outputs[0].token_ids
        got = padded.generate({"prompt_token_ids": prompt}, FIRST, use_tqdm=False)[0].outputs[0].token_ids
        assert got == want, f"prompt of {len(prompt)} tokens"
        torch.testing.assert_close(padded.engine.core.runner.kv_cache, plain.engine.core.runner.kv_cache,
                                   rtol=1e-5, atol=1e-5)
    # Every prompt's first step went through the padding, the suffixes over 80 cached tokens included.
    assert (3, 16) in graphs.replayed and (130, 256) in graphs.replayed
    assert (9, 16) in graphs.replayed and (40, 64) in graphs.replayed


def test_a_step_whose_padding_passes_the_block_table_runs_unpadded(tiny_model_dirs):
    llm = LLM(tiny_model_dirs["qwen3"], dtype="float32", block_size=16, max_model_len=160)
    graphs = _with_padded_prefills(llm, 1 << 30)
    assert graphs.padded_size(130, 130) is None      # 256 padded rows pass the 160-token table
    assert graphs.padded_size(20, 140) == 32 and graphs.padded_size(20, 150) is None
    prompt = list(range(1, 131))
    llm.generate({"prompt_token_ids": prompt}, FIRST, use_tqdm=False)
    assert (130, 256) not in graphs.replayed
