import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from anyflow_ray.training.losses import (FlowMapLossConfig, adaptive_normalise, draw_times_and_noise, flowmap_loss,
                                flowmap_terms, fused_guidance, sample_seeds, split_positions, total_derivative)
from anyflow_ray.models.architectures import tiny_transformer_config
from anyflow_ray.models.flowmap import WanFlowMapTransformer3DModel
from anyflow_ray.sampling.schedule import Beta08Weight

SHAPE = (3, 4, 8, 8)  # (C, F, H, W) small clips


def _tiny_flow_map(tiny_cfg, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    cfg = tiny_transformer_config(tiny_cfg.model.tiny, 3)
    model = WanFlowMapTransformer3DModel(**cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.to(dtype)


def _batch(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=g), torch.randn(n, 12, 32, generator=g), torch.zeros(1, 12, 32)


def test_global_batch_must_be_a_multiple_of_four():
    assert split_positions(8) == (4, 6)
    for bad in (6, 10, 0):
        with pytest.raises(ValueError, match="multiple of 4"):
            split_positions(bad)


def test_position_classes_and_time_order():
    x0, _, _ = _batch(8)
    idx = torch.arange(8)
    T, R, _, _ = draw_times_and_noise(x0, sample_seeds(0, 3, idx), idx, 8, FlowMapLossConfig())
    assert torch.equal(T[:4], R[:4])  # first half diagonal
    assert torch.all(R[4:6] == 0)  # next quarter r = 0
    assert torch.all(R[6:] < T[6:]) and torch.all(R[6:] > 0)  # the rest r < t
    assert torch.all((T >= 0) & (T <= 1000))


def test_on_the_diagonal_the_target_is_v(tiny_cfg):
    model = _tiny_flow_map(tiny_cfg)
    x0, c, u = _batch(8)
    idx = torch.arange(8)
    terms = flowmap_terms(model, x0, c, u, idx, 8, sample_seeds(0, 0, idx), Beta08Weight())
    diag = terms["T"] == terms["R"]
    assert diag.sum() == 4
    assert torch.equal(terms["target"][diag], terms["v"][diag])
    assert not torch.allclose(terms["target"][~diag], terms["v"][~diag])


def _teacher_and_student(tiny_cfg):
    """A random single-time Wan teacher and the flow map made from it (equal on the diagonal)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(3)
    teacher = WanTransformer3DModel(**tiny_transformer_config(tiny_cfg.model.tiny, 3))
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.02 * torch.randn_like(p))
    # from_base shares the base's storage: give the student its own copy, as loading it from disk does
    student = WanFlowMapTransformer3DModel.from_base(copy.deepcopy(teacher))
    return teacher.eval().requires_grad_(False), student


def test_teacher_target_is_the_teacher_velocity_and_keeps_the_data_loss_scale(tiny_cfg):
    teacher, student = _teacher_and_student(tiny_cfg)
    x0, c, u = _batch(8)
    idx, seeds = torch.arange(8), sample_seeds(0, 0, torch.arange(8))
    cfg = FlowMapLossConfig(guidance=1.0, target="teacher")
    terms = flowmap_terms(student, x0, c, u, idx, 8, seeds, Beta08Weight(), cfg, teacher=teacher)
    data = flowmap_terms(student, x0, c, u, idx, 8, seeds, Beta08Weight(), FlowMapLossConfig(guidance=1.0))
    diag = terms["T"] == terms["R"]
    # v is the teacher's velocity at the same (z, T, c), not eps - x0; on the diagonal the target is v
    assert not torch.allclose(terms["v"], data["v"])
    assert torch.equal(terms["target"][diag], terms["v"][diag])
    # a student made from the teacher already meets the diagonal target ...
    assert terms["per_sample"][diag].max() < 1e-8
    assert terms["per_sample"][~diag].min() > 1e-6
    # ... so the normaliser keeps the data flow-matching scale: off-diagonal terms equal the data-target
    # diagonal mean in value and still carry gradient
    assert torch.equal(terms["per_sample_fm"][diag], data["per_sample"][diag].detach())
    loss, metrics = flowmap_loss(student, x0, c, u, idx, 8, seeds, Beta08Weight(), cfg, teacher=teacher)
    m = float(data["per_sample"][diag].detach().mean())
    assert metrics["diag_loss_mean"] == pytest.approx(m, rel=1e-5)
    assert metrics["diag_target_loss"] < 1e-8
    off = terms["per_sample"][~diag].detach()
    expected = (terms["per_sample"][diag].detach().sum() + (off * m / (off + 1e-5)).sum()) / 8
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    assert float(expected) == pytest.approx(4 * m / 8, rel=0.01)
    loss.backward()
    assert sum(float(p.grad.abs().sum()) for p in student.parameters() if p.grad is not None) > 0


def test_teacher_target_needs_a_teacher_and_a_known_name(tiny_cfg):
    model = _tiny_flow_map(tiny_cfg)
    x0, c, u = _batch(4)
    idx = torch.arange(4)
    with pytest.raises(ValueError, match="needs the teacher"):
        flowmap_terms(model, x0, c, u, idx, 4, sample_seeds(0, 0, idx), Beta08Weight(),
                      FlowMapLossConfig(target="teacher"))
    with pytest.raises(ValueError, match="'oracle'"):
        flowmap_terms(model, x0, c, u, idx, 4, sample_seeds(0, 0, idx), Beta08Weight(),
                      FlowMapLossConfig(target="oracle"))


def test_adaptive_normalisation_sets_off_diagonal_losses_to_the_diagonal_mean():
    losses = torch.tensor([0.5, 1.5, 3.0, 0.2, 7.0, 0.01], requires_grad=True)
    diagonal = torch.tensor([True, True, False, False, False, False])
    out, m = adaptive_normalise(losses, diagonal, eps=1e-5)
    assert float(m) == pytest.approx(1.0)
    assert torch.equal(out[:2], losses[:2])
    assert torch.allclose(out[2:], torch.full((4,), 1.0), rtol=1e-3)  # l/(l+eps) ~ 1
    # gradient of an off-diagonal term is rescaled by m / (l + eps), not zeroed
    out.sum().backward()
    assert losses.grad[2] == pytest.approx(1.0 / (3.0 + 1e-5))
    assert losses.grad[0] == pytest.approx(1.0)


class SmoothFlowMap(torch.nn.Module):
    """A smooth two-time model: u = W2 tanh(W1 z + a T/1000 + b R/1000 + P c)."""

    is_flow_map = True

    def __init__(self, dim, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.nn.Parameter(torch.randn(dim, dim, generator=g, dtype=torch.float64) / dim**0.5)
        self.w2 = torch.nn.Parameter(torch.randn(dim, dim, generator=g, dtype=torch.float64) / dim**0.5)
        self.a = torch.nn.Parameter(torch.randn(dim, generator=g, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.randn(dim, generator=g, dtype=torch.float64))

    def forward(self, z, T, context, timestep_r=None, return_dict=False):
        flat = z.flatten(1)
        h = flat @ self.w1 + (T[:, None] / 1000) * self.a + (timestep_r[:, None] / 1000) * self.b
        h = h + context.mean(dim=(1, 2))[:, None]
        return ((torch.tanh(h) @ self.w2).reshape(z.shape),)


def test_finite_difference_agrees_with_jvp_on_a_smooth_model():
    """Central differences with delta = 5 (T units) against the exact JVP of a smooth model:
    relative error below 1e-4 (the O(delta^2) truncation error)."""
    dim = 3 * 2 * 2 * 2
    model = SmoothFlowMap(dim)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(4, 3, 2, 2, 2, generator=g, dtype=torch.float64)
    v = torch.randn(4, 3, 2, 2, 2, generator=g, dtype=torch.float64)
    T = torch.tensor([900.0, 500.0, 120.0, 40.0], dtype=torch.float64)
    R = torch.tensor([100.0, 0.0, 60.0, 40.0], dtype=torch.float64)
    c = torch.randn(4, 5, 6, generator=g, dtype=torch.float64)
    fd = total_derivative(model, z, v, T, R, c, "fd", 5.0)
    exact = total_derivative(model, z, v, T, R, c, "jvp")
    rel = (fd - exact).norm() / exact.norm()
    assert rel < 1e-4, float(rel)
    assert exact.norm() > 0
    with pytest.raises(ValueError, match="derivative"):
        total_derivative(model, z, v, T, R, c, "euler")


def test_jvp_runs_through_the_wan_flow_map(tiny_cfg):
    """The exact variant works on the real model (math attention kernel for forward-mode AD)."""
    model = _tiny_flow_map(tiny_cfg)
    x0, c, _ = _batch(2)
    T, R = torch.tensor([700.0, 300.0]), torch.tensor([100.0, 0.0])
    d = total_derivative(model, x0, torch.randn_like(x0), T, R, c, "jvp")
    assert d.shape == x0.shape and torch.isfinite(d).all() and d.abs().sum() > 0


def test_guidance_fusion_algebra_and_stop_gradient():
    class Affine(torch.nn.Module):
        """u = a * mean(context) + z: conditional and unconditional outputs differ through the context."""

        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(torch.tensor(2.0))

        def forward(self, z, T, context, return_dict=False):
            return (z + self.a * context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1, 1),)

    model = Affine()
    z = torch.zeros(2, 1, 1, 1, 1)
    T = torch.full((2,), 500.0)
    cond, uncond = torch.full((2, 3, 4), 1.0), torch.full((1, 3, 4), 0.5)
    g = 3.0
    u_hat = fused_guidance(model, z, T, T, cond, uncond, g)
    u_c, u_null = 2.0 * 1.0, 2.0 * 0.5
    assert torch.allclose(u_hat, torch.full_like(u_hat, (u_c - (1 - g) * u_null) / g))
    u_hat.sum().backward()
    # only the conditional branch carries gradient: d/da [a c - (1-g) sg(a n)] / g = c / g per sample
    assert model.a.grad.item() == pytest.approx(2 * 1.0 / g)


def _loss_and_grads(model, x0, c, u, idx, global_batch, all_reduce=None):
    model.zero_grad()
    loss, _ = flowmap_loss(model, x0, c, u, idx, global_batch, sample_seeds(5, 2, idx), Beta08Weight(),
                           all_reduce=all_reduce)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _rank_worker(rank, world, port, tiny_cfg, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = _tiny_flow_map(tiny_cfg)
    x0, c, u = _batch(8)
    local = torch.arange(rank * 4, rank * 4 + 4)
    loss, grads = _loss_and_grads(model, x0[local], c[local], u, local, 8, all_reduce=dist.all_reduce)
    dist.all_reduce(loss)
    for g in grads.values():  # DeepSpeed/DDP average gradients over ranks
        dist.all_reduce(g)
        g /= world
    if rank == 0:
        torch.save({"loss": loss / world, "grads": grads}, out_path)
    dist.destroy_process_group()


def test_two_ranks_of_b_equal_one_rank_of_2b(tiny_cfg, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "two_ranks.pt"
    mp.spawn(_rank_worker, args=(2, port, tiny_cfg, str(out)), nprocs=2, join=True)
    two = torch.load(out)
    model = _tiny_flow_map(tiny_cfg)
    x0, c, u = _batch(8)
    loss, grads = _loss_and_grads(model, x0, c, u, torch.arange(8), 8)
    assert torch.allclose(two["loss"], loss, rtol=1e-5, atol=1e-7)
    assert grads.keys() == two["grads"].keys()
    for name, g in grads.items():
        assert torch.allclose(two["grads"][name], g, rtol=1e-4, atol=1e-7), name


class ConstantX0(torch.nn.Module):
    """A single-time model whose x0-prediction is the constant ``target`` (any context but a zero one,
    which predicts ``null``): v = (z - x0) / t."""

    def __init__(self, target, null=None):
        super().__init__()
        self.target, self.null = target, target if null is None else null

    def forward(self, z, T, context, return_dict=False):
        is_null = (context.abs().sum(dim=(1, 2)) == 0).reshape(-1, 1, 1, 1, 1)
        x0 = torch.where(is_null, self.null, self.target)
        return ((z - x0) / (T / 1000).reshape(-1, 1, 1, 1, 1),)


def test_dmd_gradient_moves_samples_from_the_fake_toward_the_real_score():
    from anyflow_ray.training.losses import dmd_loss

    x_hat = torch.zeros(2, 1, 2, 2, 2, requires_grad=True)
    real, fake = torch.full_like(x_hat, 1.0), torch.full_like(x_hat, -1.0)
    teacher = ConstantX0(real.detach(), null=torch.zeros_like(real))
    critic = ConstantX0(fake.detach())
    context, uncond = torch.ones(2, 3, 4), torch.zeros(1, 3, 4)
    loss, _ = dmd_loss(x_hat, critic, teacher, context, uncond, torch.Generator().manual_seed(0), guidance=4.0)
    loss.backward()
    # x_R = 0 + 4 (1 - 0) = 4; G = (x_F - x_R) / mean|x_hat - x_R| = (-1 - 4) / 4; dL/dx_hat = 2 G / numel
    expected = 2 * (-5.0 / 4.0) / x_hat.numel()
    assert torch.allclose(x_hat.grad, torch.full_like(x_hat, expected), atol=1e-5)
    # a descent step moves x_hat toward the teacher's (CFG) prediction
    assert torch.all(-x_hat.grad > 0)


def test_critic_loss_is_zero_for_a_critic_that_knows_the_samples():
    from anyflow_ray.training.losses import critic_loss

    x_hat = torch.randn(3, 1, 2, 2, 2, generator=torch.Generator().manual_seed(1))
    loss, _ = critic_loss(ConstantX0(x_hat), x_hat, torch.ones(3, 3, 4), torch.Generator().manual_seed(2))
    assert float(loss) < 1e-8
    wrong, _ = critic_loss(ConstantX0(x_hat + 1), x_hat, torch.ones(3, 3, 4), torch.Generator().manual_seed(2))
    assert float(wrong) > 0.1


class TimeRecorder(torch.nn.Module):
    """A single-time model that records the times it is called at (velocity 0)."""

    def __init__(self):
        super().__init__()
        self.times = []

    def forward(self, z, T, context, timestep_r=None, return_dict=False):
        self.times.append(T.clone())
        return (torch.zeros_like(z),)


def test_critic_times_uniform_are_the_dmd_draw_and_the_shift_sets_both():
    """experiments.critic_times=uniform trains the critic at the noise levels DMD reads it at (the same draw for
    the same generator state); logit-normal (the reference) puts fewer of them in the tails; the shift passed
    (experiments.dmd_shift) moves both."""
    from anyflow_ray.training.losses import critic_loss, dmd_loss

    x_hat, context = torch.zeros(4096, 1, 1, 1, 1), torch.ones(4096, 1, 2)
    for shift in (5.0, 1.0):
        critic, dmd_critic = TimeRecorder(), TimeRecorder()
        critic_loss(critic, x_hat, context, torch.Generator().manual_seed(3), shift, times="uniform")
        dmd_loss(x_hat, dmd_critic, TimeRecorder(), context, context[:1], torch.Generator().manual_seed(3), shift, 1.0)
        assert torch.allclose(critic.times[0].clamp(min=1.0), dmd_critic.times[0])
        reference = TimeRecorder()
        critic_loss(reference, x_hat, context, torch.Generator().manual_seed(3), shift)  # logit-normal
        tails = [float(((t < 300) | (t > 980)).float().mean()) for t in (critic.times[0], reference.times[0])]
        assert tails[0] > 1.5 * tails[1], (shift, tails)
    assert float(dmd_critic.times[0].median()) < 600  # unshifted (1.0): median sigma 0.5; shift 5 puts it at 0.83


@pytest.mark.parametrize("micro_steps", [2, 3])
def test_micro_steps_of_a_global_batch_give_the_whole_batchs_gradient(tiny_cfg, micro_steps):
    """Gradient accumulation: the Stage-1 objective over 2 or 3 micro-steps of a 12-clip batch (with 3, the
    diagonal block ends inside the second) sums, at 1 / micro-steps each, to the one-step loss and gradient:
    the micro-steps sweep the batch in order and carry the normaliser's diagonal statistics."""
    from anyflow_ray.data.shards import ClipBatch
    from anyflow_ray.run.config import load_config
    from anyflow_ray.training.objectives import PretrainObjective, TrainData

    cfg = load_config(None, ["pretrain.global_batch=12"])
    x0, c, u = _batch(24)
    data = TrainData(ClipBatch(x0, c, [f"p{i}" for i in range(24)], torch.arange(24)), u)
    objective, model = PretrainObjective(data, cfg), _tiny_flow_map(tiny_cfg)

    def step(n):
        model.zero_grad()
        total, m = 0.0, []
        for micro in range(n):
            loss, metrics = objective.loss(model, 3, micro=micro, micro_steps=n)
            (loss / n).backward()
            total, m = total + float(loss.detach()) / n, m + [metrics["diag_loss_mean"]]
        return total, m[-1], {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    (whole, m_whole, grads), (parts, m_parts, accumulated) = step(1), step(micro_steps)
    assert parts == pytest.approx(whole, rel=1e-6) and m_parts == pytest.approx(m_whole, rel=1e-6)
    for name, g in grads.items():
        assert torch.allclose(accumulated[name], g, rtol=1e-5, atol=1e-7), name
    with pytest.raises(ValueError, match="does not split into 1 rank"):
        objective.loss(model, 3, micro=0, micro_steps=5)
