"""`Engine.stats` is read by the server's metrics scraper from another thread while the engine steps."""

from __future__ import annotations

from engine_fixtures import peaky_model

from nanoseek.infer import Engine, SamplingParams


def test_stats_can_be_read_while_the_engine_steps_in_another_thread():
    engine = Engine(peaky_model("v3"), max_num_seqs=2).start()
    try:
        handles = [engine.submit([3, 4, 5], SamplingParams(max_tokens=20, ignore_eos=True)) for _ in range(8)]
        snapshots = []
        while not all(handle.finished for handle in handles):
            snapshots.append(engine.stats)  # iterating the waiting queue unlocked raced the engine thread
        snapshots[0].finished["stop"] = 99  # a snapshot, not the engine's own counters
        assert engine.stats.finished == {"length": 8}
        assert max(s.num_running for s in snapshots) <= 2
    finally:
        engine.close()
