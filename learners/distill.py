"""``DistillWorker``: the Stage-2 learner rank (docs/method.md §5), a ``LearnerWorker`` with three models.

Student G (trainable, from the Stage-1 EMA), frozen teacher R (real score), critic F (trainable copy
of the teacher, or with ``distill.critic=lora`` LoRA adapters on the frozen teacher itself: one copy of
the base weights, R is F with its adapters switched off). Per step, on trajectories made by the rollout actors:
  generator update: re-run the real k-th step and the jump to 0 from the actor's z_k with gradient
    (``grad_scope: all`` recomputes the prefix from the noise too), DMD loss with CFG on R, plus the
    Stage-1 loss on a real batch times ``distill.real_weight`` (the reference: 1, equal weight);
  critic update: flow matching of F on a fresh critic trajectory's x_hat (one per generator update).
A causal student (docs/method.md §6) re-runs every chunk at once by teacher forcing on the actor's own
x_hat of the earlier chunks (the trajectory's ``context_chunks``); R and F stay bidirectional.
Trajectories that cannot be fetched (lost with their actor) or fail validation are counted, never used.
"""

from __future__ import annotations

import copy
import math

import ray
import torch
from ray.exceptions import GetTimeoutError, ObjectLostError, OwnerDiedError

from anyflow_ray.sampling.rollouts import RolloutState, finish, prefix
from anyflow_ray.sampling.rollouts import causal_finish, causal_prefix
from anyflow_ray.sampling.rollouts import consistency_finish
from anyflow_ray.training.losses import critic_loss, dmd_loss
from anyflow_ray.models.causal import is_causal
from anyflow_ray.models.loading import load_transformer
from anyflow_ray.training.objectives import PretrainObjective
from anyflow_ray.sampling.schedule import sampling_grid
from anyflow_ray.models.lora import AdaptersOff, apply_lora
from anyflow_ray.training.seeds import step_generator
from learners.publish import WeightPublisher
from learners.worker import LearnerWorker, deepspeed_config, job_zero_stage

REQUIRED = {"generator": ("prompt_idx", "num_steps", "k", "z_k", "T_k", "T_next"),
            "critic": ("prompt_idx", "x_hat")}


class TrajectoryError(ValueError):
    pass


def validate_trajectory(payload: dict, kind: str, clip_shape: tuple[int, ...], num_prompts: int,
                        embedding_shape: tuple[int, ...] | None = None, causal: bool = False) -> None:
    """Raise TrajectoryError for a payload with missing keys, wrong shapes or non-finite values. A payload
    that carries its prompt embeddings (``context``: the actor read its own shards) is checked against
    ``embedding_shape``; otherwise ``prompt_idx`` must index the learner's ``num_prompts`` prompts. A causal
    student's generator trajectory carries ``context_chunks`` (the actor's x_hat of every chunk, docs/method.md
    §6); a bidirectional student's carries none (an actor and a learner disagreeing on the student)."""
    required = REQUIRED[kind] + (("context_chunks",) if causal and kind == "generator" else ())
    missing = [key for key in required if key not in payload]
    if missing:
        raise TrajectoryError(f"{kind} trajectory lacks {missing}")
    if not causal and "context_chunks" in payload:
        raise TrajectoryError(f"{kind} trajectory carries context_chunks but the student is bidirectional")
    batch = len(payload["prompt_idx"])
    for key in ("z_k", "x_hat", "noise", "context_chunks"):
        if key in payload:
            tensor = payload[key]
            if tuple(tensor.shape) != (batch, *clip_shape):
                raise TrajectoryError(f"{key} has shape {tuple(tensor.shape)}, expected {(batch, *clip_shape)}")
            if not torch.isfinite(tensor).all():
                raise TrajectoryError(f"{key} holds NaN/Inf")
    if "context" in payload:
        context = payload["context"]
        if embedding_shape is not None and tuple(context.shape) != (batch, *embedding_shape):
            raise TrajectoryError(f"context has shape {tuple(context.shape)}, expected {(batch, *embedding_shape)}")
        if not torch.isfinite(context).all():
            raise TrajectoryError("context holds NaN/Inf")
    elif int(payload["prompt_idx"].max()) >= num_prompts or int(payload["prompt_idx"].min()) < 0:
        raise TrajectoryError("prompt_idx out of range")


class DistillWorker(WeightPublisher, LearnerWorker):
    def __init__(self, cfg: dict, job: str, rank: int, world_size: int):
        super().__init__(cfg, "pretrain", rank, world_size)  # reuses Stage-1 objective for co-training
        self.job = "distill"
        self.zero_stage = job_zero_stage(self.cfg, "distill")

    def _build(self) -> None:
        import deepspeed

        dc = self.cfg.distill
        student = load_transformer(dc.init, flow_map=True, gate=self.cfg.model.gate, dtype=self.dtype,
                                   causal_chunks=list(self.cfg.model.causal.chunks))
        self.causal = is_causal(student)  # teacher and critic stay bidirectional (docs/method.md §6)
        teacher = load_transformer(dc.teacher, flow_map=False, dtype=self.dtype)
        shared = dc.critic == "lora"  # F = LoRA on the frozen teacher; R = the same module, adapters off
        critic = teacher if shared else copy.deepcopy(teacher)
        if self.cfg.model.lora.enabled:
            apply_lora(student, self.cfg.model.lora)
            apply_lora(critic, self.cfg.model.lora)
        if self.cfg.model.gradient_checkpointing:
            student.enable_gradient_checkpointing()
            critic.enable_gradient_checkpointing()
        if shared:  # not frozen as a whole: that would freeze F's adapters too
            self.teacher = AdaptersOff(critic.to(self.device))
        else:
            self.teacher = teacher.to(self.device).eval().requires_grad_(False)
        data = self._load_data()
        self.data = data
        # the co-training takes no bidirectional auxiliary step (the reference's FAR Stage 2 sets it to 0)
        self.objective = PretrainObjective(data, self._co_training_cfg(), teacher=self.teacher, bidirectional_aux=0.0)
        self.engines = {}
        for name, model in (("student", student), ("critic", critic)):
            params = [p for p in model.parameters() if p.requires_grad]
            lr = dc.critic_lr if name == "critic" and dc.critic_lr > 0 else dc.lr
            opt = torch.optim.AdamW(params, lr=lr, betas=tuple(dc.betas), weight_decay=dc.weight_decay)
            config = deepspeed_config(self.cfg, "distill", self.cfg.rollout.batch_size, self.dtype)
            engine, _, _, _ = deepspeed.initialize(model=model.to(self.device), optimizer=opt, config=config,
                                                   dist_init_required=False)
            self.engines[name] = engine
        self.model = student
        self.trainable = [p for p in student.parameters() if p.requires_grad]
        self.optimizer = self.engines["student"].optimizer
        self.scheduler = None

    def _ema_decay(self) -> float:
        return self.cfg.distill.ema

    def checkpoint_engines(self) -> dict:
        return dict(self.engines)  # training_state/student, training_state/critic

    def _co_training_cfg(self):
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(self.cfg, resolve=True)
        cfg["pretrain"]["global_batch"] = self.cfg.distill.real_batch
        return OmegaConf.create(cfg)

    # -- trajectories -----------------------------------------------------------------------
    def _fetch(self, wrapped_refs: list, kind: str) -> tuple[list[dict], int, int]:
        """(valid payloads, lost, rejected)."""
        clip_shape = tuple(self.data.clips.videos.shape[1:])
        good, lost, rejected = [], 0, 0
        for wrapped in wrapped_refs:
            try:
                payload = ray.get(wrapped[0], timeout=float(self.cfg.learner.timeout_s))
            except (ObjectLostError, OwnerDiedError, GetTimeoutError):  # gone with its actor, or unreachable
                lost += 1
                continue
            try:
                validate_trajectory(payload, kind, clip_shape, len(self.data.clips.prompts),
                                    tuple(self.data.clips.embeddings.shape[1:]), self.causal)
            except TrajectoryError:
                rejected += 1
                continue
            good.append(payload)
        return good, lost, rejected

    def _context(self, payload: dict) -> torch.Tensor:
        """The trajectory's prompt embeddings: carried in it (``data.rank_shards``: the actor's prompts are
        not this rank's) or looked up by index in the data set every process holds whole."""
        context = payload["context"] if "context" in payload else self.data.clips.embeddings[payload["prompt_idx"]]
        return context.to(self.device, self.dtype)

    def student_x_hat(self, payload: dict) -> torch.Tensor:
        """x_hat with gradient: from z_k (or from the noise when grad_scope is all). A causal student re-runs
        every chunk at once on the actor's own earlier chunks (teacher forcing, docs/method.md §6)."""
        context = self._context(payload)
        student = self.engines["student"].module
        uniform = self.zero_stage == 3  # the same calls on every rank, whatever (N, k)
        clean = payload["context_chunks"].to(self.device, self.dtype) if self.causal else None
        if self.cfg.distill.grad_scope == "all" and "noise" in payload:
            noise, draw = payload["noise"].to(self.device, self.dtype), (payload["num_steps"], payload["k"])
            state = (causal_prefix(student, noise, clean, context, *draw, self.cfg.schedule.shift, uniform)
                     if self.causal else prefix(student, noise, context, *draw, self.cfg.schedule.shift, uniform))
        else:
            state = RolloutState(payload["num_steps"], payload["k"], payload["T_k"].to(self.device),
                                 payload["T_next"].to(self.device), payload["z_k"].to(self.device, self.dtype))
        if self.causal:
            return causal_finish(student, state, clean, context, uniform_calls=uniform)[1], context
        if self.cfg.distill.rollout == "consistency":  # one call whatever (N, k): uniform under ZeRO-3 too
            return consistency_finish(student, state, context), context
        return finish(student, state, context, uniform_calls=uniform,
                      detach_step=self.cfg.experiments.grad_jump_only)[1], context

    # -- ZeRO-3: every model call gathers weights from all ranks, so all ranks make the same calls ------
    def _padding(self, *counts: int) -> list[int]:
        """How many zero-weight stand-in trajectories each of ``counts`` needs so that every rank runs as
        many as the busiest one (a collective under ZeRO-3; all zeros otherwise)."""
        if self.zero_stage < 3 or self.world_size == 1:
            return [0] * len(counts)
        most = torch.tensor(counts, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
        return [int(m) - c for m, c in zip(most.tolist(), counts)]

    def _stand_in(self, kind: str) -> dict:
        """A valid one-clip trajectory of zeros; its loss enters with weight 0 (only the calls matter)."""
        clip = torch.zeros(1, *self.data.clips.videos.shape[1:])
        if kind == "critic":
            return {"prompt_idx": torch.zeros(1, dtype=torch.long), "x_hat": clip}
        grid = sampling_grid(2, self.cfg.schedule.shift)
        stand_in = {"prompt_idx": torch.zeros(1, dtype=torch.long), "num_steps": 2, "k": 0, "z_k": clip,
                    "noise": clip, "T_k": grid[0:1].clone(), "T_next": grid[1:2].clone()}
        return {**stand_in, "context_chunks": clip} if self.causal else stand_in

    # -- one step -----------------------------------------------------------------------------
    halted: int | None = None  # the step whose non-finite loss stopped this rank

    def _refuse_after_halt(self, what: str) -> None:
        """The driver may have queued a step and a publish behind the one that failed (one-step-off
        overlap); neither may apply or publish anything."""
        if self.halted is not None:
            raise FloatingPointError(f"{what} refused: step {self.halted + 1} had a non-finite loss")

    def train_step(self, step: int, generator_refs: list = (), critic_refs: list = ()) -> dict:
        self._refuse_after_halt(f"step {step + 1}")
        # every rank is handed the whole batch and trains on its own slice
        gen_payloads, lost_g, rej_g = self._fetch(list(generator_refs)[self.rank::self.world_size], "generator")
        crit_payloads, lost_c, rej_c = self._fetch(list(critic_refs)[self.rank::self.world_size], "critic")
        counts = {"lost": lost_g + lost_c, "rejected": rej_g + rej_c,
                  "trained": len(gen_payloads) + len(crit_payloads)}
        rng = step_generator(self.cfg.run.seed, step, "rank", self.rank)
        uncond = self.data.uncond.to(self.device, self.dtype)
        metrics: dict = {}
        gen_pad, crit_pad = self._padding(len(gen_payloads), len(crit_payloads))

        student = self.engines["student"]
        student.train()
        dmd_terms, pad_terms = [], []
        for i, payload in enumerate(gen_payloads + [self._stand_in("generator")] * gen_pad):
            x_hat, context = self.student_x_hat(payload)
            loss, info = dmd_loss(x_hat, self.engines["critic"].module, self.teacher, context, uncond, rng,
                                  self.cfg.experiments.dmd_shift, self.cfg.distill.dmd_guidance)
            (dmd_terms if i < len(gen_payloads) else pad_terms).append(loss)
            if i < len(gen_payloads):
                metrics.update(info)
        all_reduce = torch.distributed.all_reduce if self.world_size > 1 else None
        real_loss, real_info = self.objective.loss(student.module, step, self.rank, self.world_size, all_reduce)
        dmd = torch.stack(dmd_terms).mean() if dmd_terms else torch.zeros((), device=self.device)
        if pad_terms:  # in the graph (the backward makes the same calls on every rank), weight 0
            dmd = dmd + 0.0 * torch.stack(pad_terms).sum()
        total = dmd + self.cfg.distill.real_weight * real_loss  # logged as "loss"; the two parts unweighted

        versions = sorted({int(p["version"]) for p in gen_payloads + crit_payloads if "version" in p})
        self._refuse_non_finite(step, {"generator": total, "dmd": dmd, "co-training": real_loss}, versions)
        # the student's graph is freed before the critic's is built (the peak holds one of them, not both:
        # anyflow_ray/run/memory_plan.py); neither optimizer steps before both losses are known to be finite
        student.backward(total)

        critic = self.engines["critic"]
        critic.train()
        crit = self._critic_loss(crit_payloads, crit_pad, rng, step, versions)
        student.step()
        self.ema.update()
        crit_value, critic_updates = float("nan"), 0
        # experiments.critic_updates > 1: more updates on the same x_hat, each with fresh noise levels and noise.
        # The step is already applied (student, EMA, a critic update), so a later non-finite critic loss
        # ends the critic's updates for this step on every rank rather than halting the run: a checkpoint
        # taken next holds the whole step, and a resume does not apply it twice.
        for update in range(self.cfg.experiments.critic_updates):
            if update > 0:
                crit = self._critic_loss(crit_payloads, crit_pad, rng, step, versions, refuse=False)
                if not self._all_ranks_have(crit is None or math.isfinite(float(crit.detach()))):
                    break
            if not self._all_ranks_have(crit is not None):  # skip the critic update on every rank together
                break
            critic.backward(crit)
            critic.step()
            critic_updates += 1
            crit_value = float(crit.detach()) if crit_payloads else float("nan")
        return {"loss": float(total.detach()), "dmd_loss": float(dmd.detach()), "real_loss": float(real_loss.detach()),
                "critic_loss": crit_value, "critic_updates": critic_updates, **{k: v for k, v in metrics.items()},
                **{f"diag/{k}": v for k, v in real_info.items()}, **counts}

    def _critic_loss(self, payloads: list[dict], pad: int, rng: torch.Generator, step: int,
                     versions: list[int], refuse: bool = True) -> torch.Tensor | None:
        """Flow matching of the critic on the critic trajectories' x_hat (None when this rank has none;
        stand-ins enter with weight 0); ``refuse``: checked finite on every rank, halting the run if not."""
        critic = self.engines["critic"]
        terms, pad_terms = [], []
        for i, payload in enumerate(payloads + [self._stand_in("critic")] * pad):
            context = self._context(payload)
            loss, _ = critic_loss(critic.module, payload["x_hat"].to(self.device, self.dtype), context, rng,
                                  self.cfg.experiments.dmd_shift, self.cfg.experiments.critic_times)
            (terms if i < len(payloads) else pad_terms).append(loss)
        crit = torch.stack(terms).mean() if terms else None
        if pad_terms:  # weight 0, as the generator's stand-ins
            crit = 0.0 * torch.stack(pad_terms).sum() + (crit if crit is not None else 0.0)
        if refuse:
            self._refuse_non_finite(step, {"critic": crit}, versions)
        return crit

    def _refuse_non_finite(self, step: int, losses: dict, versions: list[int]) -> None:
        """Raise FloatingPointError on every rank when any rank's loss is NaN/Inf (a collective), before
        any optimizer step: no weight update, EMA update or weight publication happens for the step."""
        values = {name: float(loss.detach()) for name, loss in losses.items() if loss is not None}
        finite = all(math.isfinite(v) for v in values.values())
        bad = torch.zeros(self.world_size, device=self.device)
        bad[self.rank] = 0.0 if finite else 1.0
        if self.world_size > 1:
            torch.distributed.all_reduce(bad)
        if bad.any():
            self.halted = step  # steps and publishes the driver queued behind this one are refused
            ranks = [r for r in range(self.world_size) if bad[r] > 0]
            shown = " ".join(f"{name}={value:.4g}" for name, value in values.items())
            raise FloatingPointError(f"non-finite loss at step {step + 1} on learner rank(s) {ranks} (this is rank "
                                     f"{self.rank}: {shown}; trajectory weight versions {versions}).")

    def _all_ranks_have(self, flag: bool) -> bool:
        """True when ``flag`` holds on every rank (a collective: every rank must call it)."""
        if self.world_size == 1:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
        return bool(value.item())
