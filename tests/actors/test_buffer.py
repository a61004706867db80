"""TrajectoryBuffer bookkeeping (the Ray-free core; the actor is the same class under ray.remote)."""

import pytest

from actors.buffer import TrajectoryBufferCore


def test_backpressure_when_full():
    buf = TrajectoryBufferCore(capacity=2, max_policy_lag=1)
    assert buf.put(["a"], 0, "generator", "r0") and buf.put(["b"], 0, "critic", "r0")
    assert not buf.put(["c"], 0, "generator", "r0")
    assert buf.summary()["refused_full"] == 1 and buf.depth() == 2


@pytest.mark.parametrize("lag, fresh", [(0, ["v2"]), (1, ["v1", "v2"]), (2, ["v0", "v1", "v2"])])
def test_serves_only_batches_within_the_policy_lag_and_counts_stale(lag, fresh):
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
