"""``RolloutFleet``: the Stage-2 driver's side of the rollout actors (actors/rollout.py).

M actors kept busy with generator and critic rollouts (a task lost with its actor is resubmitted; Ray
restarts the actor, which loads the newest weights; a rollout that raises is booked as failed with its
error's first line and resubmitted, an actor that fails ``rollout.failures_before_restart`` in a row is
restarted, and after ``rollout.restarts_on_error`` such restarts retired; the run stops, naming the
error, only when every actor is retired), batches taken from the trajectory buffer no older
than ``distill.max_policy_lag`` versions, and the end of a run: the buffer closed, the rollouts in flight
drained, the weight versions the actors hold checked against what they reported. The learner group is
the job's (anyflow_ray/jobs/distill.py); a colocated fleet only asks it for a rank's bundle.
"""

from __future__ import annotations

import collections
import itertools
import logging
import time

import ray
from omegaconf import DictConfig, OmegaConf

from anyflow_ray.training.seeds import step_seed

log = logging.getLogger("anyflow_ray")


class RolloutFleetError(RuntimeError):
    """Every rollout actor is retired: none can make any more trajectories."""


class RolloutFleet:
    """M rollout actors kept busy with generator/critic rollouts; a task lost with its actor, or one that
    raised, is resubmitted."""

    def __init__(self, cfg: DictConfig, buffer: str, registry: str, start_step: int = 0, placement=None, group=None,
                 actor_cls: type | None = None):
        """``buffer`` and ``registry`` are the names of those (named) actors: Ray keeps actor-handle
        arguments of a restartable actor's constructor in the object store and logs an error for each."""
        from actors.rollout import RolloutActor

        plain = OmegaConf.to_container(cfg, resolve=True)
        # weight-sync calls get a concurrency group of their own, so they are served while a rollout
        # waits for buffer space (actors/rollout.py)
        remote = ray.remote(concurrency_groups={"weights": 1})(actor_cls or RolloutActor)
        num_actors = cfg.rollout.num_actors
        self.actors = [remote.options(max_restarts=-1, max_task_retries=0, **actor_options(cfg, placement, group, i))
                       .remote(plain, f"rollout-{i}", buffer, registry) for i in range(num_actors)]
        self.pending: dict = {}
        # rollout seeds continue where a resumed run left off (at most 64 rollouts per learner step)
        self.seeds = itertools.count(step_seed(cfg.run.seed, start_step, "rollouts"))
        self.kinds = itertools.cycle(["generator", "critic"])
        self.failed_tasks = 0  # rollouts lost with their actor
        self.errors: collections.Counter = collections.Counter()  # failed rollouts by their error's first line
        self.streak = [0] * num_actors  # consecutive failed rollouts per actor
        self.error_restarts = [0] * num_actors
        self.retired: set[int] = set()
        self.failures_before_restart = int(cfg.rollout.failures_before_restart)
        self.restarts_on_error = int(cfg.rollout.restarts_on_error)
        self.saw_skipped = False  # a rollout came back unmade: some actor holds no weights yet
        self.produced = 0

    @property
    def rollout_errors(self) -> int:
        return sum(self.errors.values())

    def submit(self, actor_index: int, kind: str | None = None) -> None:
        """One rollout on actor ``actor_index`` (the next actor still in service if that one is retired)."""
        kind = kind or next(self.kinds)
        live = [i for i in range(len(self.actors)) if i not in self.retired]
        actor_index = actor_index if actor_index not in self.retired else live[actor_index % len(live)]
        ref = self.actors[actor_index].rollout.remote(kind, next(self.seeds))
        self.pending[ref] = (actor_index, kind)

    def keep_busy(self, depth: int = 2) -> None:
        """Up to ``depth`` rollouts queued on each actor: the next one starts the moment the last ends,
        not a driver round trip later."""
        queued = collections.Counter(i for i, _ in self.pending.values())
        for i in range(len(self.actors)):
            for _ in range(0 if i in self.retired else depth - queued[i]):
                self.submit(i)

    def wait_any(self, timeout: float) -> None:
        """Until one rollout finishes or ``timeout`` passes (not: until every rollout finishes)."""
        if self.pending:
            ray.wait(list(self.pending), num_returns=1, timeout=timeout)

    def collect(self, timeout: float, resubmit: bool = True) -> list[dict]:
        """Finished rollouts' metadata; a rollout whose actor died (Ray restarts it) or that raised is
        resubmitted. Raises ``RolloutFleetError`` once every actor is retired."""
        if not self.pending:
            return []
        done, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=timeout)
        out = []
        for ref in done:
            index, kind = self.pending.pop(ref)
            try:
                result = ray.get(ref)
                if result.get("closed"):  # the run is ending: the buffer took nothing
                    continue
                if result.get("skipped"):  # a restarted actor waiting for collective weights
                    self.saw_skipped = True
                    if resubmit:
                        self.submit(index, kind)
                    continue
                out.append(result)
                self.produced += 1
                self.streak[index] = 0
            except ray.exceptions.RayActorError:
                self.failed_tasks += 1
                log.warning("rollout actor %d died; Ray restarts it with the newest weights", index)
                if resubmit:
                    self.submit(index, kind)
            except ray.exceptions.RayTaskError as err:  # the rollout raised (out of memory, I/O, ...)
                self._failed(index, first_line(err))
                if resubmit:
                    self.submit(index, kind)
        return out

    def _failed(self, index: int, error: str) -> None:
        """Book a rollout that raised; restart or retire its actor after a run of failures."""
        self.errors[error] += 1
        self.streak[index] += 1
        log.warning("rollout actor %d: rollout failed (%d in a row): %s", index, self.streak[index], error)
        if self.streak[index] < self.failures_before_restart or index in self.retired:
            return
        self.streak[index] = 0
        if self.error_restarts[index] < self.restarts_on_error:
            self.error_restarts[index] += 1
            log.warning("rollout actor %d: restarting it after %d failed rollouts in a row", index,
                        self.failures_before_restart)
            ray.kill(self.actors[index], no_restart=False)  # Ray restarts it; it loads the newest weights
            return
        self.retired.add(index)
        log.error("rollout actor %d retired: %d failed rollouts in a row after %d restarts (%s)", index,
                  self.failures_before_restart, self.restarts_on_error, error)
        if len(self.retired) == len(self.actors):
            raise RolloutFleetError(
                f"every rollout actor failed {self.failures_before_restart} rollouts in a row after "
                f"{self.restarts_on_error} restart(s) (rollout.failures_before_restart, rollout.restarts_on_error); "
                f"no actor can make trajectories. Last error: {error}; failed rollouts by error: {dict(self.errors)}")

    def books(self) -> dict:
        """The fleet's side of the run's books: rollouts lost with an actor, failed rollouts by error,
        retired actors."""
        return {"failed_rollouts": self.failed_tasks, "rollout_errors": dict(self.errors),
                "retired_actors": sorted(self.retired)}


def first_line(err: Exception) -> str:
    """``Type: first line`` of what a rollout raised (the cause inside Ray's task error)."""
    cause = getattr(err, "cause", None) or err
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}"[:300]


def actor_options(cfg: DictConfig, placement, group, index: int) -> dict:
    """Resources of rollout actor ``index``: its own, or a share of learner rank (index mod ranks)'s bundle."""
    if placement is None:  # a fleet built outside a job (tests): CPU only
        return {"num_cpus": float(cfg.rollout.cpus_per_actor)}
    options = {"num_cpus": placement.actor_cpus, "num_gpus": placement.actor_gpus}
    if placement.colocate:
        options["scheduling_strategy"] = group.bundle_strategy(index % placement.num_ranks)
    return options


def next_batch(cfg: DictConfig, fleet: RolloutFleet, buffer, version: int, ranks: int, sync) -> dict:
    """One generator and one critic trajectory per rank, fresh enough for ``max_policy_lag``."""
    need = {"generator": ranks, "critic": ranks}
    if cfg.distill.max_policy_lag == 0:  # strict alternation: rollouts only with the current weights
        fleet.collect(timeout=0)
        for kind, n in need.items():
            for i in range(n):
                fleet.submit(i % len(fleet.actors), kind)
    taken = {"generator": [], "critic": []}
    deadline = time.monotonic() + float(cfg.learner.timeouts.step)
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no fresh trajectories for {cfg.learner.timeouts.step:.0f}s (learner.timeouts.step; rollout actors stuck?)")
        fleet.collect(timeout=0)
        if cfg.distill.max_policy_lag > 0:
            fleet.keep_busy()
        sync.heal(version, fleet)
        missing = {kind: need[kind] - len(taken[kind]) for kind in need if len(taken[kind]) < need[kind]}
        for kind, got in zip(missing, ray.get([buffer.take.remote(k, n, version) for k, n in missing.items()])):
            taken[kind] += got
        if all(len(taken[k]) >= need[k] for k in need):
            break
        fleet.wait_any(timeout=0.05)  # until a rollout lands (its trajectory is in the buffer) or 50 ms
    lags = [meta["lag"] for kind in taken for _, meta in taken[kind]]
    return {"generator": [ref for ref, _ in taken["generator"]], "critic": [ref for ref, _ in taken["critic"]],
            "lag": max(lags)}


def drain(fleet: RolloutFleet, buffer, timeout_s: float) -> None:
    """Stop: close the buffer (what nobody will train on counts as dropped at the end; waiting puts return
    False), then let the rollouts in flight finish."""
    ray.get(buffer.close.remote())
    deadline = time.monotonic() + timeout_s
    while fleet.pending and time.monotonic() < deadline:
        fleet.collect(timeout=0.2, resubmit=False)
    if fleet.pending:
        raise TimeoutError(f"rollout actors did not finish within {timeout_s:.0f}s of the last step")


def actor_versions(fleet: RolloutFleet, timeout_s: float) -> list[int]:
    """The weight version each actor holds, waiting (bounded) for actors that Ray is restarting."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get([a.current_version.remote() for a in fleet.actors],
                           timeout=max(1.0, deadline - time.monotonic()))
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def check_loaded_versions(actor_versions: list[int], reported: dict[str, int], published: int) -> None:
    """What each actor holds must be what it reported loading, and no newer than what was published."""
    for i, version in enumerate(actor_versions):
        if reported.get(f"rollout-{i}", version) != version or not 0 <= version <= published:
            raise RuntimeError(f"rollout-{i} holds weight version {version} but reported "
                               f"{reported.get(f'rollout-{i}')} (published: {published})")
