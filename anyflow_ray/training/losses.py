"""Losses: teacher flow matching (docs/method.md §3), the Stage-1 flow-map loss (§4; teacher-forced for the
causal student, §6) and Stage 2's DMD and critic losses (§5).

Random draws come from an explicit ``torch.Generator`` (on the CPU, moved to the model's device) so
that a run is reproducible and resumable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from anyflow_ray.models.flowmap import call_model
from anyflow_ray.sampling.schedule import (T_SCALE, Beta08Weight, add_noise, broadcast_time, sample_logit_normal,
                                           shift_time, velocity_target)
from anyflow_ray.training.seeds import step_generator, step_seed


def randn_like(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(device=x.device, dtype=x.dtype)


def null_like(uncond: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """c_null (1, L, D) as a batch of ``context``'s shape and dtype: the unconditional branch's prompts."""
    return uncond.to(context.dtype).expand_as(context)


def drop_prompts(context: torch.Tensor, uncond: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """Prompt dropout: sample i's embedding replaced by c_null where ``drop[i]`` (a (B,) bool mask)."""
    return torch.where(drop.to(context.device)[:, None, None], null_like(uncond, context), context)


def teacher_loss(model: torch.nn.Module, x0: torch.Tensor, context: torch.Tensor, uncond: torch.Tensor,
                 generator: torch.Generator, shift: float = 5.0, uncond_prob: float = 0.1) -> tuple[torch.Tensor, dict]:
    """Single-time flow matching: logit-normal t then sigma_s, 10% unconditional, unweighted MSE to v."""
    batch = x0.shape[0]
    T = T_SCALE * sample_logit_normal(batch, generator, shift).to(x0.device)
    context = drop_prompts(context, uncond, torch.rand(batch, generator=generator) < uncond_prob)
    noise = randn_like(x0, generator)
    z = add_noise(x0, noise, T)
    pred = call_model(model, z, T, context)
    loss = (pred.float() - velocity_target(x0, noise).float()).pow(2).mean()
    return loss, {"t_mean": float(T.mean()) / T_SCALE}


# ---------------------------------------------------------------------------------------------
# Stage 1: forward flow-map training (docs/method.md §4)
# ---------------------------------------------------------------------------------------------

@dataclass
class FlowMapLossConfig:
    shift: float = 5.0
    guidance: float = 3.0  # g of the guidance fusion (CFG baked into the student)
    delta: float = 5.0  # central-difference step in T units
    uncond_prob: float = 0.1
    derivative: str = "fd"  # "fd" (central difference, the default) or "jvp" (torch.func.jvp, exact)
    norm_eps: float = 1e-5
    # The velocity v in the target and in the derivative's direction. "data": eps - x0 (docs/method.md §4).
    # "teacher": the frozen teacher's conditional velocity at (z, T, c), i.e. its estimate of
    # E[eps - x0 | z, c]; the derivative is linear in v (exactly for jvp, up to O(delta^2) for fd), so
    # the expected target and the fixed point are the data target's when the teacher is exact, without
    # the variance of a single x0 (one more call).
    target: str = "data"


VELOCITY_TARGETS = ("data", "teacher")
AUX_STREAM = 0x5DEECE66D  # xor-ed into a sample's seed: the bidirectional auxiliary step's own draws


@dataclass(frozen=True)
class ChunkLayout:
    """The chunks of one causal Stage-1 step (docs/method.md §6): a prefix of the clip's chunks (``sizes``,
    latent frames each); the first ``context`` of them are clean context only, the rest are noised."""
    sizes: tuple[int, ...]
    context: int = 0

    @property
    def frames(self) -> int:
        return sum(self.sizes)

    @property
    def first_noised_frame(self) -> int:
        return sum(self.sizes[:self.context])

    def noised(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(n,) fp32: 1 for a noised chunk, 0 for a clean-context one."""
        return (torch.arange(len(self.sizes), device=device) >= self.context).float()

    def per_frame(self, per_chunk: torch.Tensor) -> torch.Tensor:
        """(B, n) per-chunk values -> (B, 1, F, 1, 1), broadcastable against a (B, C, F, H, W) clip."""
        sizes = torch.tensor(self.sizes, device=per_chunk.device)
        return per_chunk.float().repeat_interleave(sizes, dim=1)[:, None, :, None, None]


def draw_layout(chunks: list[int], noisy_chunks: int = 0, long_context_prob: float = 0.0, run_seed: int = 0,
                step: int = 0) -> ChunkLayout:
    """The reference's FAR draw (``model.causal.*``): with ``noisy_chunks`` 0, the whole clip, every chunk
    noised. Otherwise the first ``noisy_chunks`` chunks, all noised, or with probability
    ``long_context_prob`` a prefix of U{noisy_chunks, ..., all} chunks whose last ``noisy_chunks`` are
    noised after the clean context. Seeded by (run seed, step) alone: every rank draws the same layout."""
    if not noisy_chunks:
        return ChunkLayout(tuple(int(c) for c in chunks))
    gen = step_generator(run_seed, step, "layout")
    used = noisy_chunks
    if float(torch.rand((), generator=gen, dtype=torch.float64)) < long_context_prob:
        used = int(torch.randint(noisy_chunks, len(chunks) + 1, (), generator=gen))
    return ChunkLayout(tuple(int(c) for c in chunks[:used]), context=used - noisy_chunks)


def bidirectional_loss(model: torch.nn.Module, x0: torch.Tensor, context: torch.Tensor, uncond: torch.Tensor,
                       seeds: list[int], cfg: FlowMapLossConfig = FlowMapLossConfig()) -> torch.Tensor:
    """The causal student's bidirectional auxiliary step (docs/method.md §6, ``model.causal.bidirectional_aux``):
    plain flow matching over the whole clip with full attention, as the reference's ``is_causal=False``
    step: T logit-normal then shifted, R = T, the fused guidance of §4, unweighted MSE to eps - x0.
    ``context``: the prompts after this step's dropout. Draws from its own stream of the sample seeds."""
    T, noise = [], []
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed ^ AUX_STREAM)
        T.append(sample_logit_normal(1, gen, cfg.shift))
        noise.append(torch.randn(x0.shape[1:], generator=gen, dtype=torch.float32))
    T = (T_SCALE * torch.cat(T)).to(x0.device)
    noise = torch.stack(noise).to(x0.device, x0.dtype)
    pred = fused_guidance(model, add_noise(x0, noise, T), T, T, context, uncond, cfg.guidance, bidirectional=True)
    return (pred.float() - velocity_target(x0, noise).float()).pow(2).mean()


def split_positions(global_batch: int) -> tuple[int, int]:
    """(end of diagonal block, end of r = 0 block) in a global batch; refuses sizes not divisible by 4."""
    if global_batch <= 0 or global_batch % 4:
        raise ValueError(f"the Stage-1 global batch must be a positive multiple of 4 (50/25/25 split of "
                         f"diagonal / r=0 / r<t samples), got {global_batch}")
    return global_batch // 2, 3 * global_batch // 4


def sample_seeds(run_seed: int, step: int, global_indices: torch.Tensor) -> list[int]:
    """One seed per sample from (run seed, step, position in the global batch): the draws of sample i do
    not depend on how the global batch is sharded over ranks."""
    return [step_seed(run_seed, step, "sample", int(i)) for i in global_indices]


def draw_times_and_noise(x0: torch.Tensor, seeds: list[int], global_indices: torch.Tensor, global_batch: int,
                         cfg: FlowMapLossConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(T, R, drop, eps) for a rank's slice of the global batch. T = 1000 sigma(max), R per position class."""
    diag_end, zero_end = split_positions(global_batch)
    u, drop, noise = [], [], []
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed)
        u.append(torch.rand(2, generator=gen, dtype=torch.float64))
        drop.append(bool(torch.rand((), generator=gen) < cfg.uncond_prob))
        noise.append(torch.randn(x0.shape[1:], generator=gen, dtype=torch.float32))
    u = torch.stack(u)
    t, r = u.max(dim=1).values, u.min(dim=1).values
    pos = global_indices.cpu()
    r = torch.where(pos < diag_end, t, torch.where(pos < zero_end, torch.zeros_like(r), r))
    T = (T_SCALE * shift_time(t, cfg.shift)).float().to(x0.device)
    R = (T_SCALE * shift_time(r, cfg.shift)).float().to(x0.device)
    R = torch.where(pos.to(x0.device) < diag_end, T, R)  # exactly diagonal, no rounding difference
    return T, R, torch.tensor(drop, device=x0.device), torch.stack(noise).to(x0.device, x0.dtype)


def student_output(model: torch.nn.Module, z: torch.Tensor, T: torch.Tensor, context: torch.Tensor, R: torch.Tensor,
                   clean: torch.Tensor | None = None, bidirectional: bool = False) -> torch.Tensor:
    """u(z, T, R, c); with ``clean`` the causal student's teacher-forcing call (docs/method.md §6): noisy chunk
    j reads the clean chunks before it and itself, and only the noisy tokens' outputs come back;
    ``bidirectional``: the causal student with full attention (its auxiliary step)."""
    if bidirectional:
        return model(z, T, context, timestep_r=R, bidirectional=True, return_dict=False)[0]
    if clean is None:
        return call_model(model, z, T, context, R)
    return model(z, T, context, timestep_r=R, clean_states=clean, return_dict=False)[0]


@torch.no_grad()
def total_derivative(model: torch.nn.Module, z: torch.Tensor, v: torch.Tensor, T: torch.Tensor, R: torch.Tensor,
                     context: torch.Tensor, method: str = "fd", delta: float = 5.0, clean: torch.Tensor | None = None,
                     time_tangent: torch.Tensor | None = None) -> torch.Tensor:
    """d/dT of u(z_T, T, R, c) along the path dz/dT = v/1000, in fp32 (per unit of T).

    ``fd``: [u(z + (delta/1000) v, T + delta) - u(z - (delta/1000) v, T - delta)] / (2 delta).
    ``jvp``: exact forward-mode derivative with tangents (v/1000, 1).
    Causal student (§6): ``clean`` is the teacher-forcing copy, held fixed; ``T``, ``R`` are per chunk (B, n)
    and ``time_tangent`` (1 on noised chunks, 0 on clean-context ones) says which times move with the path.
    """
    tangent = torch.ones_like(T) if time_tangent is None else time_tangent
    if method == "fd":
        step = (delta / T_SCALE) * v
        plus = student_output(model, z + step, T + delta * tangent, context, R, clean).float()
        minus = student_output(model, z - step, T - delta * tangent, context, R, clean).float()
        return (plus - minus) / (2.0 * delta)
    if method == "jvp":
        fn = lambda z_, T_: student_output(model, z_, T_, context, R, clean)  # noqa: E731
        # forward-mode AD needs the math attention kernel (fused CPU/GPU kernels lack it)
        with sdpa_kernel(SDPBackend.MATH):
            _, out = torch.func.jvp(fn, (z, T), (v / T_SCALE, tangent))
        return out.float()
    raise ValueError(f"derivative method must be 'fd' or 'jvp', got {method!r}")


def fused_guidance(model: torch.nn.Module, z: torch.Tensor, T: torch.Tensor, R: torch.Tensor, context: torch.Tensor,
                   uncond: torch.Tensor, g: float, clean: torch.Tensor | None = None,
                   bidirectional: bool = False) -> torch.Tensor:
    """u_hat = [u(z, T, R, c) - (1 - g) sg(u(z, T, R, c_null))] / g: CFG g baked into the student."""
    cond = student_output(model, z, T, context, R, clean, bidirectional)
    if g == 1.0:
        return cond
    with torch.no_grad():
        null = student_output(model, z, T, null_like(uncond, context), R, clean, bidirectional)
    return (cond.float() - (1.0 - g) * null.float()) / g


def adaptive_normalise(losses: torch.Tensor, diagonal: torch.Tensor, eps: float = 1e-5,
                       all_reduce=None, reference: torch.Tensor | None = None,
                       carried: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Off-diagonal l_i <- l_i sg(m / (l_i + eps)), m = mean l over diagonal samples of *all* ranks.

    ``reference``: per-sample losses whose diagonal mean is m (default ``losses`` themselves).
    ``all_reduce(tensor)`` sums a tensor over ranks in place (None: one process). ``carried``: the
    (sum, count) of the diagonal samples of earlier micro-steps of the same step (gradient accumulation),
    updated in place; m is then over every micro-step so far. Returns (losses, m).
    """
    reference = losses if reference is None else reference
    with torch.no_grad():
        stats = torch.stack([(reference.detach() * diagonal).sum(), diagonal.sum().to(losses.dtype)])
        if all_reduce is not None:
            all_reduce(stats)
        if carried is not None:
            carried += stats.to(carried.device, carried.dtype)
            stats = carried.to(stats.dtype)
        m = stats[0] / stats[1].clamp_min(1.0)
    scale = (m / (losses.detach() + eps))
    return torch.where(diagonal, losses, losses * scale), m


def flowmap_terms(model: torch.nn.Module, x0: torch.Tensor, context: torch.Tensor, uncond: torch.Tensor,
                  global_indices: torch.Tensor, global_batch: int, seeds: list[int], weight: Beta08Weight,
                  cfg: FlowMapLossConfig = FlowMapLossConfig(), teacher: torch.nn.Module | None = None,
                  layout: ChunkLayout | None = None) -> dict[str, torch.Tensor]:
    """Steps 1-7 of docs/method.md §4 for this rank's slice: times, fused prediction, target, weighted losses.

    ``per_sample_fm`` is the flow-matching loss against the data velocity eps - x0 whatever
    ``cfg.target`` is; only its diagonal entries are used: their mean is the scale the adaptive
    normalisation brings every off-diagonal loss to (with the teacher's velocity as target and no fused
    CFG, a student that starts as the teacher has a diagonal loss of 0, which would switch the
    off-diagonal terms off).

    ``layout`` (the causal student, §6): teacher forcing. The clip is cut to ``layout.frames``; its noised
    chunks share the sample's (T, R) and its clean-context chunks sit at T = R = 0; the model reads the
    clean copy ``x0`` beside them, and the loss (the total derivative's path included) covers the noised
    chunks' frames only.
    """
    if cfg.target not in VELOCITY_TARGETS:
        raise ValueError(f"pretrain.target must be one of {VELOCITY_TARGETS}, got {cfg.target!r}")
    if cfg.target == "teacher" and teacher is None:
        raise ValueError("pretrain.target='teacher' needs the teacher model, none was given")
    if layout is not None:
        if cfg.target != "data":
            raise ValueError("pretrain.target must be 'data' for a causal student: the bidirectional teacher's "
                             "velocity sees noisy, not clean, earlier chunks (docs/method.md §6)")
        x0 = x0[:, :, :layout.frames]
    T, R, drop, noise = draw_times_and_noise(x0, seeds, global_indices, global_batch, cfg)
    context = drop_prompts(context, uncond, drop)
    v_data = velocity_target(x0, noise).float()
    clean, tangent, noised = None, None, slice(None)
    T_in, R_in, gap = T, R, broadcast_time(T - R, v_data)
    if layout is not None:
        tangent = layout.noised(x0.device).expand(x0.shape[0], -1)  # (B, n): 1 on noised chunks
        T_in, R_in = T[:, None] * tangent, R[:, None] * tangent
        gap = layout.per_frame(T_in - R_in)
        z = add_noise(x0, noise, layout.per_frame(T_in))  # a time per frame: x0 itself in context chunks
        clean, noised = x0, slice(layout.first_noised_frame, None)
        v_data = v_data * layout.per_frame(tangent)  # the path moves the noised frames only
    else:
        z = add_noise(x0, noise, T)
    if cfg.target == "teacher":
        with torch.no_grad():
            v = call_model(teacher, z, T, context).float()
    else:
        v = v_data
    u_hat = fused_guidance(model, z, T_in, R_in, context, uncond, cfg.guidance, clean)
    D = total_derivative(model, z, v.to(z.dtype), T_in, R_in, context, cfg.derivative, cfg.delta, clean,
                         tangent) / cfg.guidance
    target = v - gap * D  # MeanFlow identity; = v on the diagonal
    w = weight(T)
    per_sample = w * (u_hat.float() - target)[:, :, noised].pow(2).flatten(1).mean(dim=1)
    if cfg.target == "data":
        per_sample_fm = per_sample
    else:
        per_sample_fm = w * (u_hat.detach().float() - v_data).pow(2).flatten(1).mean(dim=1)
    return {"T": T, "R": R, "v": v, "u_hat": u_hat, "target": target, "per_sample": per_sample,
            "per_sample_fm": per_sample_fm, "context": context}


def flowmap_loss(model: torch.nn.Module, x0: torch.Tensor, context: torch.Tensor, uncond: torch.Tensor,
                 global_indices: torch.Tensor, global_batch: int, seeds: list[int], weight: Beta08Weight,
                 cfg: FlowMapLossConfig = FlowMapLossConfig(), all_reduce=None,
                 teacher: torch.nn.Module | None = None, layout: ChunkLayout | None = None,
                 bidirectional: bool = False, carried: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Stage-1 loss of this rank's slice of a global batch; its mean over ranks is the global mean.

    1 forward with grad + 3 without (unconditional branch, skipped at guidance 1; two finite-difference
    points), + 1 teacher call with ``cfg.target == "teacher"``. Causal student (§6): ``layout`` makes it
    teacher-forced; ``bidirectional`` adds the auxiliary bidirectional step (1 more with grad, 1 without).
    ``carried``: the adaptive normaliser's diagonal statistics of the step's earlier micro-steps
    (``adaptive_normalise``); the micro-steps sweep the global batch in order, so every diagonal sample
    (the first half) has been seen by the time an off-diagonal one is normalised and m is the whole batch's.
    """
    terms = flowmap_terms(model, x0, context, uncond, global_indices, global_batch, seeds, weight, cfg, teacher,
                          layout)
    diagonal = terms["T"] == terms["R"]
    normalised, m = adaptive_normalise(terms["per_sample"], diagonal, cfg.norm_eps, all_reduce,
                                       reference=terms["per_sample_fm"], carried=carried)
    metrics = {"diag_loss_mean": float(m), "raw_loss": float(terms["per_sample"].detach().mean()),
               "frac_diagonal": float(diagonal.float().mean())}
    if cfg.target != "data" and bool(diagonal.any()):  # m is the data scale; the diagonal loss trained here
        trained = (terms["per_sample"].detach() * diagonal).sum() / diagonal.sum()
        metrics["diag_target_loss"] = float(trained)
    loss = normalised.mean()
    if layout is not None:
        metrics["noised_chunks"] = len(layout.sizes) - layout.context
    if bidirectional:  # the reference adds its gradient to the causal loss's (two backward passes)
        aux = bidirectional_loss(model, x0, terms["context"], uncond, seeds, cfg)
        metrics["bidirectional_loss"] = float(aux.detach())
        loss = loss + aux
    return loss, metrics


# ---------------------------------------------------------------------------------------------
# Stage 2: DMD generator loss and critic loss (docs/method.md §5)
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def x0_prediction(model: torch.nn.Module, x_sigma: torch.Tensor, T: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """x0 = x_sigma - (T/1000) v for a single-time model (teacher or critic)."""
    v = call_model(model, x_sigma, T, context).float()
    return x_sigma.float() - broadcast_time(T, v) / T_SCALE * v


def dmd_loss(x_hat: torch.Tensor, critic: torch.nn.Module, teacher: torch.nn.Module, context: torch.Tensor,
             uncond: torch.Tensor, generator: torch.Generator, shift: float = 5.0,
             guidance: float = 4.0) -> tuple[torch.Tensor, dict]:
    """Distribution matching: L = mean((x_hat - sg(x_hat - G))^2), G = (x_F - x_R) / mean|x_hat - x_R|.

    x_F is the critic's x0-prediction, x_R the teacher's with CFG ``guidance`` (x_null + w (x_c - x_null)),
    both at sigma = sigma_s(U(0,1)) on a re-noised, detached x_hat. The gradient w.r.t. x_hat is 2 G / numel:
    it moves the student's samples from where the critic's (fake) score points toward the teacher's.
    """
    batch = x_hat.shape[0]
    T = T_SCALE * shift_time(torch.rand(batch, generator=generator), shift).to(x_hat.device)
    T = T.clamp(min=1.0)  # x0-predictions need T > 0
    x_sigma = add_noise(x_hat.detach(), randn_like(x_hat, generator), T)
    x_fake = x0_prediction(critic, x_sigma, T, context)
    x_cond = x0_prediction(teacher, x_sigma, T, context)
    if guidance == 1.0:  # no CFG: the unconditional pass would cancel out
        x_real = x_cond
    else:
        x_null = x0_prediction(teacher, x_sigma, T, null_like(uncond, context))
        x_real = x_null + guidance * (x_cond - x_null)
    scale = (x_hat.detach().float() - x_real).abs().flatten(1).mean(dim=1).clamp_min(1e-6)
    grad = (x_fake - x_real) / broadcast_time(scale, x_fake)
    target = (x_hat.detach().float() - grad).detach()
    loss = (x_hat.float() - target).pow(2).mean()
    return loss, {"dmd_grad_norm": float(grad.flatten(1).norm(dim=1).mean())}


def critic_loss(critic: torch.nn.Module, x_hat: torch.Tensor, context: torch.Tensor, generator: torch.Generator,
                shift: float = 5.0, times: str = "logit_normal") -> tuple[torch.Tensor, dict]:
    """Flow matching of the critic on the student's samples: ||v_F(x_sigma, sigma, c) - (eps - x_hat)||^2, at
    sigma = sigma_shift of a logit-normal draw (the reference) or, with ``times="uniform"``, of U(0,1) as
    ``dmd_loss`` draws them (the critic is then trained where DMD reads it, the tails included)."""
    x_hat = x_hat.detach()
    u = sample_logit_normal(x_hat.shape[0], generator, shift) if times == "logit_normal" else \
        shift_time(torch.rand(x_hat.shape[0], generator=generator), shift)
    T = T_SCALE * u.to(x_hat.device)
    noise = randn_like(x_hat, generator)
    pred = call_model(critic, add_noise(x_hat, noise, T), T, context)
    loss = (pred.float() - velocity_target(x_hat, noise).float()).pow(2).mean()
    return loss, {}
