"""Stage 2's rollout fleet sized from the learner's throughput (run/fleet_plan.py), by hand-counted calls."""

import pytest

from anyflow_ray.cli import main
from anyflow_ray.run.config import load_config
from anyflow_ray.run.fleet_plan import calls_per_clip, fleet_plan, learner_forwards


def test_backward_simulation_skips_the_prefix_at_k0_and_the_jump_at_the_last_step():
    cfg = load_config("configs/tiny.yaml", ["distill.budgets=[2,4]"])
    # N=2: k=0 -> 2 calls, k=1 -> 2; N=4: k=0 -> 2, k=1,2 -> 3, k=3 -> 2
    assert calls_per_clip(cfg) == pytest.approx((2 + (2 + 3 + 3 + 2) / 4) / 2)
    consistency = load_config("configs/tiny.yaml", ["distill.budgets=[2,4]", "distill.rollout=consistency"])
    assert calls_per_clip(consistency) == pytest.approx(((1 + 2) / 2 + (1 + 2 + 3 + 4) / 4) / 2)  # k + 1


INVERSE_N = (1 / 2 + 1 / 4 + 1 / 8 + 1 / 16 + 1 / 50) / 5  # E[1/N] over the Wan budgets


@pytest.mark.parametrize("scope, zero, jumps", [("last", 2, 2 - INVERSE_N), ("all", 2, 3 - 2 * INVERSE_N),
                                                ("last", 3, 2), ("all", 3, 3)])
def test_learner_forwards_count_every_call_of_a_step(scope, zero, jumps):
    """1.3B, 8 ranks x 4 clips, real batch 32, gradient checkpointing: a call with gradient is 4 forwards; the
    re-run skips the calls its (N, k) skips, except at ZeRO-3, where every rank makes them all."""
    cfg = load_config("configs/wan2.1-t2v-1.3b.yaml", [f"distill.grad_scope={scope}", f"distill.zero_stage={zero}",
                                                       "experiments.critic_updates=2"])
    clips, real = cfg.rollout.batch_size, cfg.distill.real_batch / cfg.distill.num_ranks
    assert cfg.model.gradient_checkpointing
    expected = clips * jumps * 4 + clips * 3 + real * (4 + 3) + clips * 2 * 4
    assert learner_forwards(cfg) == pytest.approx(expected)


def test_auto_asks_for_the_rollout_gpus_the_learners_keep_busy_rounded_up(capsys):
    cfg = load_config("configs/wan2.1-t2v-1.3b.yaml")
    plan = fleet_plan(cfg)
    assert plan.rollout_gpus == pytest.approx(8 * 2 * 4 * calls_per_clip(cfg) / learner_forwards(cfg))
    assert cfg.rollout.num_actors == plan.num_actors == 2  # the Wan configs run auto: 1.71 GPUs' worth
    half = load_config("configs/wan2.1-t2v-1.3b.yaml", ["rollout.gpus_per_actor=0.5"])
    assert half.rollout.num_actors == 4  # half-GPU actors: twice as many
    assert load_config("configs/wan2.1-t2v-1.3b.yaml", ["rollout.num_actors=6"]).rollout.num_actors == 6
    assert main(["distill", "--config", "configs/wan2.1-t2v-1.3b.yaml", "--dry-run", "rollout.num_actors=8"]) == 0
    out = capsys.readouterr().out
    assert "keep 1.71 rollout GPU(s) busy: 2 actor(s) of 1 GPU" in out and "this config runs 8 (6.29 GPU(s)" in out
    assert main(["distill", "--config", "configs/wan2.1-t2v-1.3b.yaml", "--dry-run", "rollout.num_actors=1"]) == 0
    assert "the learner waits about 42% of the time" in capsys.readouterr().out
