"""Sampling: parameter validation, each logits processor against its definition, seeded inverse-CDF draws."""

from __future__ import annotations

import math

import pytest
import torch
from engine_fixtures import single_thread  # noqa: F401 (autouse fixture)

from nanoseek.errors import GenerationError
from nanoseek.infer.sampling import (
    PenaltyState,
    RandomStream,
    SamplingParams,
    apply_penalties,
    draw,
    greedy_tokens,
    in_kernel,
    sample,
    sampling_probs,
    token_logprobs,
    uniforms,
)

LOGITS = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0, 0.0]])


def test_params_normalize_stop_and_reject_bad_values_together():
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["a", "b"], stop_token_ids=[3]).stop_token_ids == (3,)
    with pytest.raises(GenerationError) as error:
        SamplingParams(temperature=-1, top_p=2.0, max_tokens=0)
    message = str(error.value)
    assert "temperature" in message and "top_p" in message and "max_tokens" in message
    for bad in ({"stop": ""}, {"stop": {"a": 1}}, {"stop_token_ids": [-1]}, {"logprobs_mode": "other"},
                {"min_p": 1.5}, {"max_tokens": 2.5}, {"temperature": float("nan")}, {"top_k": True}):
        with pytest.raises(GenerationError):
            SamplingParams(**bad)


def test_greedy_rows_are_one_hot_at_the_argmax_and_temperature_scales():
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.5)]
    probs = sampling_probs(LOGITS.repeat(2, 1), params)
    assert probs[0].tolist() == [1.0, 0, 0, 0, 0, 0]
    assert torch.allclose(probs[1], (LOGITS[0] / 0.5).softmax(-1))


def test_top_k_top_p_min_p_keep_what_their_definitions_say():
    reference = LOGITS[0].softmax(-1)  # [0.57, 0.21, 0.13, 0.03, 0.004, 0.08]
    top_k = sampling_probs(LOGITS, [SamplingParams(top_k=2)])[0]
    assert (top_k > 0).tolist() == [True, True, False, False, False, False]
    assert torch.allclose(top_k[:2], reference[:2] / reference[:2].sum())
    # top_p: smallest prefix of the sorted probabilities whose mass reaches p
    for top_p, kept in ((0.5, 1), (0.6, 2), (0.85, 3), (0.95, 4), (1.0, 6)):
        probs = sampling_probs(LOGITS, [SamplingParams(top_p=top_p)])[0]
        assert int((probs > 0).sum()) == kept, top_p
    min_p = sampling_probs(LOGITS, [SamplingParams(min_p=0.2)])[0]  # keep p >= 0.2 * 0.57
    assert (min_p > 0).tolist() == (reference >= 0.2 * reference.max()).tolist()
    assert float(min_p.sum()) == pytest.approx(1.0)


def test_each_row_uses_its_own_parameters():
    params = [SamplingParams(top_k=1), SamplingParams(), SamplingParams(temperature=0)]
    probs = sampling_probs(LOGITS.repeat(3, 1), params)
    assert int((probs[0] > 0).sum()) == 1 and int((probs[1] > 0).sum()) == 6 and float(probs[2].max()) == 1.0


def test_penalties_follow_transformers_and_openai_definitions():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    state = PenaltyState.from_tokens(prompt_ids=[1], output_ids=[0, 0, 2], vocab_size=4, device="cpu")
    repetition = apply_penalties(logits, [SamplingParams(repetition_penalty=2.0)], [state])
    assert repetition.tolist() == [[1.0, -4.0, 0.5, 0.5]]  # seen: 0 (output), 1 (prompt), 2 (output)
    presence = apply_penalties(logits, [SamplingParams(presence_penalty=0.5)], [state])
    assert presence.tolist() == [[1.5, -2.0, 0.5, 0.5]]  # output tokens only, once each
    frequency = apply_penalties(logits, [SamplingParams(frequency_penalty=0.25)], [state])
    assert frequency.tolist() == [[1.5, -2.0, 0.75, 0.5]]  # per occurrence
    unchanged = apply_penalties(logits, [SamplingParams()], [None])
    assert unchanged is logits


def test_penalty_state_with_drafts_leaves_the_original_untouched():
    state = PenaltyState.from_tokens([], [3], 5, "cpu")
    extended = state.with_tokens([3, 4])
    assert state.counts.tolist() == [0, 0, 0, 1, 0] and extended.counts.tolist() == [0, 0, 0, 2, 1]


def test_draw_samples_the_distribution_and_is_reproducible():
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3]])
    stream = RandomStream(1)
    samples = torch.stack([draw(probs, uniforms([stream])) for _ in range(4000)]).flatten()
    counts = torch.bincount(samples, minlength=4).double()
    expected = probs[0].double() * 4000
    assert counts[1] == 0
    chi2 = float((((counts - expected) ** 2)[expected > 0] / expected[expected > 0]).sum())
    assert chi2 < 16.3  # 3 degrees of freedom, p = 0.001
    again = RandomStream(1)
    assert [int(draw(probs, uniforms([again]))) for _ in range(20)] == samples[:20].tolist()


@torch.no_grad()
def test_sample_takes_the_kernel_per_row_whatever_shares_the_batch():
    """`sample`: rows whose params `in_kernel` takes are drawn by `cpu_ops.sample_rows` alone or next to
    rows that need the general path (greedy, top-k, top logprobs), so a seeded row's token and log-prob
    do not depend on the batch; the other rows get what sampling_probs / draw / token_logprobs give."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 50, generator=generator) * 2
    plain = SamplingParams(temperature=0.8, logprobs=0, logprobs_mode="processed", seed=1)
    others = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_k=5), SamplingParams(temperature=1.0, logprobs=2)]
    assert in_kernel(plain) and in_kernel(SamplingParams(logprobs=0)) and not any(in_kernel(p) for p in others)
    assert not in_kernel(SamplingParams(temperature=0.8, logprobs=0))  # the raw log-prob: not the sampled distribution's
    alone = sample(logits[:1], [plain], [None], [RandomStream(11)])
    tokens, entries = sample(logits, [plain, *others], [None] * 4, [RandomStream(seed) for seed in (11, 12, 13, 14)])
    assert tokens[0] == alone[0][0] and entries[0] == alone[1][0]
    assert entries[0][1] is None and math.isclose(entries[0][0], float((logits[0] / 0.8).log_softmax(-1)[tokens[0]]), abs_tol=1e-5)
    streams = [RandomStream(seed) for seed in (12, 13, 14)]
    probs = sampling_probs(logits[1:], others)
    chosen = draw(probs, uniforms(streams))
    assert tokens[1:] == chosen.tolist() and entries[1:] == token_logprobs(logits[1:], probs, chosen, others)


def test_top_k_beyond_the_vocabulary_keeps_every_token():
    """An API client may send any top_k >= 1 (2**70 overflowed int64 in a tensor: a 500 in the server)."""
    params = [SamplingParams(temperature=1.0, top_k=2**70, top_p=0.9), SamplingParams(temperature=1.0, top_p=0.9)]
    probs = sampling_probs(LOGITS.repeat(2, 1), params)
    torch.testing.assert_close(probs[0], probs[1])


def test_logprobs_raw_and_processed():
    params = [SamplingParams(temperature=0.5, logprobs=2), SamplingParams(temperature=0.5, logprobs=0, logprobs_mode="processed"),
              SamplingParams()]
    logits = LOGITS.repeat(3, 1)
    probs = sampling_probs(logits, params)
    tokens = torch.tensor([1, 1, 0])
    raw, processed, none = token_logprobs(logits, probs, tokens, params)
    assert raw[0] == pytest.approx(float(LOGITS[0].log_softmax(-1)[1]), abs=1e-6)
    assert list(raw[1]) == [0, 1]
    assert processed[0] == pytest.approx(math.log(float((LOGITS[0] / 0.5).softmax(-1)[1])), abs=1e-5)
    assert processed[1] is None and none is None
    # every row processed without alternatives (GRPO's rollouts): only the chosen tokens' log is taken
    only = [SamplingParams(temperature=0.5, top_k=2, logprobs=0, logprobs_mode="processed")] * 2
    probs = sampling_probs(LOGITS.repeat(2, 1), only)
    fast = token_logprobs(LOGITS.repeat(2, 1), probs, torch.tensor([1, 0]), only)
    assert [entry[0] for entry in fast] == pytest.approx(probs.log()[[0, 1], [1, 0]].tolist(), abs=1e-6)
    assert fast[0][1] is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_greedy_tokens_are_the_first_maximum_of_each_row(dtype):
    """Greedy decoding widens logits to fp32 before the argmax (CPU's bf16 kernel is slower): the same
    index as an argmax in the logits' own dtype, the first one on ties."""
    logits = torch.randn(5, 3, 1000, generator=torch.Generator().manual_seed(0)).to(dtype)
    logits[0, 0, [7, 300, 999]] = 50.0  # a three-way tie
    tokens = greedy_tokens(logits)
    assert tokens == logits.argmax(dim=-1).tolist()
    assert tokens[0][0] == 7

