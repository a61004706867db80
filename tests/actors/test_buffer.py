"""TrajectoryBuffer bookkeeping (the Ray-free core; the actor is the same class under ray.remote)."""

import pytest

from actors.buffer import TrajectoryBufferCore


def test_backpressure_when_full():
    buf = TrajectoryBufferCore(capacity=2, max_policy_lag=1)
    assert buf.put(["a"], 0, "generator", "r0") and buf.put(["b"], 0, "critic", "r0")
    assert not buf.put(["c"], 0, "generator", "r0")
    assert buf.summary()["refused_full"] == 1 and buf.depth() == 2


@pytest.mark.parametrize("lag, fresh", [(0, ["v2"]), (1, ["v2", "v1"]), (2, ["v2", "v1", "v0"])])
def test_serves_only_batches_within_the_policy_lag_newest_first_and_counts_stale(lag, fresh):
    buf = TrajectoryBufferCore(capacity=10, max_policy_lag=lag)
    for v in range(3):
        buf.put([f"v{v}"], v, "generator", "r0")
    got = buf.take("generator", 10, learner_version=2)
    assert [ref[0] for ref, _ in got] == fresh
    assert all(meta["lag"] <= lag for _, meta in got)
    assert buf.summary()["dropped_stale"] == 3 - len(fresh)


def test_accounting_is_exact_and_nothing_is_handed_out_twice():
    buf = TrajectoryBufferCore(capacity=100, max_policy_lag=1)
    seen = []
    for step in range(20):
        for i in range(3):
            buf.put([f"{step}-{i}"], step // 4, "generator" if i % 2 else "critic", f"r{i}")
        version = step // 4 + (step % 3 == 0)
        for kind in ("generator", "critic"):
            seen += [ref[0] for ref, _ in buf.take(kind, 2, version)]
    buf.report(trained=len(seen) - 3, lost=2, rejected=1)
    buf.flush()
    s = buf.summary()
    assert len(seen) == len(set(seen)) == s["taken"]
    assert s["accepted"] == s["taken"] + s["dropped_stale"] + s["dropped_at_end"] + s["depth"] == 60
    assert s["taken"] == s["trained"] + s["lost"] + s["rejected"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="capacity"):
        TrajectoryBufferCore(0, 1)
    with pytest.raises(ValueError, match="kind"):
        TrajectoryBufferCore(1, 0).put(["x"], 0, "other", "r0")


def test_newest_admissible_first_and_the_rest_stays_queued_in_order():
    buf = TrajectoryBufferCore(capacity=10, max_policy_lag=2)
    for seq, v in enumerate([0, 1, 1, 2, 3]):
        buf.put([f"v{v}-{seq}"], v, "generator", "r0")
    got = buf.take("generator", 2, learner_version=3)
    assert [ref[0] for ref, _ in got] == ["v3-4", "v2-3"]
    assert [e.ref for e in buf.queues["generator"]] == ["v1-1", "v1-2"]  # v0 is stale (3 - 2 = 1)
    assert buf.summary()["dropped_stale"] == 1 and buf.depth() == 2


def test_auto_capacity_follows_the_demand():
    from actors.buffer import auto_capacity

    assert auto_capacity(per_step=2, max_policy_lag=1, num_actors=1) == 4
    assert auto_capacity(per_step=16, max_policy_lag=0, num_actors=8) == 16
    assert auto_capacity(per_step=2, max_policy_lag=1, num_actors=32) == 32


def test_resumed_counters_keep_the_books_balanced():
    buf = TrajectoryBufferCore(capacity=4, max_policy_lag=1)
    buf.restore_stats({"accepted": 10, "taken": 7, "dropped_stale": 1, "dropped_at_end": 0, "depth": 2,
                       "trained": 7, "refused_full": 3})
    s = buf.summary()
    assert s["accepted"] == s["taken"] + s["dropped_stale"] + s["dropped_at_end"] + s["depth"]
    assert s["refused_full"] == 3 and s["depth"] == 0


def test_the_actor_makes_producers_wait_for_space_and_counts_each_trajectory_once():
    """The async actor's put awaits space (no polling): it lands when a batch is taken, or returns False
    once the buffer closes; ``refused_full`` counts the waiting trajectory once however long it waits."""
    import asyncio

    from actors.buffer import TrajectoryBuffer

    async def scenario():
        buf = TrajectoryBuffer(capacity=1, max_policy_lag=0)
        assert await buf.put(["a"], 0, "generator", "r0")
        waiting = asyncio.create_task(buf.put(["b"], 0, "generator", "r1"))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        assert [ref[0] for ref, _ in await buf.take("generator", 1, 0)] == ["a"]
        assert await asyncio.wait_for(waiting, 1.0)
        late = asyncio.create_task(buf.put(["c"], 0, "critic", "r0"))
        await asyncio.sleep(0.05)
        assert await buf.close() == 1
        assert await asyncio.wait_for(late, 1.0) is False
        return await buf.summary()

    s = asyncio.run(scenario())
    assert s["refused_full"] == 2 and s["accepted"] == 2 and s["dropped_at_end"] == 1
