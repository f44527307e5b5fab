"""The inference engine: cached decoding against full forwards, batching, limits, streaming, cancellation."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_fixtures import peaky_model, reference_greedy, single_thread, tiny_tokenizer  # noqa: F401 (autouse fixture)

from nanoseek.errors import GenerationError
from nanoseek.infer import BeamSearchParams, Engine, SamplingParams, packing
from nanoseek.infer.engine import _TextTracker
from nanoseek.model import cpu_ops, layers
from nanoseek.model.cache import cache_bytes_per_token
from nanoseek.model.moe import RoutedExperts

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=5)
PROMPTS = [[5, 6, 7, 8, 9], [3, 4], [11] * 13, [2]]


@pytest.fixture(scope="module")
def mla_model():
    return peaky_model("v3")


def test_prompt_logprobs_equal_a_full_forward_while_requests_run(mla_model):
    """echo + logprobs: each prompt token's log-probability given the ones before it (none for the
    first) and the top-n at each position, from one forward between steps of a running batch."""
    engine = Engine(mla_model, block_size=4)
    running = engine.submit(PROMPTS[0], GREEDY)
    engine.step()  # a request holds cache blocks; scoring must neither use nor disturb them
    prompt = [5, 9, 2, 14, 3, 3, 8]
    token_ids, logprobs, top = engine.prompt_logprobs(prompt, top_n=3)
    with torch.no_grad():
        reference = mla_model(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
    assert token_ids == prompt and logprobs[0] is None and top[0] is None
    assert logprobs[1:] == pytest.approx([float(reference[i, prompt[i + 1]]) for i in range(len(prompt) - 1)], abs=1e-5)
    for position in range(1, len(prompt)):
        expected = reference[position - 1].topk(3)
        assert list(top[position]) == expected.indices.tolist()
    assert engine.prompt_logprobs(prompt)[2] is None  # top_n=0: no alternatives
    while not running.finished:
        engine.step()
    tokens, _ = reference_greedy(mla_model, PROMPTS[0], GREEDY.max_tokens)
    assert running.result().outputs[0].token_ids == tokens
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        engine.prompt_logprobs([10**6])


@pytest.mark.parametrize("name", ["v3", "v2-lite-greedy", "qwen2", "llama3"])
def test_cached_decoding_equals_full_forward_token_by_token(name):
    model = peaky_model(name)
    engine = Engine(model, block_size=4)
    outputs = engine.generate(PROMPTS, GREEDY)
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        tokens, reference = reference_greedy(model, prompt, GREEDY.max_tokens)
        completion = output.outputs[0]
        assert completion.token_ids == tokens
        for step, (logprob, top) in enumerate(zip(completion.logprobs, completion.top_logprobs, strict=True)):
            assert logprob == pytest.approx(float(reference[step][tokens[step]]), abs=1e-4)
            expected_top = reference[step].topk(5)
            assert list(top) == expected_top.indices.tolist()
            assert list(top.values()) == pytest.approx(expected_top.values.tolist(), abs=1e-4)


def test_absorbed_decoding_equals_naive(mla_model):
    absorbed = Engine(mla_model, absorb=True).generate(PROMPTS, GREEDY)
    naive = Engine(mla_model, absorb=False).generate(PROMPTS, GREEDY)
    for a, b in zip(absorbed, naive, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].logprobs == pytest.approx(b.outputs[0].logprobs, abs=1e-4)


def test_latent_cache_stores_only_the_latent_and_rotated_rope_key(mla_model):
    config = mla_model.config
    engine = Engine(mla_model)
    shapes = [tuple(buffer.shape[1:]) for buffer in engine.cache.layers[0]]
    assert shapes == [(config.kv_lora_rank,), (config.qk_rope_head_dim,)]
    assert len(engine.cache.layers) == config.num_hidden_layers  # no MTP layers without speculation
    assert engine.cache.bytes_per_token == cache_bytes_per_token(config, torch.float32)
    assert engine.cache.bytes_per_token == config.num_hidden_layers * (config.kv_lora_rank + config.qk_rope_head_dim) * 4


def test_batch_of_ragged_prompts_equals_each_alone(mla_model):
    batched = Engine(mla_model, block_size=4).generate(PROMPTS, GREEDY)
    for prompt, output in zip(PROMPTS, batched, strict=True):
        alone = Engine(mla_model, block_size=4).generate(prompt, GREEDY)[0]
        assert output.outputs[0].token_ids == alone.outputs[0].token_ids


def test_chunked_prefill_equals_one_shot(mla_model):
    prompt = list(range(3, 40))
    one_shot = Engine(mla_model, block_size=4).generate(prompt, GREEDY)[0].outputs[0]
    chunked = Engine(mla_model, block_size=4, max_prefill_tokens=8).generate(prompt, GREEDY)[0].outputs[0]
    assert chunked.token_ids == one_shot.token_ids
    assert chunked.logprobs == pytest.approx(one_shot.logprobs, abs=1e-4)


def test_preemption_under_a_small_pool_recomputes_the_same_tokens(mla_model):
    expected = Engine(mla_model, block_size=4).generate(PROMPTS, GREEDY)
    bytes_per_token = cache_bytes_per_token(mla_model.config, torch.float32)
    engine = Engine(mla_model, block_size=4, cache_memory=40 * bytes_per_token)
    outputs = engine.generate(PROMPTS, GREEDY)
    assert engine.stats.preemptions > 0
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in expected]
    assert engine.cache.num_free_blocks == engine.cache.num_blocks - 1


def test_n_completions_share_the_prompt_blocks():
    model = peaky_model("v3", logit_scale=1.0)
    engine = Engine(model, block_size=4)
    prompt = list(range(3, 30))  # 27 tokens: 6 full blocks + a shared partial one
    params = SamplingParams(temperature=1.0, max_tokens=6, seed=7, ignore_eos=True)
    handle = engine.submit(prompt, params, n=4)
    engine.step()  # prefill once, four first tokens
    tables = [s.table for s in engine._running]
    assert len(tables) == 4 and all(table == tables[0] for table in tables)
    engine.step()  # the first decode un-shares only the partial last block
    tables = [s.table for s in engine._running]
    assert all(table[:-1] == tables[0][:-1] for table in tables)
    assert len({table[-1] for table in tables}) == 4
    result = handle.result()
    assert len(result.outputs) == 4 and len({tuple(o.token_ids) for o in result.outputs}) > 1
    again = engine.generate(prompt, params, n=4)[0]
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in result.outputs]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.8, top_p=0.9, max_tokens=10, seed=123, ignore_eos=True),
        SamplingParams(temperature=1.3, top_k=5, min_p=0.05, repetition_penalty=1.3, presence_penalty=0.5,
                       frequency_penalty=0.4, max_tokens=10, seed=5, ignore_eos=True, logprobs=2),
    ],
)
def test_seed_gives_the_same_output_whatever_shares_the_batch(params):
    model = peaky_model("v3", logit_scale=3.0)
    alone = Engine(model).generate([5, 6, 7], params, n=2)[0]
    others = [[9, 9], list(range(3, 20)), [4]]
    other_params = [SamplingParams(temperature=1.0, max_tokens=n) for n in (3, 12, 7)]
    crowded = Engine(model, max_prefill_tokens=6).generate(
        [others[0], [5, 6, 7], *others[1:]], [other_params[0], params, *other_params[1:]], n=2
    )[1]
    assert [o.token_ids for o in crowded.outputs] == [o.token_ids for o in alone.outputs]
    assert alone.outputs[0].token_ids != alone.outputs[1].token_ids


def test_stop_strings_are_cut_and_never_streamed():
    tokenizer = tiny_tokenizer()
    model = peaky_model("v3", vocab_size=tokenizer.vocab_size, logit_scale=3.0)
    engine = Engine(model, tokenizer)
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=40, ignore_eos=True)
    full = engine.generate("Once upon", params)[0].outputs[0]
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    assert len(stop) == 3
    events = list(engine.stream("Once upon", SamplingParams(**{**vars(params), "stop": [stop, "never-seen"]})))
    text = "".join(event.text for event in events)
    assert text == full.text[: full.text.index(stop)]
    assert all(stop not in event.text for event in events)
    assert events[-1].finish_reason == "stop" and events[-1].stop_reason == stop


def test_streamed_text_adds_up_to_the_decoded_tokens():
    tokenizer = tiny_tokenizer()
    model = peaky_model("v3", vocab_size=tokenizer.vocab_size, logit_scale=1.0)
    engine = Engine(model, tokenizer)
    for seed in range(4):
        params = SamplingParams(temperature=1.0, seed=seed, max_tokens=30, ignore_eos=True, skip_special_tokens=False)
        events = list(engine.stream("你好", params))
        tokens = [t for event in events for t in event.token_ids]
        assert "".join(event.text for event in events) == tokenizer.decode(tokens)
        # generate() decodes once at the end instead of per token: the same text
        assert engine.generate("你好", params)[0].outputs[0].text == tokenizer.decode(tokens)


@pytest.mark.parametrize("logprobs", [None, 0, 2])
@pytest.mark.parametrize("ending", ["length", "stop token"])
def test_generate_records_what_a_stream_delivers(logprobs, ending):
    """generate() (nobody streams: most tokens recorded in one step, `_Sequence.quiet_stops`) returns
    what the stream delivers, ended by the length limit or by a stop token."""
    tokenizer = tiny_tokenizer()
    engine = Engine(peaky_model("v3", vocab_size=tokenizer.vocab_size, logit_scale=1.0), tokenizer)
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=12, ignore_eos=True, logprobs=logprobs)
    if ending == "stop token":  # one the first completion samples midway
        first = engine.generate("Once upon", params, n=2)[0].outputs[0].token_ids
        params = SamplingParams(temperature=1.0, seed=7, max_tokens=12, ignore_eos=True, logprobs=logprobs,
                                stop_token_ids=[first[6]])
    result = engine.generate("Once upon", params, n=2)[0]
    if ending == "stop token":
        assert result.outputs[0].finish_reason == "stop" and len(result.outputs[0].token_ids) <= 7
    for completion in result.outputs:
        events = [e for e in engine.stream("Once upon", params, n=2) if e.index == completion.index]
        assert completion.token_ids == [t for e in events for t in e.token_ids]
        assert completion.finish_reason == events[-1].finish_reason
        assert completion.text == "".join(e.text for e in events)
        if logprobs is None:
            assert completion.logprobs is None and completion.top_logprobs is None
        else:
            assert completion.logprobs == [lp for e in events for lp in e.logprobs]
            assert completion.top_logprobs == ([t for e in events for t in e.top_logprobs] if logprobs else None)


@pytest.mark.parametrize("flushed", [True, False])
def test_deferred_text_equals_incremental_text(flushed):
    """A tracker nobody streams decodes once at the end; cut inside a character, with or without the
    final flush (stop or length vs a cancelled request), it returns what the incremental one returns."""
    tokenizer = tiny_tokenizer()
    ids = tokenizer.encode("你好🙂 Ünï")
    for end in range(1, len(ids) + 1):
        incremental, deferred = _TextTracker(tokenizer, SamplingParams()), _TextTracker(tokenizer, SamplingParams(), incremental=False)
        for token in ids[:end]:
            incremental.feed(token)
            deferred.feed(token)
            assert deferred.take(final=False) == ""
        if flushed:
            incremental.flush(), deferred.flush()
        assert deferred.take(final=True) == incremental.take(final=False) + incremental.take(final=True)


def test_text_deltas_never_split_a_character():
    tokenizer = tiny_tokenizer()
    text = "你好🙂 Ünï"
    tracker = _TextTracker(tokenizer, SamplingParams())
    deltas = []
    for token in tokenizer.encode(text):
        tracker.feed(token)
        deltas.append(tracker.take(final=False))
    assert "".join(deltas) == text
    assert all("\ufffd" not in delta for delta in deltas)
    assert any(delta == "" for delta in deltas)  # some tokens end inside a character and emit nothing


def test_finish_reasons_stop_token_length_and_context():
    model = peaky_model("v3")
    engine = Engine(model, max_model_len=20)
    first = engine.generate([5, 6], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0].outputs[0]
    stopped = engine.generate([5, 6], SamplingParams(temperature=0, stop_token_ids=[first.token_ids[2]]))[0].outputs[0]
    assert stopped.token_ids == first.token_ids[:3]  # the stop token is kept in token_ids
    assert (stopped.finish_reason, stopped.stop_reason) == ("stop", first.token_ids[2])
    assert first.finish_reason == "length" and len(first.token_ids) == 5
    to_context = engine.generate([5, 6], SamplingParams(temperature=0, ignore_eos=True))[0].outputs[0]
    assert to_context.finish_reason == "length" and len(to_context.token_ids) == 18


def test_eos_stops_unless_ignored():
    model = peaky_model("v3")
    eos = model.config.eos_token_ids[0]

    def favour_eos(module, inputs, logits):
        return logits.index_add(-1, torch.tensor([eos]), torch.full((*logits.shape[:-1], 1), 1e3))

    model.lm_head.register_forward_hook(favour_eos)
    engine = Engine(model)
    stopped = engine.generate([5, 6], SamplingParams(temperature=0, max_tokens=4))[0].outputs[0]
    assert (stopped.token_ids, stopped.finish_reason, stopped.stop_reason) == ([eos], "stop", eos)
    ignored = engine.generate([5, 6], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0].outputs[0]
    assert ignored.token_ids == [eos] * 4 and ignored.finish_reason == "length"


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        (list(range(64)), SamplingParams(max_tokens=1), "context length is 64"),
        ([5] * 60, SamplingParams(max_tokens=10), "max_tokens=10 is too large"),
        ([5], SamplingParams(stop="x"), "stop strings need a tokenizer"),
        ([5, 999], SamplingParams(), "outside the vocabulary"),
        ("text", SamplingParams(), "text prompts need a tokenizer"),
        ([5], SamplingParams(stop_token_ids=[500]), "outside the vocabulary"),
        (5, SamplingParams(), "a prompt must be a string or a list of token ids"),
    ],
)
def test_bad_requests_raise_before_any_work(mla_model, prompt, params, message):
    engine = Engine(mla_model, max_model_len=64)
    with pytest.raises(GenerationError, match=message):
        engine.submit(prompt, params)
    assert not engine.has_unfinished()


def test_more_completions_than_sequence_slots_is_rejected(mla_model):
    engine = Engine(mla_model, max_num_seqs=4)
    with pytest.raises(GenerationError, match="n must be an integer in"):
        engine.submit([5], SamplingParams(), n=5)


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_tokens", 0), ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("stop", 5), ("stop", ["a", 3]),
     ("top_k", -1), ("logprobs", 21), ("seed", -1), ("repetition_penalty", 0.0), ("presence_penalty", 3.0),
     ("cache_salt", ""), ("cache_salt", 7)],
)
def test_invalid_sampling_parameters_are_rejected(field, value):
    with pytest.raises(GenerationError, match=field):
        SamplingParams(**{field: value})


def test_empty_prompt_starts_from_bos(mla_model):
    engine = Engine(mla_model)
    output = engine.generate([], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0]
    assert output.prompt_token_ids == [mla_model.config.bos_token_id]
    tokens, _ = reference_greedy(mla_model, [mla_model.config.bos_token_id], 3)
    assert output.outputs[0].token_ids == tokens


def test_cancel_frees_the_cache_at_once_queued_or_running(mla_model):
    engine = Engine(mla_model, block_size=4, max_num_seqs=1)
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    running = engine.submit(list(range(3, 30)), params)
    queued = engine.submit([5, 6], params)
    engine.step()
    engine.step()
    used = engine.cache.num_blocks - 1 - engine.cache.num_free_blocks
    assert used == 7
    running.cancel()
    assert engine.cache.num_free_blocks == engine.cache.num_blocks - 1
    assert running.finished and running.result().outputs[0].finish_reason == "cancelled"
    assert len(running.result().outputs[0].token_ids) == 2
    queued.cancel()
    assert queued.result().outputs[0].finish_reason == "cancelled" and queued.result().outputs[0].token_ids == []
    assert not engine.has_unfinished()


def test_closing_a_stream_early_cancels_it(mla_model):
    engine = Engine(mla_model)
    stream = engine.stream([5, 6], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    next(stream)
    stream.close()
    assert not engine.has_unfinished() and engine.stats.finished == {"cancelled": 1}


def test_background_thread_serves_asyncio_clients(mla_model):
    engine = Engine(mla_model).start()
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

    async def client(prompt, cancel_after=None):
        handle = engine.submit(prompt, params)
        tokens, reasons = [], []
        async for event in handle:
            tokens += event.token_ids
            reasons.append(event.finish_reason)
            if cancel_after is not None and len(tokens) >= cancel_after and event.finish_reason is None:
                handle.cancel()
        return tokens, reasons[-1]

    async def main():
        return await asyncio.gather(client([5, 6, 7]), client([3, 4]), client([9, 9, 9], cancel_after=2))

    try:
        results = asyncio.run(main())
    finally:
        engine.close()
    expected = [reference_greedy(mla_model, p, 8)[0] for p in ([5, 6, 7], [3, 4])]
    assert results[0] == (expected[0], "length") and results[1] == (expected[1], "length")
    assert results[2][1] == "cancelled" and 2 <= len(results[2][0]) < 8
    assert engine.cache.num_free_blocks == engine.cache.num_blocks - 1


def test_moe_decode_reads_only_the_chosen_experts(monkeypatch):
    """Poisoning every expert no token chose leaves the output unchanged (they are never read). Experts
    as small as this model's run all at once when most are busy (next test); V2/V3-sized experts never
    do (`all_at_once_threshold`), so this pins the path they take."""
    monkeypatch.setattr(RoutedExperts, "all_at_once", False)
    model = peaky_model("v3")
    prompt = [5, 6, 7, 8]
    engine = Engine(model, pack_weights=False)  # the poison goes into the plain stacks below
    expected = engine.generate(prompt, GREEDY)[0].outputs[0]
    chosen: dict[int, set[int]] = {}

    def record(module, inputs, output):
        chosen.setdefault(id(module), set()).update(output[1].flatten().tolist())

    hooks = [layer.gate.register_forward_hook(record) for layer in model.moe_layers()]
    engine.generate(prompt, GREEDY)
    for hook in hooks:
        hook.remove()
    with torch.no_grad():
        for layer in model.moe_layers():
            unused = [e for e in range(layer.experts.num_experts) if e not in chosen.get(id(layer.gate), set())]
            layer.experts.gate_up_proj[unused] = float("nan")
            layer.experts.down_proj[unused] = float("nan")
    assert any(len(c) < model.config.n_routed_experts for c in chosen.values())
    poisoned = engine.generate(prompt, GREEDY)[0].outputs[0]
    assert poisoned.token_ids == expected.token_ids



def test_moe_decode_runs_small_experts_all_at_once_with_the_same_tokens(monkeypatch):
    """Without the fused CPU kernels (whose routed-experts kernel comes first), experts as small as this
    model's cost less all at once (one matmul over all of them, the gate weights zeroing the unchosen)
    than one call per chosen expert: plain and speculative decoding take that path and give the tokens
    of the one-by-one path."""
    monkeypatch.setattr(cpu_ops, "_state", "off")
    calls = []
    all_experts_forward = RoutedExperts.all_experts_forward
    monkeypatch.setattr(RoutedExperts, "all_experts_forward", lambda *args: calls.append(1) or all_experts_forward(*args))
    prompts = [[5, 6, 7, 8], [9, 3], [4, 4, 4, 4, 4, 4]]
    results = {}
    for all_at_once in (True, False):
        monkeypatch.setattr(RoutedExperts, "all_at_once", all_at_once)
        for speculative in (False, True):
            engine = Engine(peaky_model("v3"), pack_weights=False, speculative=speculative)
            results[all_at_once, speculative] = [o.outputs[0].token_ids for o in engine.generate(prompts, GREEDY)]
        if all_at_once:
            assert calls
            calls.clear()
    assert not calls
    assert results[True, False] == results[False, False] == results[True, True] == results[False, True]

# ----- beam search -------------------------------------------------------------------------------
def test_one_beam_is_greedy_decoding():
    model = peaky_model("qwen2", logit_scale=3.0)
    engine = Engine(model)
    beam = engine.beam_search([5, 6, 7], BeamSearchParams(num_beams=1, max_tokens=6, ignore_eos=True))
    assert beam.outputs[0].token_ids == reference_greedy(model, [5, 6, 7], 6)[0]


@pytest.mark.parametrize(("eos_bias", "num_beams", "length_penalty"), [(0.0, 3, 1.0), (2.5, 4, -1.0), (3.5, 4, 2.0)])
def test_beam_search_matches_transformers(tmp_path, eos_bias, num_beams, length_penalty):
    """Same beams and scores as transformers' `generate(num_beams=...)`, with EOS finishing some beams."""
    import transformers

    model = peaky_model("qwen2", logit_scale=3.0)
    model.save_pretrained(tmp_path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    eos = 1
    for module in (model, reference):
        module.lm_head.register_forward_hook(
            lambda m, i, logits: logits.index_add(-1, torch.tensor([eos]), torch.full((*logits.shape[:-1], 1), eos_bias))
        )
    prompt = [5, 6, 7]
    expected = reference.generate(
        torch.tensor([prompt]), num_beams=num_beams, num_return_sequences=num_beams, max_new_tokens=8,
        do_sample=False, length_penalty=length_penalty, early_stopping=False, eos_token_id=eos, pad_token_id=2,
        output_scores=True, return_dict_in_generate=True,
    )
    engine = Engine(model, block_size=4)
    ours = engine.beam_search(prompt, BeamSearchParams(num_beams=num_beams, max_tokens=8, length_penalty=length_penalty,
                                                       stop_token_ids=[eos]))
    assert len(ours.outputs) == num_beams
    for output, sequence, score in zip(ours.outputs, expected.sequences, expected.sequences_scores, strict=True):
        assert output.token_ids == sequence[3 : 3 + len(output.token_ids)].tolist()
        assert output.cumulative_logprob / len(output.token_ids) ** length_penalty == pytest.approx(float(score), abs=1e-4)
    assert any(o.finish_reason == "stop" for o in ours.outputs) == (eos_bias > 0)
    assert engine.cache.num_free_blocks == engine.cache.num_blocks - 1


def test_beam_search_parameters_are_validated():
    with pytest.raises(GenerationError, match="num_beams"):
        BeamSearchParams(num_beams=0)
    with pytest.raises(GenerationError, match="num_return"):
        BeamSearchParams(num_beams=2, num_return=3)
    engine = Engine(peaky_model("qwen2"), max_model_len=16)
    with pytest.raises(GenerationError, match="context length"):
        engine.beam_search(list(range(3, 19)), BeamSearchParams())


# ----- command line ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tokenizer = tiny_tokenizer()
    directory = tmp_path_factory.mktemp("chat-model")
    peaky_model("v3", vocab_size=tokenizer.vocab_size, logit_scale=3.0).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_generate_command_streams_the_completion(checkpoint, capsys):
    from nanoseek.cli import main

    assert main(["generate", "--model", str(checkpoint), "--prompt", "Once upon", "--max-tokens", "12", "--stats",
                 "--speculative"]) == 0
    captured = capsys.readouterr()
    tokenizer = tiny_tokenizer()
    engine = Engine(peaky_model("v3", vocab_size=tokenizer.vocab_size, logit_scale=3.0), tokenizer)
    expected = engine.generate("Once upon", SamplingParams(temperature=0, max_tokens=12))[0].outputs[0]
    assert captured.out == expected.text + "\n"
    stats = json.loads(captured.err.strip().splitlines()[-1])
    assert stats["tokens"] == len(expected.token_ids) and "acceptance_rate" in stats
    assert main(["generate", "--model", str(checkpoint), "--prompt", "Hi", "--chat", "--beams", "2",
                 "--max-tokens", "4", "--quantize", "int8"]) == 0


def test_generate_command_reports_bad_input_in_one_line(checkpoint, capsys):
    from nanoseek.cli import main

    assert main(["generate", "--model", str(checkpoint), "--prompt", "x", "--top-p", "0"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("nanoseek generate: error: invalid sampling parameters: top_p") and "Traceback" not in error


def test_chat_command_keeps_turns_and_clears(checkpoint, monkeypatch, capsys):
    import io

    from nanoseek.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\n/clear\nWhat now?\n/exit\n"))
    assert main(["chat", "--model", str(checkpoint), "--max-tokens", "6", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.count("assistant>") == 2 and "(new conversation)" in out


def test_reasoning_is_split_from_the_answer_even_across_deltas():
    from nanoseek.infer.chat import ReasoningSplitter

    splitter = ReasoningSplitter()
    pieces = []
    for delta in ["<thi", "nk>Add 2 and", " 3.</th", "ink>\n", "5", "<", "!"]:
        pieces += list(splitter.feed(delta))
    pieces += list(splitter.flush())
    reasoning = "".join(text for kind, text in pieces if kind == "reasoning")
    answer = "".join(text for kind, text in pieces if kind == "answer")
    assert (reasoning, answer) == ("Add 2 and 3.", "5<!")
    opened = ReasoningSplitter(thinking=True)
    assert list(opened.feed("step</think>done")) == [("reasoning", "step"), ("answer", "done")]


def test_models_that_stay_in_cache_decode_with_single_linear_calls(monkeypatch):
    """An unpacked fp32 model whose weights fit CACHE_RESIDENT_BYTES decodes with F.linear calls instead
    of `linear`'s transposed few-row product (where the fused kernels are not built: with them
    `rows_linear` takes few rows whatever the rule), one up to SINGLE_ROW_RESIDENT_BYTES does so for
    single rows (measurements beside the constants), a bigger one keeps the product. The engine's
    steps set the rule; the tokens are the same."""
    model = peaky_model("v3")
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    seen = []
    original = layers.linear

    def spy(*args):
        seen.append(layers._few_row_start.get())
        return original(*args)

    monkeypatch.setattr(layers, "linear", spy)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outputs = {}
    for resident, single_row, start in [(size, size, layers.FEW_ROWS_NEVER), (0, size, 2), (0, 0, 1)]:
        monkeypatch.setattr(packing, "CACHE_RESIDENT_BYTES", resident)
        monkeypatch.setattr(packing, "SINGLE_ROW_RESIDENT_BYTES", single_row)
        engine = Engine(model, max_num_seqs=1, pack_weights=False)  # packed fp32 weights take their panels
        assert engine.few_row_start == start
        seen.clear()
        outputs[start] = engine.generate([[5, 6, 7]], params)[0].outputs[0].token_ids
        assert seen and all(value == start for value in seen)
    assert outputs[1] == outputs[2] == outputs[layers.FEW_ROWS_NEVER]
    assert layers._few_row_start.get() == 1  # outside the engine's steps: the default


def test_a_process_exits_cleanly_with_a_background_engine_still_decoding():
    """A script that leaves a started engine decoding exits with 0: the engine is closed at exit.
    (Without that, Python ends the daemon thread inside torch at shutdown by unwinding through C++ that
    may not unwind, and the process aborts: 'terminate called without an active exception', 4 of 4.)"""
    script = "\n".join([
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})",
        "from engine_fixtures import peaky_model",
        "from nanoseek.infer import Engine, SamplingParams",
        "engine = Engine(peaky_model('v3'), max_num_seqs=1).start()",
        "handle = engine.submit([5, 6, 7], SamplingParams(max_tokens=250, ignore_eos=True))",
        "next(iter(handle))",
    ])
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "terminate" not in result.stderr, result.stderr[-2000:]
