"""``TrajectoryBuffer``: a Ray actor holding ObjectRefs and metadata of trajectories, never payloads.

Rollout actors ``put`` a trajectory (its ObjectRef, wrapped in a list so Ray does not resolve it,
plus metadata with the weight version it used). The driver ``take``s batches no older than
``max_policy_lag`` versions behind the learner (0 = strict on-policy, 1 = one-step-off); older
entries are dropped and counted as stale. The buffer is bounded: ``put`` refuses when full
(backpressure; the producer retries later). Every trajectory accepted is, exactly once, either taken
or dropped as stale; the learner reports those it could not fetch (lost with their actor) or
rejected (NaN/Inf, wrong shape), so the books always balance:

    accepted = taken + dropped_stale + dropped_at_end + depth
    taken = trained + lost + rejected + in flight
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


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
        return {"accepted": self.accepted, "refused_full": self.refused_full, "taken": self.taken,
                "dropped_stale": self.dropped_stale, "lost": self.lost, "rejected": self.rejected,
                "trained": self.trained, "dropped_at_end": self.dropped_at_end, "depth": depth}


class TrajectoryBufferCore:
    """The bookkeeping, free of Ray (the actor below wraps it)."""

    def __init__(self, capacity: int, max_policy_lag: int):
        if capacity < 1 or max_policy_lag < 0:
            raise ValueError(f"capacity={capacity} must be >= 1 and max_policy_lag={max_policy_lag} >= 0")
        self.capacity, self.max_policy_lag = capacity, max_policy_lag
        self.queues: dict[str, deque[Entry]] = {"generator": deque(), "critic": deque()}
        self.stats = BufferStats()
        self._seq = 0

    def depth(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def put(self, wrapped_ref: list, version: int, kind: str, producer: str) -> bool:
        """Accept one trajectory; False when full (the producer should retry later)."""
        if kind not in self.queues:
            raise ValueError(f"unknown trajectory kind {kind!r}")
        if self.depth() >= self.capacity:
            self.stats.refused_full += 1
            return False
        self._seq += 1
        self.queues[kind].append(Entry(wrapped_ref[0], version, kind, producer, self._seq))
        self.stats.accepted += 1
        return True

    def take(self, kind: str, n: int, learner_version: int) -> list[tuple[list, dict]]:
        """Up to ``n`` oldest fresh entries of ``kind`` (version >= learner_version - max_policy_lag)."""
        queue, out = self.queues[kind], []
        oldest_ok = learner_version - self.max_policy_lag
        while queue and len(out) < n:
            entry = queue.popleft()
            if entry.version < oldest_ok:
                self.stats.dropped_stale += 1
                continue
            self.stats.taken += 1
            out.append(([entry.ref], {"version": entry.version, "producer": entry.producer, "seq": entry.seq,
                                      "lag": learner_version - entry.version}))
        return out

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


class TrajectoryBuffer(TrajectoryBufferCore):
    """Run as ``ray.remote(TrajectoryBuffer)``: one instance per job, shared by all rollout actors.
    Entries leave their queue when taken, so none can be handed out twice."""
