import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from kernels.sampler import noise_bits, sample_tokens, sample_tokens_reference, uniform_noise

REPO_ROOT = Path(__file__).resolve().parents[2]
MASK32 = 0xFFFFFFFF


def fmix32(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & MASK32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & MASK32
    return h ^ (h >> 16)


def python_noise_bits(seed: int, pos: int, token: int) -> int:
    """The documented hash in plain Python integers: the spec both implementations follow."""
    seed &= (1 << 64) - 1
    key = fmix32((seed >> 32) ^ 0x9E3779B9)
    key = fmix32(key ^ (seed & MASK32))
    key = fmix32(key ^ (pos & MASK32))
    return fmix32((fmix32(token ^ key) + key) & MASK32)


def test_noise_bits_follow_the_32bit_hash_exactly():
    seeds = torch.tensor([0, 1, -1, 2**63 - 1, -(2**63), 123456789012345], dtype=torch.int64)
    pos = torch.tensor([0, 7, 2**31, 99, 1, 2**40 + 3], dtype=torch.int64)
    bits = noise_bits(seeds, pos, 300)
    for row in range(len(seeds)):
        for token in (0, 1, 2, 150, 299):
            expected = python_noise_bits(int(seeds[row]), int(pos[row]), token)
            assert bits[row, token].item() == expected, (row, token)


def test_uniform_noise_is_strictly_inside_the_unit_interval():
    u = uniform_noise(torch.arange(64), torch.zeros(64, dtype=torch.int64), 4096)
    assert u.min().item() > 0.0 and u.max().item() < 1.0
    assert abs(u.mean().item() - 0.5) < 0.005


def test_dispatcher_uses_the_reference_on_cpu():
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(3))
    args = (logits, torch.tensor([0.0, 1.0, 0.5, 2.0, 1.0]), torch.arange(5), torch.arange(5))
    assert torch.equal(sample_tokens(*args), sample_tokens_reference(*args))


# Runs in a fresh interpreter: triton reads TRITON_INTERPRET when a kernel is defined, so the
# environment must be set before kernels.sampler_triton is first imported.
INTERPRETER_SCRIPT = """
import json, torch
from kernels.sampler import apply_penalties_reference, sample_tokens_reference
from kernels.sampler_triton import apply_penalties_triton, sample_tokens_triton

g = torch.Generator().manual_seed(0)
rows, vocab = 24, 300
logits = torch.randn(rows, vocab, generator=g) * 2
logits[3, 10:200] = float("-inf")          # filtered tokens
logits[4] = 1.0                            # greedy tie: first index
logits[5, [17, 250]] = 9.0                 # greedy tie across vocabulary chunks
temperature = torch.rand(rows, generator=g) * 1.5 + 0.05
temperature[[0, 4, 5]] = 0.0
temperature[6] = 1e-6
seeds = torch.randint(-2**62, 2**62, (rows,), generator=g)
seeds[7] = seeds[8]                        # same seed, different position
output_pos = torch.randint(0, 2**40, (rows,), generator=g)
results = {}
for block_v in (128, 512):
    results[block_v] = sample_tokens_triton(logits, temperature, seeds, output_pos, block_v).tolist()
results["reference"] = sample_tokens_reference(logits, temperature, seeds, output_pos).tolist()
results["argmax"] = logits.argmax(dim=-1).tolist()

counts = torch.randint(0, 3, (rows, vocab), generator=g, dtype=torch.int32)
prompt_mask = torch.rand(rows, vocab, generator=g) < 0.2
repetition = torch.rand(rows, generator=g) + 0.5
presence = torch.rand(rows, generator=g) * 4 - 2
frequency = torch.rand(rows, generator=g) * 4 - 2
for mask in (prompt_mask, None):
    args = (logits, counts, mask, repetition, presence, frequency)
    expected = apply_penalties_reference(*args)
    got = apply_penalties_triton(*args, block_v=128)
    results.setdefault("penalties_equal", []).append(torch.equal(got, expected))
print(json.dumps(results))
"""


def test_triton_kernels_match_references_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", INTERPRETER_SCRIPT],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    reference = results["reference"]
    assert results["128"] == reference
    assert results["512"] == reference
    assert [reference[i] for i in (0, 4, 5, 6)] == [results["argmax"][i] for i in (0, 4, 5, 6)]
    assert reference[4] == 0 and reference[5] == 17
    assert not 10 <= reference[3] < 200
    assert results["penalties_equal"] == [True, True]
