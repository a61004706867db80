"""The planned rollout fleet at the real call costs (`anyflow-ray bench`, key ``fleet_sim``).

The Stage-2 control plane of ``bench_control`` (the real driver, buffer, registry and learner group, the
model replaced by sleeps) run at the Wan configs' shape: 8 learner ranks and the actors
``rollout.num_actors: auto`` plans (run/fleet_plan.py). A learner rank sleeps its step's forward-equivalents
and an actor its trajectory's network calls, each at the forward time measured for that model on a GPU
(``FORWARD_S``), times ``SCALE`` so that the bench takes seconds. It prints what the plan is for: the
fraction of the time the learner ranks and the rollout GPUs sit idle. The driver's own milliseconds are
not scaled, so they weigh ten times what they would: the learner's idle fraction is an upper bound.
"""

from __future__ import annotations

from anyflow_ray.jobs.bench_control import ideal_steps_per_s, measure_run, sim_overrides, sleep_classes, steps_for

# one two-time forward of one 81-frame clip at 240x416 (8190 tokens), bf16, one H200 (docs/experiments.md,
# `anyflow-ray bench-scale`); one with gradient (checkpointing) measured 4.06x / 3.97x that, which is the
# 4 forward-equivalents run/fleet_plan.py counts
FORWARD_S = {"1.3b": 0.0931, "14b": 0.557}
SCALE = 0.1


def fleet_costs(size: str, scale: float = SCALE) -> dict:
    """(learner ranks, planned actors, seconds per learner step, seconds per trajectory, max_policy_lag)
    of ``configs/wan2.1-t2v-<size>.yaml`` at ``scale`` x the measured forward time."""
    from anyflow_ray.run.config import load_config
    from anyflow_ray.run.fleet_plan import calls_per_clip, fleet_plan

    cfg = load_config(f"configs/wan2.1-t2v-{size}.yaml")
    plan, forward = fleet_plan(cfg), FORWARD_S[size] * scale
    return {"ranks": plan.ranks, "actors": int(cfg.rollout.num_actors), "learner_s": plan.learner_forwards * forward,
            "rollout_s": int(cfg.rollout.batch_size) * calls_per_clip(cfg) * forward,
            "max_policy_lag": int(cfg.distill.max_policy_lag)}


def idle_fractions(steps_per_s: float, costs: dict) -> dict:
    """The share of the time a learner rank and a rollout actor spend not working, at ``steps_per_s``."""
    busy_rollout = steps_per_s * 2 * costs["ranks"] * costs["rollout_s"] / costs["actors"]
    return {"learner_idle": 1 - steps_per_s * costs["learner_s"], "rollout_idle": 1 - busy_rollout}


def simulate_fleet(out_root: str, sizes=("1.3b", "14b"), window_s: float = 15.0, quiet: bool = False) -> dict:
    rows = {}
    for size in sizes:
        costs = fleet_costs(size)
        learner_cls, actor_cls = sleep_classes(costs["rollout_s"], costs["learner_s"])
        ideal = ideal_steps_per_s(costs["actors"], costs["rollout_s"], costs["learner_s"], costs["ranks"])
        steps = steps_for(ideal, window_s)
        overrides = [f"run.output_dir={out_root}", *sim_overrides(costs["actors"], steps, costs["max_policy_lag"],
                                                                  f"{out_root}/{size}", ranks=costs["ranks"])]
        measured = measure_run(overrides, learner_cls, actor_cls, ideal)
        rows[size] = {**costs, "ideal_steps_per_s": ideal, "steps_per_s": measured["steps_per_s"],
                      **idle_fractions(measured["steps_per_s"], costs)}
    if not quiet:
        print_fleet(rows)
    return {"scale": SCALE, "forward_s": FORWARD_S, "by_size": rows}


def print_fleet(rows: dict) -> None:
    print(f"Stage-2 fleet as planned (rollout.num_actors=auto), sleeps at {SCALE:g} x the measured forward times:")
    print(f"  {'model':>5} {'ranks':>5} {'actors':>6} {'step':>7} {'trajectory':>10} {'steps/s':>8} {'ideal':>6} "
          f"{'learner idle':>12} {'rollout idle':>12}")
    for size, row in rows.items():
        print(f"  {size:>5} {row['ranks']:>5d} {row['actors']:>6d} {row['learner_s']:6.2f}s {row['rollout_s']:9.3f}s "
              f"{row['steps_per_s']:8.3f} {row['ideal_steps_per_s']:6.3f} {row['learner_idle']:12.1%} "
              f"{row['rollout_idle']:12.1%}")
    print("  rollout idle: the planned actors are whole GPUs, rounded up from the rollouts' GPU-worth (1.6-1.7 on 2)")
