import dataclasses

import pytest
import torch

from engine.sampling import Sampler, SamplingBatch, SamplingParams
from engine.sampling.sampler import apply_penalties, filter_mask

VOCAB = 64


def build(params, seeds=None, output_pos=None, prompt_ids=None, output_ids=None, vocab=VOCAB):
    rows = len(params)
    return SamplingBatch.build(
        params,
        seeds=seeds if seeds is not None else list(range(rows)),
        output_pos=output_pos if output_pos is not None else [0] * rows,
        prompt_ids=prompt_ids if prompt_ids is not None else [[] for _ in range(rows)],
        output_ids=output_ids if output_ids is not None else [[] for _ in range(rows)],
        vocab_size=vocab,
        device="cpu",
    )


def random_logits(rows, vocab=VOCAB, seed=0):
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def sample(logits, batch):
    return Sampler()(logits, batch).token_ids


def test_greedy_is_argmax():
    logits = random_logits(6)
    batch = build([SamplingParams(temperature=0.0)] * 3 + [SamplingParams(temperature=1e-6)] * 3)
    assert torch.equal(sample(logits, batch), logits.argmax(dim=-1))


def test_greedy_takes_first_index_on_ties():
    logits = torch.tensor([[0.0, 5.0, 1.0, 5.0], [7.0, 7.0, 7.0, 7.0]])
    batch = build([SamplingParams(temperature=0.0)] * 2, vocab=4)
    assert sample(logits, batch).tolist() == [1, 0]


def test_top_k_one_is_greedy():
    logits = random_logits(16)
    batch = build([SamplingParams(temperature=1.5, top_k=1)] * 16, seeds=list(range(100, 116)))
    assert torch.equal(sample(logits, batch), logits.argmax(dim=-1))


def test_tiny_top_p_is_greedy():
    logits = random_logits(16)
    batch = build([SamplingParams(temperature=2.0, top_p=1e-6)] * 16)
    assert torch.equal(sample(logits, batch), logits.argmax(dim=-1))


def test_min_p_keeps_exactly_the_tokens_above_the_threshold():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.19, 0.11]]))
    assert filter_mask(logits, build([SamplingParams(min_p=0.0)], vocab=4)) is None
    for min_p, expected in [(0.3, 3), (0.5, 2), (0.8, 1), (1.0, 1)]:
        batch = build([SamplingParams(min_p=min_p)], vocab=4)
        keep = filter_mask(logits, batch)
        assert keep[0].tolist() == [True] * expected + [False] * (4 - expected), min_p


def test_min_p_applies_at_the_row_temperature():
    # At T=0.5 the probabilities are squared before normalising: 0.3/0.4 -> 0.5625.
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.19, 0.11]]))
    batch = build([SamplingParams(min_p=0.6, temperature=0.5)], vocab=4)
    assert filter_mask(logits, batch)[0].tolist() == [True, False, False, False]


def test_top_k_and_top_p_keep_the_expected_sets():
    probs = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]])
    logits = torch.log(probs)
    cases = [
        (SamplingParams(top_k=2), [False, True, False, True, False]),
        (SamplingParams(top_p=0.7), [False, True, False, True, False]),
        (SamplingParams(top_p=0.71), [False, True, False, True, True]),
        (SamplingParams(top_k=3, top_p=0.7), [False, True, False, True, False]),
        (SamplingParams(top_p=1.0, min_p=0.2), [False, True, True, True, True]),
    ]
    for params, expected in cases:
        assert filter_mask(logits, build([params], vocab=5))[0].tolist() == expected, params


def test_top_k_candidates_give_the_same_mask_as_a_full_sort():
    logits = random_logits(5)
    params = [
        SamplingParams(top_k=3),
        SamplingParams(top_k=7, top_p=0.5, temperature=0.7),
        SamplingParams(),
        SamplingParams(top_k=2, min_p=0.1),
        SamplingParams(temperature=0, top_k=5),
    ]
    batch = build(params)
    assert batch.max_top_k == 7 and batch.uses_top_k_top_p and batch.uses_min_p
    full_sort = filter_mask(logits, dataclasses.replace(batch, max_top_k=0))
    assert torch.equal(filter_mask(logits, batch), full_sort)
    assert full_sort.sum(dim=1).tolist()[::2] == [3, VOCAB, VOCAB]


def test_top_p_without_top_k_needs_the_full_sort():
    batch = build([SamplingParams(top_k=3), SamplingParams(top_p=0.9)])
    assert batch.max_top_k == 0
    assert build([SamplingParams(top_k=VOCAB + 1)]).max_top_k == 0


def test_samples_stay_inside_the_filtered_set():
    logits = random_logits(1).expand(400, VOCAB)
    top5 = set(logits[0].topk(5).indices.tolist())
    batch = build([SamplingParams(top_k=5, temperature=3.0)] * 400, seeds=list(range(400)))
    tokens = set(sample(logits, batch).tolist())
    assert tokens <= top5 and len(tokens) == 5


def test_seeded_row_draws_the_same_tokens_alone_and_in_any_batch_position():
    target = SamplingParams(temperature=1.0, seed=1234)
    logits = random_logits(8, seed=7)
    alone = [
        sample(logits[3:4], build([target], seeds=[1234], output_pos=[pos])).item()
        for pos in range(8)
    ]
    others = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.7, top_k=3, repetition_penalty=1.2),
        SamplingParams(temperature=1.3, top_p=0.9, logprobs=2),
    ]
    for index in range(4):
        params = others[:index] + [target] + others[index:]
        row_logits = torch.cat([logits[:index], logits[3:4], logits[index:3]])
        tokens = []
        for pos in range(8):
            seeds = [11, 22, 33][:index] + [1234] + [11, 22, 33][index:]
            batch = build(
                params,
                seeds=seeds,
                output_pos=[5] * index + [pos] + [5] * (3 - index),
                prompt_ids=[[1, 2, 3]] * 4,
                output_ids=[[4, 4]] * 4,
            )
            tokens.append(sample(row_logits, batch)[index].item())
        assert tokens == alone, index


def test_different_seeds_and_positions_draw_different_tokens():
    logits = torch.zeros(1, 1000).expand(50, 1000)
    params = [SamplingParams()] * 50
    by_seed = sample(logits, build(params, seeds=list(range(50)), vocab=1000))
    by_pos = sample(logits, build(params, seeds=[9] * 50, output_pos=list(range(50)), vocab=1000))
    assert len(set(by_seed.tolist())) > 40
    assert len(set(by_pos.tolist())) > 40
    assert by_seed.tolist() != by_pos.tolist()


def test_seeds_wider_than_64_bits_are_reduced_not_rejected():
    logits = random_logits(1)
    wide = sample(logits, build([SamplingParams()], seeds=[2**64 + 5]))
    assert torch.equal(wide, sample(logits, build([SamplingParams()], seeds=[5])))


def chi_square(tokens, probs):
    observed = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * tokens.numel()
    return ((observed - expected) ** 2 / expected).sum().item()


# Critical value of chi-square with 7 degrees of freedom at p = 0.001.
CHI2_7DOF_P001 = 24.32


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_empirical_distribution_matches_softmax(temperature):
    n = 20_000
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5, -1.0, 2.0, 0.3, -2.0]])
    probs = torch.softmax(logits[0] / temperature, dim=-1)
    params = [SamplingParams(temperature=temperature)] * n
    across_seeds = sample(logits.expand(n, 8), build(params, seeds=list(range(n)), vocab=8))
    across_steps = sample(
        logits.expand(n, 8), build(params, seeds=[77] * n, output_pos=list(range(n)), vocab=8)
    )
    assert chi_square(across_seeds, probs) < CHI2_7DOF_P001
    assert chi_square(across_steps, probs) < CHI2_7DOF_P001


def test_truncated_distribution_is_renormalised():
    n = 20_000
    probs = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])
    params = [SamplingParams(top_p=0.8)] * n  # keeps tokens 1, 3, 4
    tokens = sample(torch.log(probs).expand(n, 5), build(params, seeds=list(range(n)), vocab=5))
    counts = torch.bincount(tokens, minlength=5)
    assert counts[0] == 0 and counts[2] == 0
    kept = torch.tensor([0.4, 0.3, 0.15]) / 0.85
    chi2 = chi_square(torch.bucketize(tokens, torch.tensor([1, 3])), kept)
    assert chi2 < 13.82  # 2 degrees of freedom, p = 0.001


def test_penalties_change_logits_exactly_as_the_formula():
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.25, 3.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    params = [
        SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25),
        SamplingParams(presence_penalty=-1.0),
    ]
    batch = build(
        params,
        prompt_ids=[[0, 3], [2]],
        output_ids=[[1, 1, 2, 1], [4, 4]],
        vocab=5,
    )
    penalised = apply_penalties(logits, batch)
    expected = torch.tensor(
        [
            # token 0: prompt, positive -> /2; token 1: output x3, negative -> *2 - 0.75 - 0.5;
            # token 2: output x1 -> /2 - 0.25 - 0.5; token 3: prompt, negative -> *2; token 4 unseen.
            [1.0, -2.0 - 0.75 - 0.5, 0.25 - 0.25 - 0.5, -0.5, 3.0],
            # repetition 1 leaves the prompt token alone; presence -1 raises the seen token 4.
            [1.0, 1.0, 1.0, 1.0, 2.0],
        ]
    )
    assert torch.equal(penalised, expected)


def test_no_penalty_batch_skips_counts_and_keeps_logits():
    batch = build([SamplingParams(), SamplingParams(temperature=0)], output_ids=[[1], [2]])
    assert batch.output_token_counts is None and batch.prompt_token_mask is None
    logits = random_logits(2)
    assert apply_penalties(logits, batch) is logits


def test_repetition_penalty_changes_the_greedy_choice():
    logits = torch.tensor([[2.0, 1.9, 0.0]])
    plain = build([SamplingParams(temperature=0)], output_ids=[[0]], vocab=3)
    penalised = build(
        [SamplingParams(temperature=0, repetition_penalty=1.2)], output_ids=[[0]], vocab=3
    )
    assert sample(logits, plain).item() == 0
    assert sample(logits, penalised).item() == 1


def test_logprobs_are_log_softmax_of_the_raw_logits():
    logits = random_logits(4)
    params = [
        SamplingParams(temperature=0.5, logprobs=3, repetition_penalty=1.5),
        SamplingParams(temperature=0, logprobs=1),
        SamplingParams(top_k=4),
        SamplingParams(logprobs=0),
    ]
    out = Sampler()(logits, build(params, output_ids=[[1, 2]] * 4, prompt_ids=[[3]] * 4))
    reference = torch.log_softmax(logits, dim=-1)
    assert torch.equal(out.logprobs, reference.gather(1, out.token_ids[:, None]).squeeze(1))
    top_values, top_ids = reference.topk(3, dim=-1)
    assert torch.equal(out.topk_ids, top_ids)
    assert torch.equal(out.topk_logprobs, top_values)


def test_no_logprobs_requested_gives_none():
    """No row asked for logprobs: the [B, vocab] log-softmax is skipped altogether."""
    out = Sampler()(random_logits(2), build([SamplingParams()] * 2))
    assert out.topk_ids is None and out.topk_logprobs is None and out.logprobs is None
    assert out.token_ids.dtype == torch.int64
