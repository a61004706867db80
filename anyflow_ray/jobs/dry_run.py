"""``anyflow-ray teacher|pretrain|distill --dry-run``: the per-GPU memory plan, checked before any GPU is asked for.

It also prints what one checkpoint save writes and the stage's export (``anyflow_ray/run/checkpoint_plan.py``).
The plan (``anyflow_ray/run/memory_plan.py``) is built from the architecture on the meta device; a plan
above ``run.gpu_memory_gb`` raises ``MemoryPlanError``, which the CLI turns into a non-zero exit.
"""

from __future__ import annotations

from omegaconf import DictConfig

from anyflow_ray.run.memory_plan import MemoryPlan, memory_plan, usable_gib


def run(cfg: DictConfig, job: str) -> MemoryPlan:
    """Print ``job``'s memory plan; raise MemoryPlanError when it does not fit."""
    from anyflow_ray.run.checkpoint_plan import report

    plan = memory_plan(cfg, job)
    print(plan.table())
    print(report(cfg, job))
    if job == "distill":
        from anyflow_ray.run.fleet_plan import fleet_plan

        print(fleet_plan(cfg).report(int(cfg.rollout.num_actors)))
    plan.check()
    print(f"plan fits: {plan.total / 2**30:.1f} GiB of the {usable_gib(cfg.run.gpu_memory_gb):.1f} GiB a "
          f"{cfg.run.gpu_memory_gb:g} GB GPU leaves (dry run: nothing trained)")
    return plan
