"""Stage 2's objective without Ray or DeepSpeed (anyflow_ray/training/distill.py): the trajectory's checks,
the rollout strategy the actor and the learner share, and the generator's and critic's losses."""

import copy
import dataclasses

import pytest
import torch

from anyflow_ray.data.shards import ClipBatch
from anyflow_ray.models.causal import WanCausalFlowMapTransformer3DModel
from anyflow_ray.models.loading import load_transformer
from anyflow_ray.run.config import load_config
from anyflow_ray.training.distill import (DistillObjective, Trajectory, TrajectoryError, checked,
                                          rollout_strategy)
from anyflow_ray.training.objectives import PretrainObjective, TrainData

SHAPE = (3, 8, 16, 16)  # one clip of the tiny model folder (C, F, H, W)
EMBEDDING = (12, 32)
TINY = ["model.tiny.num_layers=2", "model.tiny.ffn_dim=64"]


def _trajectory(kind="generator", **changes):
    trajectory = Trajectory(kind, torch.tensor([0, 5]), 4, 1, torch.zeros(2, *SHAPE), torch.full((2,), 900.0),
                            torch.full((2,), 700.0), x_hat=torch.zeros(2, *SHAPE) if kind == "critic" else None)
    return dataclasses.replace(trajectory, **changes)


# ---------------------------------------------------------------------------------------------- checks

def test_a_good_trajectory_passes_and_anything_else_in_the_buffer_is_refused():
    assert checked(_trajectory(), SHAPE, 10, None, False, "generator").k == 1
    with pytest.raises(TrajectoryError, match="expected a Trajectory, got a dict"):
        checked({"z_k": torch.zeros(2, *SHAPE)}, SHAPE, 10, None, False, "generator")
    with pytest.raises(TrajectoryError, match="a critic trajectory handed out as a generator one"):
        checked(_trajectory("critic"), SHAPE, 10, None, False, "generator")


@pytest.mark.parametrize("changes, message", [
    ({"z_k": torch.full((2, *SHAPE), float("nan"))}, "z_k holds NaN"),
    ({"z_k": torch.full((2, *SHAPE), float("inf"))}, "NaN/Inf"),
    ({"z_k": torch.zeros(2, 3, 4, 16, 16)}, "z_k has shape"),
    ({"T_next": torch.zeros(3)}, "T_next has shape"),
    ({"prompt_idx": torch.tensor([0, 10])}, "prompt_idx out of range"),
    ({"kind": "teacher"}, "kind 'teacher'"),
])
def test_bad_trajectories_are_named(changes, message):
    with pytest.raises(TrajectoryError, match=message):
        _trajectory(**changes).validate(SHAPE, num_prompts=10)


def test_a_critic_trajectory_needs_its_x_hat():
    with pytest.raises(TrajectoryError, match="critic trajectory lacks \\['x_hat'\\]"):
        _trajectory("critic", x_hat=None).validate(SHAPE, num_prompts=10)


def test_carried_prompt_embeddings_are_checked_instead_of_the_index():
    context = torch.zeros(2, *EMBEDDING)
    _trajectory(prompt_idx=torch.tensor([0, 99]), context=context).validate(SHAPE, 10, EMBEDDING)
    with pytest.raises(TrajectoryError, match="context has shape"):
        _trajectory(context=torch.zeros(2, 12, 16)).validate(SHAPE, 10, EMBEDDING)
    with pytest.raises(TrajectoryError, match="context holds NaN"):
        _trajectory(context=torch.full((2, *EMBEDDING), float("nan"))).validate(SHAPE, 10, EMBEDDING)


def test_a_causal_students_generator_trajectory_must_carry_finite_context_chunks_of_the_clip():
    chunks = torch.zeros(2, *SHAPE)
    _trajectory(context_chunks=chunks).validate(SHAPE, 10, causal=True)
    _trajectory("critic").validate(SHAPE, 10, causal=True)  # a critic trajectory carries its x_hat only
    with pytest.raises(TrajectoryError, match="lacks \\['context_chunks'\\]"):
        _trajectory().validate(SHAPE, 10, causal=True)
    with pytest.raises(TrajectoryError, match="context_chunks has shape"):
        _trajectory(context_chunks=torch.zeros(2, 3, 6, 16, 16)).validate(SHAPE, 10, causal=True)
    with pytest.raises(TrajectoryError, match="context_chunks holds NaN"):
        _trajectory(context_chunks=torch.full((2, *SHAPE), float("nan"))).validate(SHAPE, 10, causal=True)
    with pytest.raises(TrajectoryError, match="student is bidirectional"):
        _trajectory(context_chunks=chunks).validate(SHAPE, 10)


# ------------------------------------------------------------------------------------- tiny models

def _perturbed(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():  # random, non-trivial weights (a fresh Wan init zeroes some projections)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    """A bidirectional and a causal flow-map student, a frozen teacher and a trainable critic."""
    student = _perturbed(load_transformer(tiny_model_dir, flow_map=True), 1)
    causal = _perturbed(WanCausalFlowMapTransformer3DModel.from_base(load_transformer(tiny_model_dir), [2, 2, 2, 2]), 2)
    teacher = _perturbed(load_transformer(tiny_model_dir), 3).eval().requires_grad_(False)
    return {"student": student, "causal": causal, "teacher": teacher, "critic": copy.deepcopy(teacher).requires_grad_(True)}


EMBEDDINGS = torch.randn(16, *EMBEDDING, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("overrides, causal", [
    ([], False),
    (["distill.grad_scope=all"], False),
    (["distill.rollout=consistency"], False),
    (["model.causal.chunks=[2,2,2,2]", "pretrain.target=data"], True),
    (["model.causal.chunks=[2,2,2,2]", "pretrain.target=data", "distill.grad_scope=all"], True),
])
def test_the_learners_rerun_of_a_generator_trajectory_gives_the_actors_x_hat(models, overrides, causal):
    """One strategy on both sides: the learner's re-run (with gradient) of the generator trajectory drawn from a
    seed equals the x_hat the actor made for the critic trajectory of the same seed (same draws, same weights);
    a causal one's also equals the trajectory's own context_chunks."""
    cfg = load_config(None, [*TINY, "data.frames=8", "data.height=16", "data.width=16", *overrides])
    strategy = rollout_strategy(cfg, causal)
    student = models["causal" if causal else "student"]
    made = {kind: strategy.make(student, kind, 7, EMBEDDINGS, SHAPE, 2, 3, "cpu", torch.float32)
            for kind in ("generator", "critic")}
    generator, critic = made["generator"], made["critic"]
    assert (generator.num_steps, generator.k, generator.version) == (critic.num_steps, critic.k, 3)
    assert torch.equal(generator.prompt_idx, critic.prompt_idx) and torch.equal(generator.z_k, critic.z_k)
    assert (generator.noise is not None) == (strategy.scope == "all") and critic.noise is None
    generator.validate(SHAPE, len(EMBEDDINGS), causal=causal)
    critic.validate(SHAPE, len(EMBEDDINGS), causal=causal)
    x_hat = strategy.x_hat(student, generator, EMBEDDINGS[generator.prompt_idx])
    assert x_hat.requires_grad
    assert torch.allclose(x_hat.detach(), critic.x_hat, atol=1e-4), float((x_hat.detach() - critic.x_hat).abs().max())
    if causal:
        assert torch.allclose(generator.context_chunks, critic.x_hat, atol=1e-6)


def _objective(models, *overrides):
    cfg = load_config(None, [*TINY, "data.frames=8", "data.height=16", "data.width=16", "pretrain.global_batch=4",
                             "distill.real_weight=3.0", *overrides])
    g = torch.Generator().manual_seed(1)
    clips = ClipBatch(torch.randn(16, *SHAPE, generator=g), EMBEDDINGS, [f"p{i}" for i in range(16)], torch.arange(16))
    data = TrainData(clips, torch.zeros(1, *EMBEDDING))
    objective = DistillObjective(cfg, PretrainObjective(data, cfg, bidirectional_aux=0.0), causal=False)
    trajectories = [objective.strategy.make(models["student"], kind, seed, EMBEDDINGS, SHAPE, 2, 0, "cpu", torch.float32)
                    for kind, seed in (("generator", 1), ("generator", 2), ("critic", 3))]
    return objective, trajectories[:2], trajectories[2:]


def _generator_step(objective, models, trajectories, stand_ins):
    student = models["student"]
    student.zero_grad()
    losses, metrics = objective.generator_loss(student, models["critic"], models["teacher"], trajectories, stand_ins,
                                               step=0, rng=torch.Generator().manual_seed(5))
    losses["total"].backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    return losses, metrics, grads


def test_the_generator_loss_is_dmd_plus_the_weighted_co_training_and_stand_ins_change_nothing(models):
    objective, generators, _ = _objective(models)
    losses, metrics, grads = _generator_step(objective, models, generators, [])
    assert losses["total"].item() == pytest.approx(losses["dmd"].item() + 3.0 * losses["real"].item(), rel=1e-6)
    assert losses["dmd"].item() > 0 and losses["real"].item() > 0 and metrics["dmd_grad_norm"] > 0
    assert grads and any(g.abs().sum() > 0 for g in grads.values())  # DMD and co-training reach the student
    assert all(p.grad is None for p in models["teacher"].parameters())  # R is frozen
    # ZeRO-3's stand-ins: more calls, weight 0 (the same value and the same gradient)
    padded, _, padded_grads = _generator_step(objective, models, generators,
                                              [objective.stand_in("generator", SHAPE)] * 2)
    assert padded["total"].item() == pytest.approx(losses["total"].item(), rel=1e-6)
    assert padded_grads.keys() == grads.keys()
    assert all(torch.allclose(padded_grads[n], grads[n], atol=1e-7) for n in grads)
    # one trajectory fewer: another DMD mean (the losses read the trajectories they are given)
    fewer, _, _ = _generator_step(objective, models, generators[:1], [])
    assert fewer["dmd"].item() != pytest.approx(losses["dmd"].item(), rel=1e-6)
    assert fewer["real"].item() == pytest.approx(losses["real"].item(), rel=1e-6)  # the same real clips


def test_the_critic_loss_trains_the_critic_on_the_trajectories_x_hat_only(models):
    objective, _, critics = _objective(models, "experiments.critic_times=uniform")
    assert objective.critic_times == "uniform" and objective.shift == objective.cfg.schedule.shift
    critic = models["critic"]
    assert objective.critic_loss(critic, [], [], torch.Generator().manual_seed(0)) is None  # nothing to train on
    critic.zero_grad()
    loss = objective.critic_loss(critic, critics, [objective.stand_in("critic", SHAPE)], torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.item() > 0 and any(p.grad is not None and p.grad.abs().sum() > 0 for p in critic.parameters())
    alone = objective.critic_loss(critic, critics, [], torch.Generator().manual_seed(0))
    assert alone.item() == pytest.approx(loss.item(), rel=1e-6)  # the stand-in enters with weight 0
