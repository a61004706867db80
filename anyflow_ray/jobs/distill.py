"""`anyflow-ray distill`: Stage 2 as a Ray actor-learner pipeline (docs/method.md §5, DESIGN "Shape").

The job wires the parts together: the rollout fleet (actors/fleet.py: ``rollout.num_actors`` actors
making trajectories with the current student into the TrajectoryBuffer), the learner group
(learners/: DeepSpeed ranks training on them) and the weight sync (actors/weights.py: every
``distill.sync_every`` steps a new version through the object store or a torch.distributed broadcast),
and hands them to the ``Driver`` (actors/driver.py), which runs the steps: a lockstep step with
``max_policy_lag`` 0 (rollouts with the current version, then a learner step, then the publish) or when
the transport must be awaited; an overlapped step otherwise (each actor keeps two rollouts queued; the
driver takes step s+1's batch while the ranks train step s and queues the publish and step s+1 behind
it, so between two steps the learner waits for neither the driver nor the actors). A rollout actor that
dies is restarted by Ray and loads the newest weights.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import ray
from omegaconf import DictConfig

from actors.driver import Driver, resumed_version
from actors.fleet import RolloutFleet
from anyflow_ray.jobs.common import log, prepare, progress, record_config
from anyflow_ray.jobs.pipeline_metrics import PipelineMetrics
from anyflow_ray.jobs.ray_runtime import init_ray
from anyflow_ray.run.logger import MetricsLogger
from anyflow_ray.run.records import hold_run
from anyflow_ray.run.storage import Storage


def run(cfg: DictConfig, worker_cls: type | None = None, actor_cls: type | None = None) -> Path:
    """Stage 2 as a job. ``worker_cls`` / ``actor_cls`` replace the learner rank and the rollout actor
    (the control-plane benchmark runs this very loop with calibrated sleeps in their place)."""
    run_record, lease = hold_run(cfg, "distill")  # one writer per folder; refuses a resume whose config differs
    with lease:
        return _run(run_record, lease, worker_cls, actor_cls)


def _run(run_record, lease, worker_cls, actor_cls) -> Path:
    from actors.buffer import TrajectoryBuffer, auto_capacity
    from actors.weights import WeightRegistry, make_weight_sync
    from learners.distill import DistillWorker
    from learners.group import LearnerGroup
    from learners.placement import plan

    if run_record.done:
        return run_record.out
    if run_record.export_only:  # trained to the budget, killed before its export was complete
        from anyflow_ray.jobs.export import export_finished_run

        return export_finished_run(run_record.cfg, "distill", run_record.out)
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
        start = 0 if run_record.fresh else group.call("load_latest", str(out))[0]
        if not run_record.fresh and (warning := group.call("resume_report")):
            print(f"distill: warning: {warning}", flush=True)
        version, driver_state = resumed_version(group, out) if start else (0, {})
        if start:
            log.info("distill: resumed from %s at step %d (weight version %d, buffer books %s)",
                     out / "checkpoints", start, version, driver_state.get("buffer", {}))
        if driver_state.get("buffer"):  # the buffer's counters continue the resumed run's
            ray.get(buffer.restore_stats.remote(driver_state["buffer"]))
        sync = make_weight_sync(cfg, group, registry, placement)
        fleet = sync.start(version, lambda: RolloutFleet(cfg, names["buffer"], names["registry"], start, placement,
                                                              group, actor_cls))
        metrics = PipelineMetrics()
        logger = MetricsLogger(out, "distill", cfg, start=start)
        logger.add_sink(metrics.record)
        driver = Driver(cfg, group, fleet, buffer, sync, out, logger, start, version, progress, on_step=lease.check)
        loop_start = time.perf_counter()
        driver.run()
        summary = driver.wind_down(registry, time.perf_counter() - loop_start)
        (out / "pipeline_summary.json").write_text(json.dumps(summary, indent=2))
        Storage.of(cfg).upload(out / "pipeline_summary.json")
        logger.close()
        group.call("export_pipeline", str(out), dc.steps)  # rank 0 writes (under ZeRO-3 every rank gathers first)
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
