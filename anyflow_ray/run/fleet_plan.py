"""How many rollout GPUs keep Stage 2's learner ranks fed: network calls, counted per learner step.

Each learner step takes, per rank, one generator and one critic trajectory of ``rollout.batch_size`` clips
(actors/fleet.py::next_batch). An actor makes a trajectory in the calls backward simulation needs (no
gradient); the rank spends, on the same clips, forwards with gradient (a forward, a recompute under gradient
checkpointing and a backward of about two forwards: 4 forward-equivalents each, 3 without checkpointing;
measured on an H200, 4.06 at 1.3B and 3.97 at 14B, docs/experiments.md) and forwards without. With one
rollout GPU as fast per forward as one learner GPU (the same model, bf16; the learner's ZeRO traffic,
not counted, only slows the learner, which errs towards more actors):

    rollout GPUs = learner ranks x (rollout calls per step) / (learner forward-equivalents per step)

``rollout.num_actors: auto`` asks for that many actors of ``rollout.gpus_per_actor`` GPUs each (1 for
``auto``, 0.5 colocated), rounded up. ``distill --dry-run`` prints the sum. What it leaves out: the weight
publish (a pause per ``distill.sync_every`` steps), ZeRO-3 gathers and the attention over a causal
rollout's KV cache; the control-plane bench measures idle fractions with the real call costs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from omegaconf import DictConfig

from anyflow_ray.run.config import grad_scope

AUTO = "auto"


@dataclass(frozen=True)
class FleetPlan:
    ranks: int
    rollout_calls: float  # per learner step and rank: 2 trajectories x clips x calls per clip
    learner_forwards: float  # forward-equivalents per learner step and rank
    gpus_per_actor: float

    @property
    def rollout_gpus(self) -> float:
        return self.ranks * self.rollout_calls / self.learner_forwards

    @property
    def num_actors(self) -> int:
        return max(1, math.ceil(self.rollout_gpus / self.gpus_per_actor - 1e-9))

    def report(self, configured: int) -> str:
        idle = 1 - min(1.0, configured * self.gpus_per_actor / self.rollout_gpus)
        return (f"fleet: a learner step takes {self.rollout_calls:.2f} rollout calls and "
                f"{self.learner_forwards:.1f} learner forward-equivalents per rank, so {self.ranks} learner rank(s) "
                f"keep {self.rollout_gpus:.2f} rollout GPU(s) busy: {self.num_actors} actor(s) of "
                f"{self.gpus_per_actor:g} GPU (rollout.num_actors=auto); this config runs {configured}"
                + (f", so the learner waits about {idle:.0%} of the time" if idle > 0 else
                   f" ({configured * self.gpus_per_actor - self.rollout_gpus:.2f} GPU(s) of them idle)"))


def calls_per_clip(cfg: DictConfig) -> float:
    """Expected network calls of one rollout: backward simulation's 3 (the prefix skipped at k = 0, the
    jump to 0 at k = N - 1, N uniform over ``distill.budgets``, k ~ U{0..N-1}); the consistency rollout's
    k + 1."""
    budgets = [int(n) for n in cfg.distill.budgets]
    if cfg.distill.rollout == "consistency":
        return sum((n + 1) / 2 for n in budgets) / len(budgets)
    return 3 - 2 * sum(1 / n for n in budgets) / len(budgets)


def learner_forwards(cfg: DictConfig) -> float:
    """Forward-equivalents of one Stage-2 learner step per rank (training/distill.py): the student's jumps
    with gradient (the consistency rollout's one), DMD's critic and CFG teacher calls, the co-training Stage-1 loss (1 call with gradient,
    3 without) and the critic's updates, each on this rank's clips; a causal student's teacher-forced calls
    over its token factor (``memory_plan.student_sequence``)."""
    from anyflow_ray.run.memory_plan import student_sequence

    grad = 4 if cfg.model.gradient_checkpointing else 3
    clips, ranks = int(cfg.rollout.batch_size), int(cfg.distill.num_ranks)
    jumps = 1 if cfg.distill.rollout == "consistency" else jumps_with_grad(cfg)
    generator = clips * jumps * grad * student_sequence(cfg, "distill")
    dmd = clips * 3  # critic F + the teacher's conditional and unconditional calls, no gradient
    real = cfg.distill.real_batch / ranks * (grad + 3) * student_sequence(cfg)
    critic = clips * int(cfg.experiments.critic_updates) * grad
    return generator + dmd + real + critic


def jumps_with_grad(cfg: DictConfig) -> float:
    """Expected student calls with gradient of the learner's re-run (sampling/rollouts.py): ``grad_scope:
    all`` re-runs backward simulation's calls (3 - 2 E[1/N]), ``last`` the k-th step and the jump to 0 (one
    call at k = N - 1: 2 - E[1/N]), ``experiments.grad_jump_only`` one; at ZeRO-3 every rank makes the
    calls of the longest case (uniform calls: 3 or 2)."""
    inverse = sum(1 / int(n) for n in cfg.distill.budgets) / len(cfg.distill.budgets)
    scope, uniform = grad_scope(cfg), int(cfg.distill.zero_stage) == 3
    if scope == "jump":
        return 1.0
    if scope == "all":
        return 3.0 if uniform else 3 - 2 * inverse
    return 2.0 if uniform else 2 - inverse


def fleet_plan(cfg: DictConfig) -> FleetPlan:
    per_actor = cfg.rollout.gpus_per_actor
    gpus = float(per_actor) if per_actor != AUTO and float(per_actor) > 0 else (0.5 if cfg.rollout.colocate else 1.0)
    return FleetPlan(ranks=int(cfg.distill.num_ranks),
                     rollout_calls=2 * int(cfg.rollout.batch_size) * calls_per_clip(cfg),
                     learner_forwards=learner_forwards(cfg), gpus_per_actor=gpus)
