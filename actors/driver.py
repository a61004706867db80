"""``Driver``: the Stage-2 step loop over the parts the job (anyflow_ray/jobs/distill.py) hands it.

It drives the rollout fleet (actors/fleet.py), the trajectory buffer, a weight transport
(actors/weights.py, behind ``anyflow_ray.run.weight_sync.WeightSync``) and a learner group it is given
(learners/ is never imported here: the group's ``call`` / ``submit`` / ``gather`` / ``error`` are all it uses).

Two kinds of step, chosen once per run: a lockstep step with ``max_policy_lag`` 0 (rollouts with the
current version, then a learner step, then the publish) or when the transport must be awaited; an
overlapped step otherwise (each actor keeps two rollouts queued; the driver takes step s+1's batch while
the ranks train step s and queues the publish and step s+1 behind it, so between two steps the learner
waits for neither the driver nor the actors). Both publish, book, log, save and stop on a non-finite
loss through the same code; ``resumed_version`` and ``Driver.wind_down`` are the run's two ends.
"""

from __future__ import annotations

import functools
import itertools
import time
from pathlib import Path

import ray
from omegaconf import DictConfig

from actors.fleet import RolloutFleet, actor_versions, check_loaded_versions, drain, next_batch
from anyflow_ray.training import checkpoint as ckpt_io
from anyflow_ray.training.seeds import step_seed


class Driver:
    """The step loop of one run: a lockstep step (``max_policy_lag`` 0, or a transport the driver must
    await) or an overlapped one; both book, log and save through the same code. ``progress`` makes the
    progress bar over the steps (the job's: ``progress(range(start, steps), initial=, total=, desc=)``)."""

    def __init__(self, cfg: DictConfig, group, fleet: RolloutFleet, buffer, sync, out: Path, logger, start: int,
                 version: int, progress, on_step=None):
        self.cfg, self.dc, self.group, self.fleet, self.buffer, self.sync = cfg, cfg.distill, group, fleet, buffer, sync
        self.out, self.logger, self.start, self.version = out, logger, start, version
        self.overlap = self.dc.max_policy_lag > 0 and sync.overlaps_learner
        self.bar = progress(range(start, self.dc.steps), initial=start, total=self.dc.steps, desc="distill")
        self.sync_times: list[float] = []  # the driver's wait per publish
        self.batch = None  # overlap: the batch of the next step, taken while the ranks trained this one
        self.queued = None  # overlap: the next step's refs, queued on the ranks behind this one
        self.deferred = None  # the previous step's books, written while this one trains
        self.gathered_at = time.perf_counter()
        self.on_step = on_step  # called before each step (the job's: its run lease is still held)

    def run(self) -> None:
        step_once = self.overlapped_step if self.overlap else self.lockstep_step
        for step in self.bar:
            if self.on_step is not None:
                self.on_step()
            self.fleet.seeds = itertools.count(step_seed(self.cfg.run.seed, step, "rollouts"))  # exact resume
            step_once(step)
        self.sync.finish()

    def lockstep_step(self, step: int) -> None:
        """A fresh batch (with lag 0: rollouts made with the current version only), the learner step, then
        the publish, awaited: the next step's rollouts see the new version."""
        batch = next_batch(self.cfg, self.fleet, self.buffer, self.version, self.group.num_ranks, self.sync)
        t0 = time.perf_counter()
        refs = self.group.submit("train_step", step, batch["generator"], batch["critic"])
        self._write_deferred()
        results = self._gather(refs, step, batch, upcoming=None)
        learn_s = time.perf_counter() - t0
        published, sync_s = self._published(step), 0.0
        reported = self._report(results)
        if published != self.version:
            sync_s = self._publish(published, wait=True)
        self.version = published
        self._book(step, results, reported, batch, learn_s, sync_s, upcoming=None)

    def overlapped_step(self, step: int) -> None:
        """While the ranks train step s, take step s+1's batch (fresh for the version step s publishes),
        then queue the publish and step s+1 behind step s on the ranks: the learner waits for neither the
        driver nor the actors. A save step queues nothing (the save comes between the two steps); a rank
        whose step had a non-finite loss refuses what was queued behind it (learners/distill.py)."""
        if self.queued is not None:  # submitted during the previous step, queued behind it on the ranks
            refs, t0, self.queued = self.queued, self.gathered_at, None
        else:
            self.batch = self.batch or next_batch(self.cfg, self.fleet, self.buffer, self.version,
                                                  self.group.num_ranks, self.sync)
            t0 = time.perf_counter()
            refs = self.group.submit("train_step", step, self.batch["generator"], self.batch["critic"])
        self._write_deferred()
        published, sync_s = self._published(step), 0.0
        upcoming = (next_batch(self.cfg, self.fleet, self.buffer, published, self.group.num_ranks, self.sync)
                    if step + 1 < self.dc.steps else None)
        if published != self.version:
            sync_s = self._publish(published, wait=False)  # object store: queued, rank 0 runs it after step s
        if upcoming is not None and not self._saves(step):
            self.queued = self.group.submit("train_step", step + 1, upcoming["generator"], upcoming["critic"])
        results = self._gather(refs, step, self.batch, upcoming)
        self.gathered_at = time.perf_counter()
        reported = self._report(results)
        self.version = published
        self._book(step, results, reported, self.batch, self.gathered_at - t0, sync_s, upcoming)
        self.batch = upcoming

    def wind_down(self, registry, loop_s: float) -> dict:
        """After the last step: the buffer closed and the rollouts in flight drained, a restarted actor
        brought up to the final version, the versions the actors hold checked against what they reported
        loading; returns the run's pipeline summary (the buffer's books, throughput, restarts, sync times)."""
        fleet, sync, version, timeout_s = self.fleet, self.sync, self.version, float(self.cfg.learner.timeouts.step)
        drain(fleet, self.buffer, timeout_s)
        sync.heal(version, fleet)  # an actor restarted after the last broadcast gets the final version too
        summary = ray.get(self.buffer.summary.remote())
        summary["learner_steps_per_s"] = (self.dc.steps - self.start) / loop_s if loop_s > 0 else 0.0
        summary["actor_versions"] = actor_versions(fleet, timeout_s)
        check_loaded_versions(summary["actor_versions"], ray.get(registry.loaded_versions.remote()), version)
        starts = ray.get(registry.start_log.remote())
        summary["restarts"] = len(starts) - len(fleet.actors)
        summary["versions_at_start"] = starts
        summary["loaded_versions"] = ray.get(registry.loaded_versions.remote())
        summary.update(fleet.books())
        summary["weight_sync"] = {"backend": sync.name, "publishes": len(self.sync_times),
                                  "mean_s": sum(self.sync_times) / max(1, len(self.sync_times)),  # the driver's wait
                                  "latency_s": sum(sync.times) / max(1, len(sync.times)),  # until actors can pull
                                  "group_reforms": getattr(sync, "reforms", 0)}
        return summary

    # -- shared by both -----------------------------------------------------------------------------------
    def _published(self, step: int) -> int:
        return self.version + 1 if (step + 1) % self.dc.sync_every == 0 else self.version

    def _saves(self, step: int) -> bool:
        return (step + 1) % self.dc.save_every == 0 or step + 1 == self.dc.steps

    def _publish(self, version: int, wait: bool) -> float:
        t1 = time.perf_counter()
        self.sync.publish(version, self.fleet)
        if wait:
            self.sync.finish()
        self.sync_times.append(time.perf_counter() - t1)
        return self.sync_times[-1]

    def _gather(self, refs: list, step: int, batch: dict, upcoming: dict | None) -> list:
        """The ranks' results; a non-finite loss saves the last good state and stops the run, naming it."""
        try:
            return self.group.gather(refs, "train_step")
        except self.group.error as err:
            if not isinstance(err.cause, FloatingPointError):
                raise
            ray.get(self.buffer.report.remote(rejected=batch_size(batch)))
            stop_on_non_finite(self.group, self.buffer, self.out, step, self.start, self.version, err,
                               held=batch_size(upcoming))

    def _report(self, results: list):
        """The step's counts into the buffer's books (a ref: the books with this step in)."""
        self.counts = {k: sum(r[k] for r in results) for k in ("trained", "lost", "rejected")}
        return self.buffer.report.remote(**self.counts)

    def _book(self, step: int, results: list, reported, batch: dict, learn_s: float, sync_s: float,
              upcoming: dict | None) -> None:
        """A save step books, logs and saves now; any other step's books wait for the next step's start."""
        books = functools.partial(self._record, step, results, dict(self.counts), reported, version=self.version,
                                  learner_step_s=learn_s, sync_s=sync_s, policy_lag=batch["lag"])
        if self._saves(step):
            stats = books()
            self.group.call("save", str(self.out), step + 1, weight_version=self.version,
                            driver_state={"buffer": returned(stats, batch_size(upcoming))})
            self.logger.sync()
        else:  # the last step always saves, so nothing is left deferred after the loop
            self.deferred = books

    def _write_deferred(self) -> None:
        if self.deferred is not None:
            self.deferred()
            self.deferred = None

    def _record(self, step: int, results: list, counts: dict, reported, **more) -> dict:
        """The books, progress bar and metrics of a finished step."""
        stats = ray.get(reported)
        values = {**results[0], **counts, **more, "buffer_depth": stats["depth"],
                  "failed_rollouts": self.fleet.failed_tasks, "rollout_errors": self.fleet.rollout_errors,
                  "produced": self.fleet.produced,
                  **{f"buffer/{k}": v for k, v in stats.items()}}
        self.bar.set_postfix(loss=f"{values['loss']:.4f}", v=more["version"], depth=stats["depth"], refresh=False)
        if (step + 1) % self.dc.log_every == 0 or step + 1 == self.dc.steps:
            self.logger.log(step + 1, {f"distill/{k}": v for k, v in values.items()})
        return stats


def batch_size(batch: dict | None) -> int:
    return len(batch["generator"]) + len(batch["critic"]) if batch else 0


def returned(stats: dict, held: int) -> dict:
    """The books as a checkpoint records them: a batch taken ahead for the next step (overlap) is never
    trained by this run, so it counts as dropped at the end rather than taken."""
    return {**stats, "taken": stats["taken"] - held, "dropped_at_end": stats["dropped_at_end"] + held}


def stop_on_non_finite(group, buffer, out: Path, step: int, start: int, version: int, err, held: int = 0) -> None:
    """A non-finite loss: nothing of this step was applied or published. Save the last good state
    (unless it is the checkpoint this run resumed from) and stop, naming what happened."""
    if step > start or ckpt_io.find_latest(out) is None:
        stats = ray.get(buffer.summary.remote())  # the failed step's batch is booked as rejected
        group.call("save", str(out), step, weight_version=version, driver_state={"buffer": returned(stats, held)})
    raise RuntimeError(f"stage 2 stopped at step {step + 1}: {err.cause} The last good state (after {step} "
                       f"steps) is checkpoint {ckpt_io.step_dir(out, step).name} in {out}; nothing of step "
                       f"{step + 1} was applied or published.") from err


def resumed_version(group, out: Path) -> tuple[int, dict]:
    """Weight version and driver state (buffer statistics) of the checkpoint the group resumed from."""
    meta = group.call("checkpoint_meta", str(out))
    return int(meta["weight_version"]), dict(meta["driver_state"])
