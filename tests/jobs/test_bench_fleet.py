"""The fleet bench's arithmetic: sleeps from the plan's call counts at the measured forward times."""

import pytest

from anyflow_ray.jobs.bench_fleet import FORWARD_S, SCALE, fleet_costs, idle_fractions
from anyflow_ray.run.config import load_config
from anyflow_ray.run.fleet_plan import calls_per_clip, learner_forwards


def test_the_sleeps_are_the_plans_calls_at_the_measured_forward_time():
    cfg = load_config("configs/wan2.1-t2v-14b.yaml")
    costs = fleet_costs("14b")
    assert (costs["ranks"], costs["actors"]) == (8, 2) and costs["max_policy_lag"] == cfg.distill.max_policy_lag
    assert costs["learner_s"] == pytest.approx(learner_forwards(cfg) * FORWARD_S["14b"] * SCALE)
    assert costs["rollout_s"] == pytest.approx(cfg.rollout.batch_size * calls_per_clip(cfg) * FORWARD_S["14b"] * SCALE)


def test_idle_fractions_at_the_learners_top_rate():
    costs = {"ranks": 8, "actors": 2, "learner_s": 1.0, "rollout_s": 0.1}
    idle = idle_fractions(1.0, costs)  # the learner never waits; the actors make 16 x 0.1 s in 2 x 1 s
    assert idle["learner_idle"] == pytest.approx(0.0) and idle["rollout_idle"] == pytest.approx(0.2)
    assert idle_fractions(0.5, costs)["learner_idle"] == pytest.approx(0.5)
