"""MTP speculative decoding: greedy output unchanged, sampled output distributed exactly as plain sampling."""

from __future__ import annotations

import math

import pytest
import torch
from engine_fixtures import peaky_model, single_thread  # noqa: F401 (autouse fixture)

from nanoseek.infer import Engine, SamplingParams
from nanoseek.infer.sampling import RandomStream
from nanoseek.infer.speculative import accept_drafts

PROMPTS = [[5, 6, 7, 8, 9], [3, 4], [11] * 13, [2]]


def chi_square_limit(degrees: int, z: float = 3.09) -> float:
    """The p = 0.001 quantile of chi-square (Wilson-Hilferty approximation)."""
    return degrees * (1 - 2 / (9 * degrees) + z * math.sqrt(2 / (9 * degrees))) ** 3


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Statistic and degrees of freedom, pooling cells expected below 5 into one."""
    expected = probs.double().flatten() * counts.sum()
    counts = counts.double().flatten()
    small = expected < 5
    observed = torch.cat((counts[~small], counts[small].sum()[None]))
    expected = torch.cat((expected[~small], expected[small].sum()[None]))
    keep = expected > 0
    statistic = float((((observed - expected) ** 2)[keep] / expected[keep]).sum())
    return statistic, int(keep.sum()) - 1


@pytest.mark.parametrize("num_drafts", [1, 2])
def test_accept_drafts_preserves_the_target_distribution(num_drafts):
    """The first emitted token ~ p0; given the first draft was accepted, the second ~ p1."""
    generator = torch.Generator().manual_seed(0)
    vocab = 5
    target = torch.softmax(torch.randn(num_drafts + 1, vocab, generator=generator) * 1.5, -1)
    draft = torch.softmax(torch.randn(num_drafts, vocab, generator=generator) * 1.5, -1)
    rng = RandomStream(1)
    first, second = torch.zeros(vocab), torch.zeros(vocab)
    first_accepted = 0
    trials = 6000
    for _ in range(trials):
        drafts = [int(torch.multinomial(draft[j], 1, generator=generator)) for j in range(num_drafts)]
        emitted, accepted = accept_drafts(target, draft, drafts, rng)
        assert len(emitted) == accepted + 1 and emitted[:accepted] == drafts[:accepted]
        first_accepted += accepted >= 1
        first[emitted[0]] += 1
        if num_drafts == 2 and accepted >= 1:
            second[emitted[1]] += 1
    statistic, degrees = chi_square(first, target[0])
    assert statistic < chi_square_limit(degrees)
    if num_drafts == 2:
        statistic, degrees = chi_square(second, target[1])
        assert statistic < chi_square_limit(degrees)
    # the first draft is accepted with probability sum_x min(p0(x), q0(x))
    rate = float(torch.minimum(target[0], draft[0]).sum())
    assert abs(first_accepted / trials - rate) < 4 * math.sqrt(rate * (1 - rate) / trials)


@pytest.mark.parametrize("num_drafts", [1, 2, 3])
def test_greedy_speculative_output_equals_plain_decoding(num_drafts):
    model = peaky_model("v3")
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=1)
    plain = Engine(model, block_size=4).generate(PROMPTS, params)
    engine = Engine(model, block_size=4, speculative=True, num_speculative_tokens=num_drafts)
    speculative = engine.generate(PROMPTS, params)
    for a, b in zip(plain, speculative, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].logprobs == pytest.approx(b.outputs[0].logprobs, abs=1e-4)
    stats = engine.stats
    assert stats.spec_draft_tokens > 0 and 0 <= stats.acceptance_rate <= 1
    assert stats.mean_accepted_length == pytest.approx(1 + stats.spec_accepted_tokens / stats.spec_verify_steps)
    assert len(engine.cache.layers) == model.config.num_hidden_layers + 1  # the MTP depth has its own cache


@pytest.mark.parametrize("num_drafts", [1, 3])
def test_drafts_the_target_agrees_with_are_all_accepted(num_drafts):
    """With one overwhelmingly likely token the MTP head (sharing the LM head) always drafts it."""
    model = peaky_model("v3")
    model.lm_head.register_forward_hook(lambda module, inputs, logits: logits.index_add(
        -1, torch.tensor([7]), torch.full((*logits.shape[:-1], 1), 1e3)))
    engine = Engine(model, speculative=True, num_speculative_tokens=num_drafts)
    outputs = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert all(o.outputs[0].token_ids == [7] * 10 for o in outputs)
    stats = engine.stats
    assert stats.acceptance_rate == 1.0 and stats.mean_accepted_length == 1 + num_drafts


def test_speculation_falls_back_to_plain_decoding_without_mtp():
    model = peaky_model("qwen2")
    engine = Engine(model, speculative=True)
    assert not engine.speculative
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    assert [o.outputs[0].token_ids for o in engine.generate(PROMPTS, params)] == [
        o.outputs[0].token_ids for o in Engine(model).generate(PROMPTS, params)
    ]


def test_speculative_sampling_keeps_the_model_distribution():
    """Joint distribution of the first two sampled tokens (8 x 8 cells) against the exact model probabilities."""
    model = peaky_model("v3", vocab_size=8, logit_scale=40.0)
    prompt = [3, 5, 2]
    with torch.no_grad():
        first = model(torch.tensor([prompt])).logits[0, -1].softmax(-1)
        continuations = torch.tensor([prompt + [t] for t in range(8)])
        second = model(continuations).logits[:, -1].softmax(-1)
    joint = first[:, None] * second
    engine = Engine(model, speculative=True, max_num_seqs=4000, max_prefill_tokens=8)
    params = SamplingParams(temperature=1.0, max_tokens=2, ignore_eos=True, seed=11)
    outputs = engine.generate(prompt, params, n=3000)[0].outputs
    counts = torch.zeros(8, 8)
    for output in outputs:
        counts[output.token_ids[0], output.token_ids[1]] += 1
    statistic, degrees = chi_square(counts, joint)
    assert statistic < chi_square_limit(degrees)
    assert 0.05 < engine.stats.acceptance_rate < 0.95  # the draft is neither useless nor identical


def test_speculative_sampling_with_a_seed_ignores_batch_mates():
    model = peaky_model("v3", logit_scale=3.0)
    params = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=12, seed=4, ignore_eos=True, repetition_penalty=1.2)
    alone = Engine(model, speculative=True).generate([5, 6, 7], params)[0].outputs[0]
    crowded = Engine(model, speculative=True).generate(
        [[9, 9], [5, 6, 7], list(range(3, 20))], [SamplingParams(max_tokens=5), params, SamplingParams(max_tokens=9)]
    )[1].outputs[0]
    assert crowded.token_ids == alone.token_ids
