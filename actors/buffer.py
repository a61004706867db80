"""``TrajectoryBuffer``: an async Ray actor holding ObjectRefs and metadata of trajectories, never payloads.

Rollout actors ``put`` a trajectory (its ObjectRef, wrapped in a list so Ray does not resolve it,
plus metadata with the weight version it used). When the buffer is full the producer *awaits* space
(no polling; the wait ends when the driver takes a batch, or returns False once the buffer closes at
the end of the run). The driver ``take``s the **newest** trajectories no older than
``max_policy_lag`` versions behind the learner (0 = strict on-policy, 1 = one-step-off); older
entries are dropped and counted as stale. Every trajectory accepted is, exactly once, either taken or
dropped; the learner reports those it could not fetch (lost with their actor) or rejected (NaN/Inf,
wrong shape), so the books always balance:

    accepted = taken + dropped_stale + dropped_at_end + depth
    taken = trained + lost + rejected + in flight

``refused_full`` counts trajectories that found the buffer full and had to wait (each once).
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import asdict, dataclass, fields


@dataclass
class Entry:
    ref: object  # ray.ObjectRef of the payload dict
    version: int
    kind: str  # "generator" | "critic"
    producer: str
    seq: int


@dataclass
class BufferStats:
    accepted: int = 0
    refused_full: int = 0
    taken: int = 0
    dropped_stale: int = 0
    lost: int = 0
    rejected: int = 0
    trained: int = 0
    dropped_at_end: int = 0

    def as_dict(self, depth: int) -> dict:
        return {**asdict(self), "depth": depth}


def auto_capacity(per_step: int, max_policy_lag: int, num_actors: int) -> int:
    """Room for every trajectory that can still be used: ``max_policy_lag + 1`` learner steps of demand,
    and at least one finished trajectory per actor (so no actor idles while the learner is busy)."""
    return max(per_step * (max_policy_lag + 1), num_actors, 1)


class TrajectoryBufferCore:
    """The bookkeeping, free of Ray and of waiting (the actor below adds both)."""

    def __init__(self, capacity: int, max_policy_lag: int):
        if capacity < 1 or max_policy_lag < 0:
            raise ValueError(f"capacity={capacity} must be >= 1 and max_policy_lag={max_policy_lag} >= 0")
        self.capacity, self.max_policy_lag = capacity, max_policy_lag
        self.queues: dict[str, deque[Entry]] = {"generator": deque(), "critic": deque()}
        self.stats = BufferStats()
        self._seq = 0

    def depth(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def full(self) -> bool:
        return self.depth() >= self.capacity

    def put(self, wrapped_ref: list, version: int, kind: str, producer: str) -> bool:
        """Accept one trajectory now; False (counted in ``refused_full``) when full."""
        if kind not in self.queues:
            raise ValueError(f"unknown trajectory kind {kind!r}")
        if self.full():
            self.stats.refused_full += 1
            return False
        self._append(wrapped_ref, version, kind, producer)
        return True

    def _append(self, wrapped_ref: list, version: int, kind: str, producer: str) -> None:
        self._seq += 1
        self.queues[kind].append(Entry(wrapped_ref[0], version, kind, producer, self._seq))
        self.stats.accepted += 1

    def take(self, kind: str, n: int, learner_version: int) -> list[tuple[list, dict]]:
        """Up to ``n`` of the newest fresh entries of ``kind`` (version >= learner_version - max_policy_lag);
        every stale entry of ``kind`` is dropped on the way."""
        oldest_ok = learner_version - self.max_policy_lag
        queue = self.queues[kind]
        fresh = [entry for entry in queue if entry.version >= oldest_ok]
        self.stats.dropped_stale += len(queue) - len(fresh)
        fresh.sort(key=lambda e: (e.version, e.seq))
        chosen, kept = fresh[len(fresh) - n:] if n > 0 else [], fresh[:max(0, len(fresh) - n)]
        self.queues[kind] = deque(sorted(kept, key=lambda e: e.seq))
        self.stats.taken += len(chosen)
        return [([e.ref], {"version": e.version, "producer": e.producer, "seq": e.seq,
                           "lag": learner_version - e.version}) for e in reversed(chosen)]

    def report(self, trained: int = 0, lost: int = 0, rejected: int = 0) -> None:
        """The learner's outcome for trajectories it was handed."""
        self.stats.trained += trained
        self.stats.lost += lost
        self.stats.rejected += rejected

    def flush(self) -> int:
        """Drop everything queued (the run is ending); returns how many were dropped."""
        n = self.depth()
        for queue in self.queues.values():
            queue.clear()
        self.stats.dropped_at_end += n
        return n

    def summary(self) -> dict:
        return self.stats.as_dict(self.depth())

    def restore_stats(self, stats: dict) -> None:
        """Continue the counters of a resumed run (its queue starts empty: payloads died with the run)."""
        for f in fields(BufferStats):
            setattr(self.stats, f.name, int(stats.get(f.name, 0)))
        self.stats.dropped_at_end += int(stats.get("depth", 0))  # queued when it stopped: never trained


class TrajectoryBuffer(TrajectoryBufferCore):
    """Run as ``ray.remote(TrajectoryBuffer)``: one async actor per job, shared by all rollout actors.
    Entries leave their queue when taken, so none can be handed out twice."""

    def __init__(self, capacity: int, max_policy_lag: int):
        super().__init__(capacity, max_policy_lag)
        self.closed = False
        self._space: asyncio.Condition | None = None  # made in the actor's event loop

    def _condition(self) -> asyncio.Condition:
        if self._space is None:
            self._space = asyncio.Condition()
        return self._space

    async def put(self, wrapped_ref: list, version: int, kind: str, producer: str) -> bool:
        """Accept one trajectory, awaiting space while full; False once the buffer is closed."""
        if kind not in self.queues:
            raise ValueError(f"unknown trajectory kind {kind!r}")
        space = self._condition()
        async with space:
            if self.full() and not self.closed:
                self.stats.refused_full += 1
                await space.wait_for(lambda: self.closed or not self.full())
            if self.closed:
                return False
            self._append(wrapped_ref, version, kind, producer)
            return True

    async def take(self, kind: str, n: int, learner_version: int) -> list[tuple[list, dict]]:
        space = self._condition()
        async with space:
            out = TrajectoryBufferCore.take(self, kind, n, learner_version)
            space.notify_all()
            return out

    async def close(self) -> int:
        """End of run: drop what is queued and release every waiting producer (their puts return False)."""
        space = self._condition()
        async with space:
            self.closed = True
            dropped = self.flush()
            space.notify_all()
            return dropped

    async def report(self, trained: int = 0, lost: int = 0, rejected: int = 0) -> dict:
        """Book the learner's outcome and return the counters with it in (one round trip: Ray does not
        keep the order of calls to an async actor, so a separate ``summary`` could miss this report)."""
        TrajectoryBufferCore.report(self, trained, lost, rejected)
        return TrajectoryBufferCore.summary(self)

    async def summary(self) -> dict:
        return TrajectoryBufferCore.summary(self)

    async def restore_stats(self, stats: dict) -> None:
        TrajectoryBufferCore.restore_stats(self, stats)
