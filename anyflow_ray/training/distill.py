"""Stage 2's objective without Ray or DeepSpeed (docs/method.md §5, §6).

``Trajectory``: what a rollout actor makes and a learner rank trains on. ``RolloutStrategy``: how the
student's on-policy states are made (flow-map backward simulation, causal chunk by chunk, or the
consistency baseline) and how the learner re-runs the last jumps with gradient, chosen once from the
config (``rollout_strategy``) and shared by both sides, so the two cannot disagree. ``DistillObjective``:
the generator's loss (DMD with CFG on the frozen teacher R, against the critic F, plus the Stage-1
co-training loss at ``distill.real_weight``) and the critic's flow-matching loss.

The learner rank (learners/distill.py) adds what needs the engines and the other ranks: fetching
trajectories, ZeRO-3's stand-ins (``DistillObjective.stand_in``, weight 0), the finite checks before any
optimizer step, the optimizer steps and the weight publication.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from omegaconf import DictConfig

from anyflow_ray.run.config import grad_scope
from anyflow_ray.sampling.rollouts import (RolloutState, causal_finish, causal_prefix, causal_rollout,
                                           consistency_finish, consistency_prefix, draw_budget, finish, prefix)
from anyflow_ray.sampling.schedule import sampling_grid
from anyflow_ray.training.losses import critic_loss, dmd_loss
from anyflow_ray.training.objectives import PretrainObjective

KINDS = ("generator", "critic")


class TrajectoryError(ValueError):
    """A trajectory a learner must not train on (named: what is missing, misshapen or non-finite)."""


@dataclass
class Trajectory:
    """One rollout of ``rollout.batch_size`` clips with one (N, k) draw. Times are (B,) on the 0..1000 scale,
    clips (B, C, F, H, W) on the CPU; the learner moves them to its device."""
    kind: str  # "generator": the learner re-runs the last jumps from z_k with gradient; "critic": x_hat is used
    prompt_idx: torch.Tensor  # (B,) rows of the data set's prompt embeddings
    num_steps: int  # N
    k: int  # the real step the generator's gradient flows through
    z_k: torch.Tensor
    T_k: torch.Tensor
    T_next: torch.Tensor
    version: int = -1  # the weight version the actor rolled out with
    x_hat: Optional[torch.Tensor] = None  # critic: the complete rollout
    noise: Optional[torch.Tensor] = None  # generator with grad_scope all: the prefix is re-run from it
    context: Optional[torch.Tensor] = None  # data.rank_shards: the prompt embeddings (not the learner's rows)
    context_chunks: Optional[torch.Tensor] = None  # causal generator: the actor's x_hat of every chunk (§6)

    @property
    def batch(self) -> int:
        return len(self.prompt_idx)

    def state(self, device, dtype) -> RolloutState:
        return RolloutState(self.num_steps, self.k, self.T_k.to(device), self.T_next.to(device), self.z_k.to(device, dtype))

    def validate(self, clip_shape: tuple[int, ...], num_prompts: int, embedding_shape: tuple[int, ...] | None = None,
                 causal: bool = False) -> None:
        """Raise TrajectoryError for missing parts, wrong shapes or non-finite values. One carrying its prompt
        embeddings is checked against ``embedding_shape``; otherwise ``prompt_idx`` must index the learner's
        ``num_prompts`` prompts. A causal student's generator trajectory carries ``context_chunks``; a
        bidirectional student's carries none (an actor and a learner disagreeing on the student)."""
        if self.kind not in KINDS:
            raise TrajectoryError(f"trajectory kind {self.kind!r} is not generator or critic")
        required = {"critic": ("x_hat",), "generator": ("context_chunks",) if causal else ()}[self.kind]
        missing = [name for name in required if getattr(self, name) is None]
        if missing:
            raise TrajectoryError(f"{self.kind} trajectory lacks {missing}")
        if not causal and self.context_chunks is not None:
            raise TrajectoryError(f"{self.kind} trajectory carries context_chunks but the student is bidirectional")
        for name in ("z_k", "x_hat", "noise", "context_chunks"):
            tensor = getattr(self, name)
            if tensor is not None:
                if tuple(tensor.shape) != (self.batch, *clip_shape):
                    raise TrajectoryError(f"{name} has shape {tuple(tensor.shape)}, expected {(self.batch, *clip_shape)}")
                if not torch.isfinite(tensor).all():
                    raise TrajectoryError(f"{name} holds NaN/Inf")
        for name in ("T_k", "T_next"):
            if tuple(getattr(self, name).shape) != (self.batch,):
                raise TrajectoryError(f"{name} has shape {tuple(getattr(self, name).shape)}, expected ({self.batch},)")
        if self.context is not None:
            if embedding_shape is not None and tuple(self.context.shape) != (self.batch, *embedding_shape):
                raise TrajectoryError(f"context has shape {tuple(self.context.shape)}, expected "
                                      f"{(self.batch, *embedding_shape)}")
            if not torch.isfinite(self.context).all():
                raise TrajectoryError("context holds NaN/Inf")
        elif int(self.prompt_idx.max()) >= num_prompts or int(self.prompt_idx.min()) < 0:
            raise TrajectoryError("prompt_idx out of range")


def checked(payload, clip_shape: tuple[int, ...], num_prompts: int, embedding_shape: tuple[int, ...] | None,
            causal: bool, kind: str) -> Trajectory:
    """``payload`` as a valid ``kind`` trajectory, or TrajectoryError (anything else in the buffer included)."""
    if not isinstance(payload, Trajectory):
        raise TrajectoryError(f"expected a Trajectory, got a {type(payload).__name__}")
    if payload.kind != kind:
        raise TrajectoryError(f"a {payload.kind} trajectory handed out as a {kind} one")
    payload.validate(clip_shape, num_prompts, embedding_shape, causal)
    return payload


@dataclass(frozen=True)
class RolloutStrategy:
    """How on-policy states are made and finished: ``causal`` (chunk by chunk on the KV cache, §6),
    ``consistency`` (the rollout ablation's baseline) or flow-map backward simulation; ``scope``: which
    jumps carry the generator's gradient (``last``, ``all``: the prefix too, from the noise, or ``jump``)."""
    causal: bool
    consistency: bool
    scope: str
    shift: float
    budgets: tuple[int, ...]
    carry_context: bool  # data.rank_shards: a trajectory carries its prompt embeddings

    @torch.no_grad()
    def make(self, student, kind: str, seed: int, embeddings: torch.Tensor, clip_shape: tuple[int, ...],
             batch: int, version: int, device, dtype, in_order: bool = False) -> Trajectory:
        """The actor's side: one trajectory of ``batch`` clips; prompts, noise and (N, k) drawn from ``seed``.
        ``in_order``: ``embeddings`` are this trajectory's ``batch`` prompts (the next rows of the actor's
        data stream), taken as they are; otherwise prompts are drawn from them."""
        gen = torch.Generator().manual_seed(seed)
        n, k = draw_budget(gen, self.budgets)
        idx = torch.randint(len(embeddings), (batch,), generator=gen)  # drawn either way: the same noise
        if in_order:
            if len(embeddings) != batch:
                raise ValueError(f"in_order: {len(embeddings)} prompt embeddings for a trajectory of {batch} clips")
            idx = torch.arange(batch)
        context = embeddings[idx].to(device, dtype)
        noise = torch.randn((batch, *clip_shape), generator=gen).to(device, dtype)
        rollout = None
        if self.causal:  # every chunk's x_hat is made anyway: the context of the chunks after it
            rollout = causal_rollout(student, noise, context, n, k, self.shift)
            state = rollout.state
        elif self.consistency:  # fresh noise after each x0 prediction, drawn from the seed too
            state = consistency_prefix(student, noise, context, n, k, self.shift, gen)
        else:
            state = prefix(student, noise, context, n, k, self.shift)
        trajectory = Trajectory(kind, idx, n, k, state.z_k.cpu(), state.T_k.cpu(), state.T_next.cpu(), version,
                                context=embeddings[idx].clone() if self.carry_context else None)
        if kind == "critic":
            x_hat = (rollout.x_hat if self.causal else consistency_finish(student, state, context)
                     if self.consistency else finish(student, state, context)[1])
            trajectory.x_hat = x_hat.cpu()
        else:
            if self.causal:
                trajectory.context_chunks = rollout.x_hat.cpu()
            if self.scope == "all":
                trajectory.noise = noise.cpu()
        return trajectory

    def x_hat(self, student, trajectory: Trajectory, context: torch.Tensor, uniform_calls: bool = False) -> torch.Tensor:
        """The learner's side: x_hat with gradient from the actor's z_k (from its noise with scope ``all``).
        A causal student re-runs every chunk at once on the actor's own earlier chunks (teacher forcing).
        ``uniform_calls``: the same calls whatever (N, k) (ZeRO-3 gathers weights in every call)."""
        device, dtype = context.device, context.dtype
        clean = trajectory.context_chunks.to(device, dtype) if self.causal else None
        n, k = trajectory.num_steps, trajectory.k
        if self.scope == "all" and trajectory.noise is not None:
            noise = trajectory.noise.to(device, dtype)
            state = (causal_prefix(student, noise, clean, context, n, k, self.shift, uniform_calls) if self.causal
                     else prefix(student, noise, context, n, k, self.shift, uniform_calls))
        else:
            state = trajectory.state(device, dtype)
        if self.causal:
            return causal_finish(student, state, clean, context, uniform_calls=uniform_calls)[1]
        if self.consistency:  # one call whatever (N, k): uniform under ZeRO-3 too
            return consistency_finish(student, state, context)
        return finish(student, state, context, uniform_calls=uniform_calls, detach_step=self.scope == "jump")[1]


def rollout_strategy(cfg: DictConfig, causal: bool) -> RolloutStrategy:
    """The one strategy of a run. ``causal``: whether the loaded student is (``models.causal.is_causal``)."""
    return RolloutStrategy(causal=causal, consistency=cfg.distill.rollout == "consistency", scope=grad_scope(cfg),
                           shift=float(cfg.schedule.shift), budgets=tuple(int(n) for n in cfg.distill.budgets),
                           carry_context=bool(cfg.data.rank_shards))


class DistillObjective:
    """The generator's and the critic's losses on a learner rank's trajectories (docs/method.md §5).

    ``co_training``: the Stage-1 objective on real clips (the reference's FAR Stage 2 takes no
    bidirectional auxiliary step: built with ``bidirectional_aux=0``). Stand-ins (``stand_in``) enter
    every loss with weight 0: they make the calls ZeRO-3 needs on every rank and change no value.
    """

    def __init__(self, cfg: DictConfig, co_training: PretrainObjective, causal: bool, device=None,
                 dtype: torch.dtype = torch.float32):
        self.cfg, self.co_training = cfg, co_training
        self.device, self.dtype = torch.device(device or "cpu"), dtype  # where the models run
        self.strategy = rollout_strategy(cfg, causal)
        # looked up by a trajectory's prompt_idx unless trajectories carry their prompts (a data stream)
        self.embeddings = None if self.strategy.carry_context else co_training.data.clips.embeddings
        self.uncond = co_training.data.uncond
        ex = cfg.experiments
        self.shift, self.critic_times = float(ex.dmd_shift), str(ex.critic_times)
        self.guidance, self.real_weight = float(cfg.distill.dmd_guidance), float(cfg.distill.real_weight)

    def context(self, trajectory: Trajectory) -> torch.Tensor:
        """The trajectory's prompt embeddings: carried in it (``data.rank_shards``) or looked up by index in
        the data set this process holds whole."""
        context = trajectory.context if trajectory.context is not None else self.embeddings[trajectory.prompt_idx]
        return context.to(self.device, self.dtype)

    def stand_in(self, kind: str, clip_shape: tuple[int, ...]) -> Trajectory:
        """A valid one-clip trajectory of zeros (its loss enters with weight 0; only its calls matter)."""
        clip, grid = torch.zeros(1, *clip_shape), sampling_grid(2, self.strategy.shift)
        trajectory = Trajectory(kind, torch.zeros(1, dtype=torch.long), 2, 0, clip, grid[0:1].clone(),
                                grid[1:2].clone())
        if kind == "critic":
            trajectory.x_hat = clip
        else:
            trajectory.noise = clip
            trajectory.context_chunks = clip if self.strategy.causal else None
        return trajectory

    def student_x_hat(self, student, trajectory: Trajectory, uniform_calls: bool = False):
        """(x_hat with gradient, its context)."""
        context = self.context(trajectory)
        return self.strategy.x_hat(student, trajectory, context, uniform_calls), context

    def generator_loss(self, student, critic, teacher, trajectories: list[Trajectory], stand_ins: list[Trajectory],
                       step: int, rng: torch.Generator, rank: int = 0, world_size: int = 1, all_reduce=None,
                       uniform_calls: bool = False, x_hat_of=None) -> tuple[dict[str, torch.Tensor], dict]:
        """({"total", "dmd", "real"}, metrics): total = mean DMD over ``trajectories`` + real_weight x the
        co-training loss of this rank's real clips at ``step``. ``x_hat_of(trajectory)``: the learner's
        x_hat (default: ``student_x_hat``; a probe may wrap it). The learner takes the two parts one after
        the other (``dmd_part``, then ``co_training_part``), a backward each, so their graphs never coexist."""
        dmd, metrics = self.dmd_part(student, critic, teacher, trajectories, stand_ins, rng, uniform_calls, x_hat_of)
        real, real_info = self.co_training_part(student, step, rank, world_size, all_reduce)
        total = dmd + self.real_weight * real  # logged as "loss"; the two parts unweighted
        return {"total": total, "dmd": dmd, "real": real}, {**metrics, **real_info}

    def co_training_part(self, student, step: int, rank: int = 0, world_size: int = 1,
                         all_reduce=None) -> tuple[torch.Tensor, dict]:
        """(the Stage-1 co-training loss of this rank's real clips at ``step``, its metrics as ``diag/*``)."""
        real, real_info = self.co_training.loss(student, step, rank, world_size, all_reduce)
        return real, {f"diag/{k}": v for k, v in real_info.items()}

    def dmd_part(self, student, critic, teacher, trajectories: list[Trajectory], stand_ins: list[Trajectory],
                 rng: torch.Generator, uniform_calls: bool = False, x_hat_of=None) -> tuple[torch.Tensor, dict]:
        """(mean DMD loss over ``trajectories``, the stand-ins in its graph at weight 0; its metrics)."""
        x_hat_of = x_hat_of or (lambda t: self.student_x_hat(student, t, uniform_calls))
        uncond = self.uncond.to(self.device, self.dtype)
        terms, pad_terms, metrics = [], [], {}
        for i, trajectory in enumerate([*trajectories, *stand_ins]):
            x_hat, context = x_hat_of(trajectory)
            loss, info = dmd_loss(x_hat, critic, teacher, context, uncond, rng, self.shift, self.guidance)
            (terms if i < len(trajectories) else pad_terms).append(loss)
            if i < len(trajectories):
                metrics.update(info)
        dmd = torch.stack(terms).mean() if terms else torch.zeros((), device=self.device)
        if pad_terms:  # in the graph (the backward makes the same calls on every rank), weight 0
            dmd = dmd + 0.0 * torch.stack(pad_terms).sum()
        return dmd, metrics

    def critic_loss(self, critic, trajectories: list[Trajectory], stand_ins: list[Trajectory],
                    rng: torch.Generator) -> torch.Tensor | None:
        """Flow matching of the critic on the trajectories' x_hat (None when there are none, stand-ins aside)."""
        terms, pad_terms = [], []
        for i, trajectory in enumerate([*trajectories, *stand_ins]):
            loss, _ = critic_loss(critic, trajectory.x_hat.to(self.device, self.dtype), self.context(trajectory), rng,
                                  self.shift, self.critic_times)
            (terms if i < len(trajectories) else pad_terms).append(loss)
        loss = torch.stack(terms).mean() if terms else None
        if pad_terms:  # weight 0, as the generator's stand-ins
            loss = 0.0 * torch.stack(pad_terms).sum() + (loss if loss is not None else 0.0)
        return loss
