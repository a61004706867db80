"""`anyflow-ray distill`: Stage 2 as a Ray actor-learner pipeline (docs/method.md §5, DESIGN "Shape").

Rollout actors (``rollout.num_actors``) make trajectories with the current student by backward
simulation and push refs into the TrajectoryBuffer; the driver takes batches no older than
``distill.max_policy_lag`` versions, hands them to the learner group, and every ``distill.sync_every``
steps publishes the student's trainable weights as a new version (``distill.weight_sync``: through the
object store, or a torch.distributed broadcast; see ``weight_sync.py``). With lag 0 the
driver alternates strictly (rollouts with the current version, then a learner step); with lag >= 1
rollouts overlap learning, each actor keeps two rollouts queued, and with the object store the driver
takes step s+1's batch (fresh for the version step s will publish) while the ranks train step s, then
queues the publish and step s+1 behind step s on the ranks: between two steps the learner waits for
neither the driver nor the actors (a save step queues nothing; a rank whose step had a non-finite loss
refuses whatever was queued behind it).
A rollout actor that dies is restarted by Ray and loads the newest weights.
"""

from __future__ import annotations

import collections
import functools
import itertools
import json
import time
import uuid
from pathlib import Path

import ray
from omegaconf import DictConfig, OmegaConf

from anyflow_ray.training import checkpoint as ckpt_io

from anyflow_ray.jobs.common import log, prepare, progress, record_config
from anyflow_ray.jobs.pipeline_metrics import PipelineMetrics
from anyflow_ray.jobs.ray_runtime import init_ray
from anyflow_ray.jobs.weight_sync import make_weight_sync
from anyflow_ray.run.logger import MetricsLogger
from anyflow_ray.run.records import open_run
from anyflow_ray.run.storage import Storage
from anyflow_ray.training.seeds import step_seed


class RolloutFleet:
    """M rollout actors kept busy with generator/critic rollouts; a task lost with its actor is resubmitted."""

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
        self.actors = [remote.options(max_restarts=-1, max_task_retries=0, **_actor_options(cfg, placement, group, i))
                       .remote(plain, f"rollout-{i}", buffer, registry) for i in range(num_actors)]
        self.pending: dict = {}
        # rollout seeds continue where a resumed run left off (at most 64 rollouts per learner step)
        self.seeds = itertools.count(step_seed(cfg.run.seed, start_step, "rollouts"))
        self.kinds = itertools.cycle(["generator", "critic"])
        self.failed_tasks = 0
        self.saw_skipped = False  # a rollout came back unmade: some actor holds no weights yet
        self.produced = 0

    def submit(self, actor_index: int, kind: str | None = None) -> None:
        kind = kind or next(self.kinds)
        ref = self.actors[actor_index].rollout.remote(kind, next(self.seeds))
        self.pending[ref] = (actor_index, kind)

    def keep_busy(self, depth: int = 2) -> None:
        """Up to ``depth`` rollouts queued on each actor: the next one starts the moment the last ends,
        not a driver round trip later."""
        queued = collections.Counter(i for i, _ in self.pending.values())
        for i in range(len(self.actors)):
            for _ in range(depth - queued[i]):
                self.submit(i)

    def wait_any(self, timeout: float) -> None:
        """Until one rollout finishes or ``timeout`` passes (not: until every rollout finishes)."""
        if self.pending:
            ray.wait(list(self.pending), num_returns=1, timeout=timeout)

    def collect(self, timeout: float, resubmit: bool = True) -> list[dict]:
        """Finished rollouts' metadata; a rollout whose actor died is resubmitted (Ray restarts it)."""
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
            except ray.exceptions.RayActorError:
                self.failed_tasks += 1
                log.warning("rollout actor %d died; Ray restarts it with the newest weights", index)
                if resubmit:
                    self.submit(index, kind)
        return out


def _actor_options(cfg: DictConfig, placement, group, index: int) -> dict:
    """Resources of rollout actor ``index``: its own, or a share of learner rank (index mod ranks)'s bundle."""
    if placement is None:  # a fleet built outside a job (tests): CPU only
        return {"num_cpus": float(cfg.rollout.cpus_per_actor)}
    options = {"num_cpus": placement.actor_cpus, "num_gpus": placement.actor_gpus}
    if placement.colocate:
        options["scheduling_strategy"] = group.bundle_strategy(index % placement.num_ranks)
    return options


def run(cfg: DictConfig, worker_cls: type | None = None, actor_cls: type | None = None) -> Path:
    """Stage 2 as a job. ``worker_cls`` / ``actor_cls`` replace the learner rank and the rollout actor
    (the control-plane benchmark runs this very loop with calibrated sleeps in their place)."""
    from actors.buffer import TrajectoryBuffer, auto_capacity
    from actors.weights import WeightRegistry
    from learners.distill import DistillWorker
    from learners.group import LearnerGroup, LearnerGroupError
    from learners.placement import plan

    run_record = open_run(cfg, "distill")  # refuses a resume whose config differs; None left to train: no writes
    if run_record.done:
        return run_record.out
    cfg = run_record.cfg
    dc = cfg.distill
    out, _, _ = prepare(cfg, run_record.out, write_config=run_record.fresh)
    cfg = init_ray(cfg)
    ranks = cfg.distill.num_ranks
    placement = plan(cfg, ranks, cfg.rollout.num_actors)
    group = LearnerGroup(cfg, "distill", num_ranks=ranks, worker_cls=worker_cls or DistillWorker, placement=placement)
    capacity = dc.buffer_capacity or auto_capacity(2 * ranks, dc.max_policy_lag, cfg.rollout.num_actors)
    names = {role: f"anyflow-{role}-{uuid.uuid4().hex[:8]}" for role in ("buffer", "registry")}  # for the actors
    buffer = ray.remote(TrajectoryBuffer).options(num_cpus=0, name=names["buffer"]).remote(capacity, dc.max_policy_lag)
    registry = ray.remote(WeightRegistry).options(num_cpus=0, name=names["registry"]).remote()
    fleet = logger = None
    try:
        start = 0 if run_record.fresh else group.run("load_latest", str(out))[0]
        version, driver_state = _resumed_version(group, out) if start else (0, {})
        if driver_state.get("buffer"):  # the buffer's counters continue the resumed run's
            ray.get(buffer.restore_stats.remote(driver_state["buffer"]))
        sync = make_weight_sync(cfg, group, registry, placement)
        fleet = sync.start(version, lambda: RolloutFleet(cfg, names["buffer"], names["registry"], start, placement,
                                                              group, actor_cls))
        metrics = PipelineMetrics()
        logger = MetricsLogger(out, "distill", cfg)
        logger.add_sink(metrics.record)
        bar = progress(range(start, dc.steps), initial=start, total=dc.steps, desc="distill")
        loop_start, sync_times = time.perf_counter(), []
        overlap = dc.max_policy_lag > 0 and sync.overlaps_learner

        def record(step: int, results: list, counts: dict, reported, **more) -> dict:
            """The books, progress bar and metrics of a finished step."""
            stats = ray.get(reported)
            values = {**results[0], **counts, **more, "buffer_depth": stats["depth"],
                      "failed_rollouts": fleet.failed_tasks, "produced": fleet.produced,
                      **{f"buffer/{k}": v for k, v in stats.items()}}
            bar.set_postfix(loss=f"{values['loss']:.4f}", v=more["version"], depth=stats["depth"], refresh=False)
            if (step + 1) % dc.log_every == 0 or step + 1 == dc.steps:
                logger.log(step + 1, {f"distill/{k}": v for k, v in values.items()})
            return stats

        batch = deferred = queued = None
        gathered_at = time.perf_counter()
        for step in bar:
            fleet.seeds = itertools.count(step_seed(cfg.run.seed, step, "rollouts"))  # per step: exact resume
            if queued is not None:  # submitted during the previous step, queued behind it on the ranks
                refs, t0, queued = queued, gathered_at, None
            else:
                batch = batch or _next_batch(cfg, fleet, buffer, version, group.num_ranks, sync)
                t0 = time.perf_counter()
                refs = group.submit("train_step", step, batch["generator"], batch["critic"])
            if deferred is not None:  # the previous step's records, while this one trains
                deferred()
                deferred = None
            published = version + 1 if (step + 1) % dc.sync_every == 0 else version
            save_now = (step + 1) % dc.save_every == 0 or step + 1 == dc.steps
            # overlap: while the ranks train, take step+1's batch, fresh for the version they will publish,
            # then queue the publish and step+1 behind step s: the ranks go on without a driver round trip.
            # A save step queues nothing (the save must come between the two steps); a rank whose step
            # had a non-finite loss refuses what was queued behind it (learners/distill.py)
            upcoming = (_next_batch(cfg, fleet, buffer, published, group.num_ranks, sync)
                        if overlap and step + 1 < dc.steps else None)
            sync_s = 0.0
            if overlap and published != version:
                t1 = time.perf_counter()
                sync.publish(published, fleet)  # object store: queued, rank 0 runs it after step s
                sync_s = time.perf_counter() - t1
                sync_times.append(sync_s)
            if upcoming is not None and not save_now:
                queued = group.submit("train_step", step + 1, upcoming["generator"], upcoming["critic"])
            try:
                results = group.gather(refs, "train_step")
            except LearnerGroupError as err:
                if not isinstance(err.cause, FloatingPointError):
                    raise
                ray.get(buffer.report.remote(rejected=_size(batch)))
                _stop_on_non_finite(group, buffer, out, step, start, version, err, held=_size(upcoming))
            gathered_at = time.perf_counter()
            learn_s = gathered_at - t0
            counts = {k: sum(r[k] for r in results) for k in ("trained", "lost", "rejected")}
            reported = buffer.report.remote(**counts)  # returns the books with this step in
            if published != version and not overlap:  # lag 0: the next rollouts must see this version
                t1 = time.perf_counter()
                sync.publish(published, fleet)
                sync.finish()
                sync_s = time.perf_counter() - t1
                sync_times.append(sync_s)
            version = published
            books = functools.partial(record, step, results, counts, reported, version=version, learner_step_s=learn_s,
                                      sync_s=sync_s, policy_lag=batch["lag"])
            if save_now:
                stats = books()
                group.run("save", str(out), step + 1, weight_version=version,
                          driver_state={"buffer": _returned(stats, _size(upcoming))})
                logger.sync()
            else:  # the last step always saves, so nothing is left deferred after the loop
                deferred = books
            batch = upcoming
        sync.finish()
        loop_s = time.perf_counter() - loop_start
        _drain(fleet, buffer, float(cfg.learner.timeout_s))
        sync.heal(version, fleet)  # an actor restarted after the last broadcast gets the final version too
        summary = ray.get(buffer.summary.remote())
        summary["learner_steps_per_s"] = (dc.steps - start) / loop_s if loop_s > 0 else 0.0
        summary["actor_versions"] = _actor_versions(fleet, float(cfg.learner.timeout_s))
        _check_loaded_versions(summary["actor_versions"], ray.get(registry.loaded_versions.remote()), version)
        starts = ray.get(registry.start_log.remote())
        summary["restarts"] = len(starts) - len(fleet.actors)
        summary["versions_at_start"] = starts
        summary["loaded_versions"] = ray.get(registry.loaded_versions.remote())
        summary["weight_sync"] = {"backend": sync.name, "publishes": len(sync_times),
                                  "mean_s": sum(sync_times) / max(1, len(sync_times)),  # the driver's wait
                                  "latency_s": sum(sync.times) / max(1, len(sync.times)),  # until actors can pull
                                  "group_reforms": getattr(sync, "reforms", 0)}
        (out / "pipeline_summary.json").write_text(json.dumps(summary, indent=2))
        Storage.of(cfg).upload(out / "pipeline_summary.json")
        logger.close()
        if cfg.distill.zero_stage == 3:  # every rank gathers the EMA weights, rank 0 writes
            group.run("export_pipeline", str(out))
        else:
            group.run_on(0, "export_pipeline", str(out))
        if start:  # a resumed run rewrites its record only now that it has trained
            record_config(cfg, out)
        log.info("distill: buffer accounting %s", summary)
    finally:
        if logger is not None:  # a failed run's record reaches storage too
            logger.close()
        for actor in ([*fleet.actors] if fleet is not None else []) + [buffer, registry]:
            ray.kill(actor, no_restart=True)
        group.shutdown()
    return out


def _next_batch(cfg: DictConfig, fleet: RolloutFleet, buffer, version: int, ranks: int, sync) -> dict:
    """One generator and one critic trajectory per rank, fresh enough for ``max_policy_lag``."""
    need = {"generator": ranks, "critic": ranks}
    if cfg.distill.max_policy_lag == 0:  # strict alternation: rollouts only with the current weights
        fleet.collect(timeout=0)
        for kind, n in need.items():
            for i in range(n):
                fleet.submit(i % len(fleet.actors), kind)
    taken = {"generator": [], "critic": []}
    deadline = time.monotonic() + float(cfg.learner.timeout_s)
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no fresh trajectories for {cfg.learner.timeout_s:.0f}s (rollout actors stuck?)")
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


def _drain(fleet: RolloutFleet, buffer, timeout_s: float) -> None:
    """Stop: close the buffer (what nobody will train on counts as dropped at the end; waiting puts return
    False), then let the rollouts in flight finish."""
    ray.get(buffer.close.remote())
    deadline = time.monotonic() + timeout_s
    while fleet.pending and time.monotonic() < deadline:
        fleet.collect(timeout=0.2, resubmit=False)
    if fleet.pending:
        raise TimeoutError(f"rollout actors did not finish within {timeout_s:.0f}s of the last step")


def _actor_versions(fleet: RolloutFleet, timeout_s: float) -> list[int]:
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


def _size(batch: dict | None) -> int:
    return len(batch["generator"]) + len(batch["critic"]) if batch else 0


def _returned(stats: dict, held: int) -> dict:
    """The books as a checkpoint records them: a batch taken ahead for the next step (overlap) is never
    trained by this run, so it counts as dropped at the end rather than taken."""
    return {**stats, "taken": stats["taken"] - held, "dropped_at_end": stats["dropped_at_end"] + held}


def _stop_on_non_finite(group, buffer, out: Path, step: int, start: int, version: int, err, held: int = 0) -> None:
    """A non-finite loss: nothing of this step was applied or published. Save the last good state
    (unless it is the checkpoint this run resumed from) and stop, naming what happened."""
    if step > start or ckpt_io.find_latest(out) is None:
        stats = ray.get(buffer.summary.remote())  # the failed step's batch is booked as rejected
        group.run("save", str(out), step, weight_version=version, driver_state={"buffer": _returned(stats, held)})
    raise RuntimeError(f"stage 2 stopped at step {step + 1}: {err.cause} The last good state (after {step} "
                       f"steps) is checkpoint {ckpt_io.step_dir(out, step).name} in {out}; nothing of step "
                       f"{step + 1} was applied or published.") from err


def _check_loaded_versions(actor_versions: list[int], reported: dict[str, int], published: int) -> None:
    """What each actor holds must be what it reported loading, and no newer than what was published."""
    for i, version in enumerate(actor_versions):
        if reported.get(f"rollout-{i}", version) != version or not 0 <= version <= published:
            raise RuntimeError(f"rollout-{i} holds weight version {version} but reported "
                               f"{reported.get(f'rollout-{i}')} (published: {published})")


def _resumed_version(group, out: Path) -> tuple[int, dict]:
    """Weight version and driver state (buffer statistics) of the checkpoint the group resumed from."""
    meta = group.run_on(0, "checkpoint_meta", str(out))
    return int(meta["weight_version"]), dict(meta["driver_state"])
