"""``DistillWorker``: the Stage-2 learner rank (docs/method.md §5), a ``LearnerWorker`` with three models.

Student G (trainable, from the Stage-1 EMA), frozen teacher R (real score), critic F (trainable copy
of the teacher, or with ``distill.critic=lora`` LoRA adapters on the frozen teacher itself: one copy of
the base weights, R is F with its adapters switched off). The method (the trajectory, the rollout
strategy, the DMD + co-training generator loss, the critic loss) is ``anyflow_ray/training/distill.py``;
this rank adds what needs the engines and the other ranks: it fetches its slice of the step's
trajectories (those lost with their actor or failing validation are counted, never used), pads ZeRO-3's
calls with zero-weight stand-ins, refuses a non-finite loss on every rank before any optimizer step,
steps the student, its EMA and the critic (``experiments.critic_updates`` times), and publishes weights
(learners/publish.py).
"""

from __future__ import annotations

import copy
import math

import ray
import torch
from ray.exceptions import GetTimeoutError, ObjectLostError, OwnerDiedError

from anyflow_ray.models.causal import is_causal
from anyflow_ray.models.loading import load_transformer
from anyflow_ray.training.export import job_model
from anyflow_ray.models.lora import AdaptersOff, apply_lora
from anyflow_ray.training.distill import DistillObjective, Trajectory, TrajectoryError, checked
from anyflow_ray.training.objectives import PretrainObjective
from anyflow_ray.training.seeds import step_generator
from learners.publish import WeightPublisher
from learners.ranks import every_rank
from learners.worker import LearnerWorker, deepspeed_config, job_zero_stage


class DistillWorker(WeightPublisher, LearnerWorker):
    def __init__(self, cfg: dict, job: str, rank: int, world_size: int):
        super().__init__(cfg, "pretrain", rank, world_size)  # reuses Stage-1 objective for co-training
        self.job = "distill"
        self.zero_stage = job_zero_stage(self.cfg, "distill")

    def _build(self) -> None:
        import deepspeed

        dc = self.cfg.distill
        self._progress("loading the student, the teacher and the critic")
        student = job_model(self.cfg, "distill", self.dtype)  # what a checkpoint's model is rebuilt from
        self.causal = is_causal(student)  # teacher and critic stay bidirectional (docs/method.md §6)
        teacher = load_transformer(dc.teacher, flow_map=False, dtype=self.dtype)
        shared = dc.critic == "lora"  # F = LoRA on the frozen teacher; R = the same module, adapters off
        critic = teacher if shared else copy.deepcopy(teacher)
        if self.cfg.model.lora.enabled:
            apply_lora(critic, self.cfg.model.lora)
        if self.cfg.model.gradient_checkpointing:
            student.enable_gradient_checkpointing()
            critic.enable_gradient_checkpointing()
        if shared:  # not frozen as a whole: that would freeze F's adapters too
            self.teacher = AdaptersOff(critic.to(self.device))
        else:
            self.teacher = teacher.to(self.device).eval().requires_grad_(False)
        self.data = self._load_data()
        # the co-training takes no bidirectional auxiliary step (the reference's FAR Stage 2 sets it to 0)
        co_training = PretrainObjective(self.data, self._co_training_cfg(), teacher=self.teacher, bidirectional_aux=0.0)
        self.objective = DistillObjective(self.cfg, co_training, self.causal, self.device, self.dtype)
        self.engines = {}
        for name, model in (("student", student), ("critic", critic)):
            params = [p for p in model.parameters() if p.requires_grad]
            lr = dc.critic_lr if name == "critic" else dc.lr
            opt = torch.optim.AdamW(params, lr=lr, betas=tuple(dc.betas), weight_decay=dc.weight_decay)
            config = deepspeed_config(self.cfg, "distill", self.cfg.rollout.batch_size, self.dtype)
            if name == "student":  # DMD and the co-training loss: two micro-steps of one optimizer step
                config["gradient_accumulation_steps"] = 2
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
    def _fetch(self, wrapped_refs: list, kind: str) -> tuple[list[Trajectory], int, int]:
        """(valid trajectories, lost, rejected)."""
        data = self.data
        good, lost, rejected = [], 0, 0
        for wrapped in wrapped_refs:
            try:
                payload = ray.get(wrapped[0], timeout=float(self.cfg.learner.timeouts.step))
            except (ObjectLostError, OwnerDiedError, GetTimeoutError):  # gone with its actor, or unreachable
                lost += 1
                continue
            try:
                good.append(checked(payload, data.clip_shape, len(data.clips), data.embedding_shape, self.causal,
                                    kind))
            except TrajectoryError:
                rejected += 1
        return good, lost, rejected

    def student_x_hat(self, trajectory: Trajectory) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_hat with gradient, its context): the rollout strategy's re-run (training/distill.py); the same
        calls on every rank under ZeRO-3, whatever (N, k)."""
        return self.objective.student_x_hat(self.engines["student"].module, trajectory, self.zero_stage == 3)

    # -- ZeRO-3: every model call gathers weights from all ranks, so all ranks make the same calls ------
    def _padding(self, *counts: int) -> list[int]:
        """How many zero-weight stand-in trajectories each of ``counts`` needs so that every rank runs as
        many as the busiest one (a collective under ZeRO-3; all zeros otherwise)."""
        if self.zero_stage < 3 or self.world_size == 1:
            return [0] * len(counts)
        most = torch.tensor(counts, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
        return [int(m) - c for m, c in zip(most.tolist(), counts)]

    def _stand_ins(self, kind: str, count: int) -> list[Trajectory]:
        return [self.objective.stand_in(kind, self.data.clip_shape)] * count

    # -- one step -----------------------------------------------------------------------------
    halted: int | None = None  # the step whose non-finite loss stopped this rank

    def _refuse_after_halt(self, what: str) -> None:
        """The driver may have queued a step and a publish behind the one that failed (one-step-off
        overlap); neither may apply or publish anything."""
        if self.halted is not None:
            raise FloatingPointError(f"{what} refused: step {self.halted + 1} had a non-finite loss")

    @every_rank
    def train_step(self, step: int, generator_refs: list = (), critic_refs: list = ()) -> dict:
        self._refuse_after_halt(f"step {step + 1}")
        # every rank is handed the whole batch and trains on its own slice
        gen_payloads, lost_g, rej_g = self._fetch(list(generator_refs)[self.rank::self.world_size], "generator")
        crit_payloads, lost_c, rej_c = self._fetch(list(critic_refs)[self.rank::self.world_size], "critic")
        counts = {"lost": lost_g + lost_c, "rejected": rej_g + rej_c,
                  "trained": len(gen_payloads) + len(crit_payloads)}
        rng = step_generator(self.cfg.run.seed, step, "rank", self.rank)
        gen_pad, crit_pad = self._padding(len(gen_payloads), len(crit_payloads))
        if self.zero_stage == 3 and not gen_payloads and not gen_pad:  # DMD's backward needs a graph through the
            gen_pad = 1  # gathered weights: a stand-in on every rank (none has a trajectory: all pad alike)

        student = self.engines["student"]
        student.train()
        all_reduce = torch.distributed.all_reduce if self.world_size > 1 else None
        versions = sorted({t.version for t in gen_payloads + crit_payloads})
        # The generator loss in two backward passes, DMD's then the co-training's, as the student engine's two
        # micro-steps (DeepSpeed accumulates, steps at the second): the same gradient as one graph of both,
        # and the peak holds one of them. The critic's graph is built after both are freed
        # (anyflow_ray/run/memory_plan.py); no optimizer steps before every loss is known to be finite.
        dmd, metrics = self.objective.dmd_part(student.module, self.engines["critic"].module, self.teacher,
                                               gen_payloads, self._stand_ins("generator", gen_pad), rng,
                                               x_hat_of=self.student_x_hat)
        self._refuse_non_finite(step, {"dmd": dmd}, versions)
        student.backward(self._in_graph(dmd), scale_wrt_gas=False)
        student.step()  # the first micro-step: no update yet
        real_loss, real_info = self.objective.co_training_part(student.module, step, self.rank, self.world_size,
                                                               all_reduce)
        self._refuse_non_finite(step, {"co-training": real_loss}, versions)
        student.backward(self.objective.real_weight * real_loss, scale_wrt_gas=False)
        total = dmd.detach() + self.objective.real_weight * real_loss.detach()
        metrics.update(real_info)

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
                "critic_loss": crit_value, "critic_updates": critic_updates, **metrics, **counts}

    def _in_graph(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` with a path to the trainable weights (at weight 0 when it has none of its own: a rank whose
        generator trajectories were all lost, below ZeRO-3, where the weights are whole; at ZeRO-3 a stand-in
        is always there), so its micro-step's backward runs like every rank's."""
        return loss if loss.requires_grad else loss + 0.0 * sum(p.sum() for p in self.trainable)

    def _critic_loss(self, payloads: list[Trajectory], pad: int, rng: torch.Generator, step: int,
                     versions: list[int], refuse: bool = True) -> torch.Tensor | None:
        """Flow matching of the critic on the critic trajectories' x_hat (None when this rank has none;
        stand-ins enter with weight 0); ``refuse``: checked finite on every rank, halting the run if not."""
        crit = self.objective.critic_loss(self.engines["critic"].module, payloads, self._stand_ins("critic", pad), rng)
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
