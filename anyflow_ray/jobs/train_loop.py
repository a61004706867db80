"""The driver loop shared by the teacher and Stage-1 jobs: a LearnerGroup, resume, logging, checkpoints."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from anyflow_ray.jobs.common import log, progress, record_config
from anyflow_ray.jobs.ray_runtime import init_ray
from anyflow_ray.run.logger import MetricsLogger


def run_job(cfg: DictConfig, job: str) -> Path:
    """Teacher or Stage 1 as a job: the run's record decides (refused, nothing left to train, fresh or
    resumed) before anything is written or started, then the learner group trains."""
    from anyflow_ray.jobs.common import prepare
    from anyflow_ray.run.records import JOB_SECTIONS, hold_run

    record, lease = hold_run(cfg, job)  # one writer per folder; refuses a resume that would rewrite its record
    with lease:
        if record.done:
            return record.out
        if record.export_only:  # trained to the budget, killed before its export was complete
            from anyflow_ray.jobs.export import export_finished_run

            return export_finished_run(record.cfg, job, record.out)
        cfg = record.cfg
        section = cfg[JOB_SECTIONS[job][0]]
        out, _, _ = prepare(cfg, record.out, write_config=record.fresh)
        return train_with_learners(cfg, job, out, section.steps, section.save_every, section.log_every,
                                   resume=not record.fresh, lease=lease)


def train_with_learners(cfg: DictConfig, job: str, out: Path, steps: int, save_every: int, log_every: int,
                        resume: bool = True, lease=None) -> Path:
    """Train ``job`` for ``steps`` steps on the learner group; the final EMA model is written to ``out``."""
    from learners.group import LearnerGroup

    cfg = init_ray(cfg)
    group = LearnerGroup(cfg, job)
    logger = None
    try:
        info = group.info[0]
        log.info("%s: %d rank(s) on %s (%s), %d/%d trainable parameters", job, group.num_ranks, info["device"],
                 info["dtype"], info["trainable"], info["total"])
        start = group.call("load_latest", str(out))[0] if resume else 0
        if resume and (warning := group.call("resume_report")):
            print(f"{job}: warning: {warning}", flush=True)
        if start:
            log.info("%s: resumed from %s at step %d", job, out / "checkpoints", start)
        logger = MetricsLogger(out, job, cfg, start=start)
        bar = progress(range(start, steps), initial=start, total=steps, desc=job)
        for step in bar:
            if lease is not None:
                lease.check()  # another run took the folder over: stop writing it
            metrics = group.call("train_step", step)[0]
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
            if (step + 1) % log_every == 0 or step + 1 == steps:
                logger.log(step + 1, {f"{job}/{k}": v for k, v in metrics.items()})
            if (step + 1) % save_every == 0 or step + 1 == steps:
                group.call("save", str(out), step + 1)
                logger.sync()
        logger.close()
        group.call("export_pipeline", str(out), steps)  # rank 0 writes (under ZeRO-3 every rank gathers first)
        if start:  # a resumed run's config (a larger step budget, say) becomes the record once it has trained
            record_config(cfg, out)
    finally:
        if logger is not None:  # a failed run's record reaches storage too
            logger.close()
        group.shutdown()
    log.info("%s: EMA model written to %s", job, out)
    return out
