"""Prefix caching: reused blocks give the tokens a cold engine gives, the pool's accounting holds, stale
keys/values are never reused."""

from __future__ import annotations

import random

import pytest
import torch
from engine_fixtures import peaky_model, single_thread  # noqa: F401 (autouse fixture)

from nanoseek.infer import BeamSearchParams, Engine, SamplingParams
from nanoseek.infer.cache import ROOT_KEY, PagedKVCache, block_key
from nanoseek.model.cache import cache_bytes_per_token

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=0)
BLOCK = 4


@pytest.fixture(scope="module", params=["v3", "qwen2"])
def model(request):
    return peaky_model(request.param)


def decode(engine: Engine, prompts, params=GREEDY):
    return [output.outputs[0] for output in engine.generate(prompts, params)]


def assert_pool_consistent(cache: PagedKVCache) -> None:
    """Every block is in exactly one state: free, cached and evictable, or referenced; keys match blocks."""
    in_use = {block for block in range(1, cache.num_blocks) if cache.refcounts[block] > 0}
    free, evictable = set(cache.free_blocks), set(cache.evictable)
    assert len(free) == len(cache.free_blocks)
    assert not (free & evictable) and not (free & in_use) and not (evictable & in_use)
    assert free | evictable | in_use == set(range(1, cache.num_blocks))
    assert evictable <= set(cache.block_keys)
    assert {cache.cached[key] for key in cache.block_keys.values()} == set(cache.block_keys)


def test_a_repeated_prompt_reuses_its_full_blocks_and_decodes_the_same(model):
    prompt = list(range(3, 30))  # 27 tokens: (27 - 1) // 4 = 6 full blocks may be reused
    cold = decode(Engine(model, block_size=BLOCK, prefix_caching=False), [prompt])[0]
    engine = Engine(model, block_size=BLOCK)
    first = decode(engine, [prompt])[0]
    assert engine.stats.prefix_cache_hits == 0 and engine.stats.prompt_tokens == 27
    second = decode(engine, [prompt])[0]
    assert engine.stats.prefix_cache_hits == 24 and engine.stats.prefix_cache_queries == 54
    assert engine.stats.prompt_tokens == 27 + 3
    for output in (first, second):
        assert output.token_ids == cold.token_ids
        assert output.logprobs == pytest.approx(cold.logprobs, abs=1e-4)
    assert_pool_consistent(engine.cache)


def test_prompts_sharing_a_prefix_reuse_only_its_full_blocks(model):
    system = list(range(40, 50))  # 10 tokens: 2 full blocks in common
    prompts = [system + [7, 8, 9], system + [11, 12, 13, 14, 15, 16, 17]]
    engine = Engine(model, block_size=BLOCK)
    warm = [decode(engine, [prompt])[0] for prompt in prompts]
    assert engine.stats.prefix_cache_hits == 8
    cold = decode(Engine(model, block_size=BLOCK, prefix_caching=False), prompts)
    assert [o.token_ids for o in warm] == [o.token_ids for o in cold]


def test_the_next_chat_turn_reuses_the_previous_answer(model):
    engine = Engine(model, block_size=BLOCK)
    turn = list(range(3, 12))
    answer = decode(engine, [turn])[0].token_ids
    # the answer's last token never ran through the model: the cache holds len(turn + answer) - 1 tokens
    computed = len(turn) + len(answer) - 1
    follow_up = turn + answer + [20, 21, 22]
    warm = decode(engine, [follow_up])[0]
    assert engine.stats.prefix_cache_hits == computed // BLOCK * BLOCK
    cold = decode(Engine(model, block_size=BLOCK, prefix_caching=False), [follow_up])[0]
    assert warm.token_ids == cold.token_ids


def test_a_cache_salt_shares_blocks_only_with_the_same_salt(model):
    prompt = list(range(3, 30))
    engine = Engine(model, block_size=BLOCK)
    salted = [SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, cache_salt=salt) for salt in ("a", "b")]
    outputs = [decode(engine, [prompt], params)[0].token_ids for params in (GREEDY, *salted)]
    assert engine.stats.prefix_cache_hits == 0  # no salt, salt a, salt b: three separate caches
    assert decode(engine, [prompt], salted[1])[0].token_ids == outputs[2]
    assert engine.stats.prefix_cache_hits == 24
    assert outputs[1] == outputs[2] == outputs[0][:4]


def test_changed_weights_forget_every_cached_prefix():
    model = peaky_model("qwen2", seed=3)
    prompt = list(range(3, 30))
    engine = Engine(model, block_size=BLOCK, pack_weights=False)  # a model that keeps changing (packed ones must not)
    decode(engine, [prompt])
    with torch.no_grad():  # as an optimizer step would: in place
        model.model.layers[0].mlp.down_proj.weight.mul_(-1.5)
    after = decode(engine, [prompt])[0]
    assert engine.stats.prefix_cache_hits == 0
    fresh = Engine(model, block_size=BLOCK, prefix_caching=False, pack_weights=False)
    assert after.token_ids == decode(fresh, [prompt])[0].token_ids
    decode(engine, [prompt])  # unchanged weights again: reused
    assert engine.stats.prefix_cache_hits == 24
    engine.reset_prefix_cache()
    decode(engine, [prompt])
    assert engine.stats.prefix_cache_hits == 24 and engine.cache.num_free_blocks == engine.cache.num_blocks - 1


def test_speculative_decoding_reuses_prefixes_with_their_mtp_entries():
    """The reused blocks carry the MTP depth's cache too; the last reused position is computed again
    (its MTP entry depends on the token after it), so drafts and output match a cold engine's."""
    model = peaky_model("v3", logit_scale=4.0)
    prompt = list(range(3, 30))
    cold = Engine(model, block_size=BLOCK, speculative=True, prefix_caching=False)
    engine = Engine(model, block_size=BLOCK, speculative=True)
    expected = decode(cold, [prompt])[0]
    first = decode(engine, [prompt])[0]
    second = decode(engine, [prompt])[0]
    assert engine.stats.prefix_cache_hits == 23
    assert first.token_ids == second.token_ids == expected.token_ids
    assert second.logprobs == pytest.approx(expected.logprobs, abs=1e-4)
    assert engine.stats.spec_draft_tokens == 2 * cold.stats.spec_draft_tokens
    assert engine.stats.spec_accepted_tokens == 2 * cold.stats.spec_accepted_tokens
    # a prompt that leaves the cached one right after a block boundary: the MTP entry at the
    # boundary must be recomputed for the new next token
    other = prompt[:24] + [60, 61, 62]
    entries = []
    for each in (engine, cold):
        handle = each.submit(other, GREEDY)
        each.step()  # the prefill, and the MTP depth over every position but the last
        sequence = each._running[0]
        slots = [sequence.table[p // BLOCK] * BLOCK + p % BLOCK for p in range(sequence.mtp_computed)]
        entries.append([buffer[slots] for buffer in each.cache.layers[model.config.num_hidden_layers]])
        handle.cancel()
    assert engine.stats.prefix_cache_hits == 23 + 23
    for warm_entry, cold_entry in zip(*entries, strict=True):
        torch.testing.assert_close(warm_entry, cold_entry, atol=1e-5, rtol=1e-5)
    assert_pool_consistent(engine.cache)


def test_write_slots_given_as_ints_equal_the_ones_bind_computes():
    """A decode or verify step hands `bind` its write slots and kv_length as ints (`slots_of`); a
    prefill lets it gather them from the positions. Both give the same slots, padding to the null block."""
    cache = PagedKVCache(peaky_model("qwen2").config, num_blocks=8, block_size=BLOCK)
    tables = [[3, 5, 1], [6, 2]]
    starts, counts = [BLOCK * 2 + 1, BLOCK - 1], [2, 3]  # the second row crosses into its second block
    width = max(counts)
    positions = torch.tensor([[0] * (width - c) + list(range(s, s + c)) for s, c in zip(starts, counts, strict=True)])
    valid = torch.tensor([[False] * (width - c) + [True] * c for c in counts])
    cache.bind(tables, positions, valid)
    gathered, read = cache.write_slots.clone(), cache.read_slots.clone()
    assert cache.kv_length is None
    write = []
    for table, start, count in zip(tables, starts, counts, strict=True):
        write += [0] * (width - count) + cache.slots_of(table, start, count)
    cache.bind(tables, positions, valid, write, kv_length=max(s + c for s, c in zip(starts, counts, strict=True)))
    assert torch.equal(cache.write_slots, gathered) and torch.equal(cache.read_slots, read)
    assert cache.kv_length == BLOCK * 2 + 3
    assert gathered.tolist() == [0, 1 * BLOCK + 1, 1 * BLOCK + 2, 6 * BLOCK + BLOCK - 1, 2 * BLOCK, 2 * BLOCK + 1]


def test_a_full_pool_evicts_the_least_recently_released_cached_block():
    config = peaky_model("qwen2").config
    cache = PagedKVCache(config, num_blocks=4, block_size=BLOCK)
    tables = [[cache.allocate()] for _ in range(3)]
    keys = [block_key(ROOT_KEY, [i] * BLOCK) for i in range(3)]
    for table, key in zip(tables, keys, strict=True):
        cache.register(table[0], key)
    for index in (1, 0, 2):  # released in this order: block of key 1 is the oldest
        cache.release(tables[index])
    assert cache.num_free_blocks == 3 and cache.usage == 0
    reused = cache.claim(cache.match_prefix([keys[0]]))
    assert cache.num_free_blocks == 2
    cache.allocate()  # evicts key 1's block (no free block left)
    assert cache.match_prefix([keys[1]]) == [] and cache.match_prefix([keys[2]]) != []
    cache.allocate()  # then key 2's
    assert cache.match_prefix([keys[2]]) == [] and cache.match_prefix([keys[0]]) == reused
    assert_pool_consistent(cache)


def test_random_traffic_on_a_small_pool_matches_a_cold_engine(model):
    """Shared system prompts, follow-ups, n > 1, cancellations and preemptions in a pool that must evict."""
    random_traffic(model, speculative=False)


def test_random_speculative_traffic_matches_a_cold_engine():
    random_traffic(peaky_model("v3", logit_scale=4.0), speculative=True)


def random_traffic(model, speculative: bool) -> None:
    rng = random.Random(0)
    systems = [[rng.randrange(3, 90) for _ in range(rng.randrange(5, 14))] for _ in range(3)]
    prompts = [rng.choice(systems) + [rng.randrange(3, 90) for _ in range(rng.randrange(1, 7))] for _ in range(12)]
    bytes_per_token = cache_bytes_per_token(model.config, torch.float32, include_mtp=speculative)
    pool = 32 if speculative else 48  # tokens: small enough to preempt (drafts take room too)
    engine = Engine(model, block_size=BLOCK, cache_memory=pool * bytes_per_token, max_num_seqs=4, speculative=speculative,
                    max_prefill_tokens=8)  # chunked prefills after partial hits too
    cold = Engine(model, block_size=BLOCK, prefix_caching=False, speculative=speculative)
    for round_ in range(3):
        batch = rng.sample(prompts, 4)
        params = SamplingParams(temperature=0, max_tokens=rng.randrange(3, 9), ignore_eos=True)
        handles = [engine.submit(prompt, params) for prompt in batch]
        grouped = engine.submit(batch[0], SamplingParams(temperature=1.0, max_tokens=4, seed=round_), n=2)
        cancelled = engine.submit(batch[1], params)
        engine.step()
        cancelled.cancel()
        results = [handle.result().outputs[0].token_ids for handle in handles]
        grouped.result()
        assert results == [o.token_ids for o in decode(cold, batch, params)]
        assert_pool_consistent(engine.cache)
    assert engine.stats.prefix_cache_hits > 0 and engine.stats.preemptions > 0
    assert engine.cache.num_free_blocks == engine.cache.num_blocks - 1


def test_beam_search_shares_the_prefix_cache_with_requests(model):
    prompt = list(range(3, 30))
    beams = BeamSearchParams(num_beams=3, max_tokens=6, ignore_eos=True)
    cold = Engine(model, block_size=BLOCK, prefix_caching=False).beam_search(prompt, beams)
    engine = Engine(model, block_size=BLOCK)
    decode(engine, [prompt])
    warm = engine.beam_search(prompt, beams)
    assert engine.stats.prefix_cache_hits == 24
    assert [o.token_ids for o in warm.outputs] == [o.token_ids for o in cold.outputs]
    other = prompt[:-1] + [5, 6, 7, 8, 9]  # 31 tokens: the beam search's 6 full prompt blocks, then new ones
    engine.beam_search(other, beams)
    assert engine.stats.prefix_cache_hits == 24 + 24
    assert_pool_consistent(engine.cache)
