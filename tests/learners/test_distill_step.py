"""One Stage-2 learner step driven directly through the LearnerGroup (no driver, no rollout actors): what
the student and the critic step, and what a rank publishes for the actors (the student's weights or their
EMA, gathered whole under ZeRO-3)."""

import math

from pathlib import Path

import pytest
import ray
import torch
from diffusers import AnyFlowTransformer3DModel

from anyflow_ray.formats import LORA_FILE
from anyflow_ray.pipeline import AnyFlowRayPipeline
from anyflow_ray.training.export import export_lora, open_pipeline
from anyflow_ray.training.distill import Trajectory
from learners.distill import DistillWorker
from learners.group import LearnerGroup
from tests.probes import EmaProbe, ZeRO3Probe, run_cfg


def _trajectories(n: int, kind: str) -> list:
    if kind == "generator":
        return [[ray.put(Trajectory("generator", torch.tensor([2 * i, 2 * i + 1]), 2, 0, torch.randn(2, 3, 8, 16, 16),
                                    torch.full((2,), 1000.0), torch.full((2,), 833.0)))] for i in range(n)]
    return [[ray.put(Trajectory("critic", torch.tensor([i, i + 4]), 2, 0, torch.zeros(2, 3, 8, 16, 16),
                                torch.full((2,), 1000.0), torch.full((2,), 833.0), x_hat=torch.randn(2, 3, 8, 16, 16)))]
            for i in range(n)]


def test_zero3_publishes_whole_weights_and_exports_the_gathered_partition_wise_ema(ray_local, prepared_run, tmp_path):
    """2 ranks at ZeRO-3: each rank's EMA averages its own (non-empty) partition; publish_weights returns the
    whole parameters from rank 0 (None elsewhere); the export is the whole EMA: decay x initial + (1 - decay) x
    trained after one step."""
    from anyflow_ray.models.loading import load_transformer

    cfg = run_cfg(prepared_run, "distill.num_ranks=2", "learner.zero_stage=3", "distill.ema=0.9",
                  "distill.ema_warmup=0", "distill.lr=1e-2")
    group = LearnerGroup(cfg, "distill", num_ranks=2, worker_cls=ZeRO3Probe)
    try:
        sizes = group.call("partition_sizes")
        initial = load_transformer(cfg.distill.init, flow_map=True, gate=cfg.model.gate).state_dict()
        for rank in sizes:
            assert set(rank["placeholders"]) == {0} and rank["ema"] == rank["local"] and all(rank["ema"])
        assert sum(sum(rank["ema"]) for rank in sizes) >= sum(t.numel() for t in initial.values())

        wrapped, other = group.call("publish_weights", True)
        assert other is None
        before = ray.get(wrapped[0])
        assert sorted(before) == sorted(initial)
        assert all(torch.equal(before[n], initial[n]) for n in initial)  # whole shapes, the loaded values

        trained = []
        for step in range(2):  # the second step: ZeRO-3 now keeps its small parameters whole between steps
            result = group.call("train_step", step, _trajectories(2, "generator"), _trajectories(2, "critic"))
            assert [r["trained"] for r in result] == [2, 2]
            wrapped, other = group.call("publish_weights")
            after, gathered = ray.get(wrapped[0]), group.call("gathered_trainable")[0]
            assert other is None and sorted(after) == sorted(gathered) and set(after) <= set(initial)
            assert all(torch.equal(after[n], gathered[n]) for n in after)
            trained.append(after)
        assert any(not torch.equal(trained[1][n], before[n]) for n in before)

        group.call("export_pipeline", str(tmp_path / "export"))
        exported = AnyFlowRayPipeline.from_pretrained(tmp_path / "export").transformer.state_dict()
        for name in trained[0]:
            ema = 0.81 * before[name] + 0.09 * trained[0][name] + 0.1 * trained[1][name]
            assert exported[name].shape == initial[name].shape and torch.isfinite(exported[name]).all()
            assert torch.allclose(exported[name], ema, atol=1e-6), name
        assert all(torch.equal(exported[n], initial[n]) for n in initial if n not in after)  # frozen: as loaded
    finally:
        group.shutdown()


def test_zero3_ranks_with_uneven_trajectories_stay_in_step_with_a_lora_critic(ray_local, prepared_run, tmp_path):
    """Every ZeRO-3 model call gathers weights from all ranks: a rank with fewer trajectories (lost, rejected,
    or an uneven batch) runs zero-weight stand-ins, so the ranks never wait on different calls."""
    cfg = run_cfg(prepared_run, "distill.num_ranks=2", "distill.zero_stage=3", "model.lora.enabled=true",
                  "model.lora.rank=4", "model.lora.alpha=4", "distill.critic=lora", "distill.lr=1e-2",
                  "model.lora.flow_map_targets=[delta_embedder.linear_1,delta_embedder.linear_2]")
    group = LearnerGroup(cfg, "distill", num_ranks=2, worker_cls=ZeRO3Probe)
    try:
        for step in range(2):  # rank 0 gets a generator trajectory, rank 1 none
            result = group.call("train_step", step, _trajectories(1, "generator"), _trajectories(2, "critic"))
            assert [r["trained"] for r in result] == [2, 1]
        wrapped, _ = group.call("publish_weights")
        after, gathered = ray.get(wrapped[0]), group.call("gathered_trainable")[0]
        assert sorted(after) == sorted(gathered) and all(torch.equal(after[n], gathered[n]) for n in after)
        group.call("export_pipeline", str(tmp_path / "export"))
        exported = AnyFlowRayPipeline.from_pretrained(tmp_path / "export").transformer.state_dict()
        assert all(torch.isfinite(t).all() and t.numel() > 0 for t in exported.values())
        # the checkpoint's EMA partitions of the adapters, put together and fused offline as the ranks fuse them
        ckpt = Path(group.call("save", str(tmp_path / "run"), 2)[0])
        offline = open_pipeline(ckpt).transformer.state_dict()
        assert sorted(offline) == sorted(exported) and all(torch.equal(offline[n], exported[n]) for n in exported)
        # `anyflow-ray export --lora`: the adapters alone, loaded by diffusers onto the stage's init
        lora = export_lora(ckpt, tmp_path / "lora", "fp32")
        base = AnyFlowTransformer3DModel.from_pretrained(Path(cfg.distill.init) / "transformer").eval()
        base.load_lora_adapter(str(lora / LORA_FILE), prefix="transformer")
        fused = AnyFlowTransformer3DModel.from_pretrained(tmp_path / "export" / "transformer").eval()
        z, T = torch.randn(1, 4, 3, 16, 16), torch.tensor([[700.0] * 4])
        context = torch.randn(1, 6, fused.config.text_dim)
        with torch.no_grad():
            a, b = (m(z, T, 0.4 * T, context, return_dict=False)[0] for m in (base, fused))
        assert (a - b).abs().max() < 1e-5
    finally:
        group.shutdown()


def test_lora_critic_on_the_frozen_teacher_trains(ray_local, prepared_run):
    group = LearnerGroup(run_cfg(prepared_run, "model.lora.enabled=true", "model.lora.rank=4", "model.lora.alpha=4",
                                 "distill.critic=lora"), "distill", worker_cls=DistillWorker)
    try:
        result = group.call("train_step", 0, _trajectories(1, "generator"), _trajectories(1, "critic"))[0]
        assert result["trained"] == 2 and torch.isfinite(torch.tensor([result["loss"], result["critic_loss"]])).all()
    finally:
        group.shutdown()


class CriticStepProbe(DistillWorker):
    """Reports how many optimizer steps each engine has taken."""

    def train_step(self, step, generator_refs=(), critic_refs=()):
        result = super().train_step(step, generator_refs, critic_refs)
        return {**result, **{f"{name}_steps": engine.global_steps for name, engine in self.engines.items()}}


class OneGraphProbe(CriticStepProbe):
    """Compares the student's gradient after the step's two backward passes (DMD, then the co-training loss)
    with the gradient of their sum as one graph, computed first from the same trajectories and draws."""

    def train_step(self, step, generator_refs=(), critic_refs=()):
        from anyflow_ray.training.seeds import step_generator

        student = self.engines["student"]
        payloads, _, _ = self._fetch(list(generator_refs), "generator")
        losses, _ = self.objective.generator_loss(student.module, self.engines["critic"].module, self.teacher,
                                                  payloads, [], step, step_generator(self.cfg.run.seed, step, "rank", 0),
                                                  x_hat_of=self.student_x_hat)
        dmd = torch.autograd.grad(losses["dmd"], self.trainable, retain_graph=True)
        real = torch.autograd.grad(self.objective.real_weight * losses["real"], self.trainable)
        seen, take = {}, student.step

        def step_and_look():  # before the boundary step: the accumulated, not yet clipped gradient
            if student.is_gradient_accumulation_boundary():
                seen["grads"] = [p.grad.clone() for p in self.trainable]
            take()

        student.step = step_and_look
        try:
            result = super().train_step(step, generator_refs, critic_refs)
        finally:
            student.step = take
        def scale(grads):
            return max(float(g.abs().max()) for g in grads)

        error = max(float((a - d - r).abs().max()) for a, d, r in zip(seen["grads"], dmd, real))
        return {**result, "one_graph_loss": float(losses["total"].detach()),  # the error against each part's size
                "gap_dmd": error / max(scale(dmd), 1e-30), "gap_real": error / scale(real), "dmd_scale": scale(dmd)}


def test_the_two_backward_passes_give_the_one_graph_gradient_and_one_optimizer_step(ray_local, prepared_run):
    group = LearnerGroup(run_cfg(prepared_run), "distill", worker_cls=OneGraphProbe)
    try:  # step 0 moves the critic off the teacher, so that DMD's gradient is not 0 at step 1
        for step in (0, 1):
            result = group.call("train_step", step, _trajectories(1, "generator"), _trajectories(1, "critic"))[0]
        assert result["dmd_scale"] > 0 and result["gap_dmd"] < 1e-4 and result["gap_real"] < 1e-4
        assert result["loss"] == pytest.approx(result["one_graph_loss"], rel=1e-6)
        assert (result["student_steps"], result["critic_steps"]) == (2, 2)
    finally:
        group.shutdown()


def test_critic_updates_step_the_critic_that_many_times_per_student_step(ray_local, prepared_run):
    group = LearnerGroup(run_cfg(prepared_run, "experiments.critic_updates=3"), "distill", worker_cls=CriticStepProbe)
    try:
        first = group.call("train_step", 0, _trajectories(1, "generator"), _trajectories(1, "critic"))[0]
        assert (first["student_steps"], first["critic_steps"]) == (1, 3)
        # no critic trajectory this step: no critic update at all, the student still steps
        second = group.call("train_step", 1, _trajectories(1, "generator"), [])[0]
        assert (second["student_steps"], second["critic_steps"]) == (2, 3)
        assert math.isnan(second["critic_loss"]) and math.isfinite(first["critic_loss"])
    finally:
        group.shutdown()


@pytest.mark.parametrize("zero", [0, 3])
def test_rollout_weights_ema_publishes_the_students_ema_not_its_trained_weights(ray_local, prepared_run, zero):
    """experiments.rollout_weights=ema: the actors get the EMA (decay x initial + (1 - decay) x trained after one
    step at warm-up 0), at ZeRO-0 from rank 0's whole EMA and at ZeRO-3 gathered from each rank's partition."""
    ranks = 2 if zero == 3 else 1
    cfg = run_cfg(prepared_run, "experiments.rollout_weights=ema", "distill.ema=0.5", "distill.ema_warmup=0",
                  "distill.lr=1e-2", f"distill.num_ranks={ranks}", f"learner.zero_stage={zero}")
    group = LearnerGroup(cfg, "distill", num_ranks=ranks, worker_cls=EmaProbe)
    try:
        initial = group.call("gathered_trainable")[0]
        group.call("train_step", 0, _trajectories(ranks, "generator"), _trajectories(ranks, "critic"))
        trained, ema = group.call("gathered_trainable")[0], group.call("gathered_ema")[0]
        published = ray.get(group.call("publish_weights")[0][0])
        assert sorted(published) == sorted(trained) == sorted(ema)
        assert any(not torch.equal(trained[n], initial[n]) for n in trained)  # the step moved the weights
        for name in published:
            assert torch.allclose(published[name], ema[name]), name
            assert torch.allclose(ema[name], 0.5 * initial[name] + 0.5 * trained[name], atol=1e-6), name
        assert any(not torch.allclose(published[n], trained[n]) for n in published)
    finally:
        group.shutdown()


class LaterCriticLossNaN(CriticStepProbe):
    """The second critic loss of step 0 (the first of the extra updates) is NaN."""

    def _critic_loss(self, payloads, pad, rng, step, versions, refuse=True):
        loss = super()._critic_loss(payloads, pad, rng, step, versions, refuse)
        if step == 0 and not refuse and not getattr(self, "poisoned", False):
            self.poisoned = True
            return loss * float("nan")
        return loss


def test_a_non_finite_extra_critic_update_ends_the_critic_updates_of_the_step_not_the_run(ray_local, prepared_run):
    """With experiments.critic_updates=3 the step is applied before the extra critic losses exist: a NaN one
    stops the critic's updates for that step (1 of 3 taken) without halting, and the next step runs all 3."""
    group = LearnerGroup(run_cfg(prepared_run, "experiments.critic_updates=3"), "distill", worker_cls=LaterCriticLossNaN)
    try:
        first = group.call("train_step", 0, _trajectories(1, "generator"), _trajectories(1, "critic"))[0]
        assert (first["student_steps"], first["critic_steps"], first["critic_updates"]) == (1, 1, 1)
        assert math.isfinite(first["critic_loss"])
        second = group.call("train_step", 1, _trajectories(1, "generator"), _trajectories(1, "critic"))[0]
        assert (second["student_steps"], second["critic_steps"], second["critic_updates"]) == (2, 4, 3)
        assert ray.get(group.call("publish_weights")[0][0])  # not halted: publishing still works
    finally:
        group.shutdown()
