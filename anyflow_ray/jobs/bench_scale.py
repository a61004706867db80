"""`anyflow-ray bench-scale --config configs/wan2.1-t2v-1.3b.yaml`: the real Wan2.1 architecture on a GPU.

No weights are needed: the full-size transformer (``model.full_size``) is built with random weights on
``run.device`` in ``run.precision`` (bf16 on GPUs), wrapped as a two-time flow map, and measured on one
clip of ``data.frames`` x ``data.height`` x ``data.width`` (Wan VAE latents: 4x in time, 8x in space):

1. the flow-map wrapper at initialisation: max |u(z, t, t) - base(z, t)| (0 by construction);
2. one two-time forward;
3. backward simulation (<= 3 calls, mean over k) vs a full N-step flow-map rollout, N = ``--steps``;
4. one forward + backward with gradient checkpointing: time and peak GPU memory.

Figures, not assertions; written to ``<run.output_dir>/bench_scale.json``.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel
from omegaconf import DictConfig

from anyflow_ray.sampling.rollouts import backward_simulation
from anyflow_ray.run.config import ConfigError
from anyflow_ray.run.device import resolve_device
from anyflow_ray.jobs.common import log, prepare
from anyflow_ray.models.architectures import WAN_CONFIGS, count_parameters
from anyflow_ray.models.flowmap import WanFlowMapTransformer3DModel, call_model
from anyflow_ray.sampling.samplers import sample

WAN_VAE_TEMPORAL, WAN_VAE_SPATIAL, WAN_TEXT_TOKENS = 4, 8, 512


def latent_shape(frames: int, height: int, width: int, channels: int, patch: tuple[int, int, int]) -> tuple:
    """(1, C, F', H', W') of one clip's Wan VAE latents; refuses sizes the VAE and patching cannot take."""
    step = WAN_VAE_SPATIAL * patch[1]
    if (frames - 1) % WAN_VAE_TEMPORAL or height % step or width % step:
        raise ValueError(f"data.frames={frames} must be 4k+1 and data.height={height}, data.width={width} "
                         f"multiples of {step} for the Wan VAE and {patch[1]}x{patch[2]} patches")
    return (1, channels, (frames - 1) // WAN_VAE_TEMPORAL + 1, height // WAN_VAE_SPATIAL, width // WAN_VAE_SPATIAL)


def _cast_like_from_pretrained(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``dtype`` everywhere except the modules diffusers keeps in fp32 (as ``from_pretrained(dtype=...)``)."""
    torch.nn.Module.to(model, dtype)  # the plain cast: diffusers' ``to`` would also cast the fp32 modules
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, module in model.named_modules():
        if keep.intersection(name.split(".")):
            module.float()
    return model


def run(cfg: DictConfig, steps: tuple[int, ...] = (8, 16, 50), num_layers: int | None = None,
        allow_cpu: bool = False) -> dict:
    size = cfg.model.full_size
    if size not in WAN_CONFIGS:
        raise ConfigError(f"bench-scale needs model.full_size in {sorted(WAN_CONFIGS)}, got {size!r} "
                         f"(use configs/wan2.1-t2v-1.3b.yaml or configs/wan2.1-t2v-14b.yaml)")
    if num_layers is None and not allow_cpu and resolve_device(cfg.run.device).type == "cpu":
        raise ConfigError(f"run.device={cfg.run.device} resolves to the CPU here: the full Wan2.1-{size} "
                          f"({WAN_CONFIGS[size]['num_layers']} layers) would take hours. Run it on a GPU, pass "
                          f"--layers 1 for a quick check, or --allow-cpu to run it anyway")
    out, device, dtype = prepare(cfg, Path(cfg.run.output_dir))
    arch = dict(WAN_CONFIGS[size], **({"num_layers": num_layers} if num_layers else {}))
    shape = latent_shape(cfg.data.frames, cfg.data.height, cfg.data.width, arch["in_channels"], arch["patch_size"])
    on_gpu = device.type == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    log.info("Wan2.1-%s (%d layers, random weights) on %s in %s, latent %s", size, arch["num_layers"],
             torch.cuda.get_device_name(device) if on_gpu else "cpu", dtype, shape)

    def timed(fn, repeats: int) -> float:
        fn()
        sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    with torch.device(device):
        base = _cast_like_from_pretrained(WanTransformer3DModel(**arch), dtype)
    model = WanFlowMapTransformer3DModel.from_base(base, gate=cfg.model.gate).eval()
    generator = torch.Generator().manual_seed(cfg.run.seed)
    z = torch.randn(shape, generator=generator).to(device, dtype)
    context = torch.randn(1, WAN_TEXT_TOKENS, arch["text_dim"], generator=generator).to(device, dtype)
    T = torch.full((1,), 700.0, device=device)
    result = {"size": size, "num_layers": arch["num_layers"], "device": str(device), "dtype": str(dtype),
              "latent_shape": list(shape), "parameters": count_parameters(model)}
    with torch.no_grad():
        reference = base(z, T, context, return_dict=False)[0]
        diagonal = call_model(model, z, T, context, T)
        result["diagonal_max_abs_diff"] = float((reference.float() - diagonal.float()).abs().max())
        del base, reference, diagonal
        result["forward_ms"] = 1e3 * timed(lambda: call_model(model, z, T, context, T / 2), repeats=3)
        result["rollout_ms"] = {}
        for n in steps:
            full = timed(lambda: sample(model, z, context, n, cfg.schedule.shift), repeats=1)
            ks = list(range(0, n, max(1, n // 8)))
            backward = statistics.mean(
                timed(lambda k=k: backward_simulation(model, z, context, n, k, cfg.schedule.shift), repeats=1)
                for k in ks)
            result["rollout_ms"][n] = {"full": 1e3 * full, "backward_sim": 1e3 * backward, "ks": ks,
                                       "speedup": full / backward}
    model.train()
    model.enable_gradient_checkpointing()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)

    def train_step() -> None:
        call_model(model, z, T, context, T / 2).float().pow(2).mean().backward()
        model.zero_grad(set_to_none=True)

    result["forward_backward_ms"] = 1e3 * timed(train_step, repeats=2)
    result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if on_gpu else None

    print(f"Wan2.1-{size} flow map, {result['parameters'] / 1e9:.3f}B parameters ({arch['num_layers']} layers), "
          f"{device} {dtype}, latent {tuple(shape)}")
    print(f"  max |u(z,t,t) - base(z,t)| at initialisation: {result['diagonal_max_abs_diff']:.3g}")
    print(f"  one two-time forward: {result['forward_ms']:.1f} ms")
    for n, row in result["rollout_ms"].items():
        print(f"  N={n:<3d} full rollout {row['full']:8.0f} ms  backward sim {row['backward_sim']:6.0f} ms  "
              f"speed-up {row['speedup']:5.2f}x")
    memory = f", peak {result['peak_memory_gib']:.1f} GiB" if on_gpu else ""
    print(f"  forward + backward, gradient checkpointing: {result['forward_backward_ms']:.0f} ms{memory}")
    path = out / "bench_scale.json"
    path.write_text(json.dumps(result, indent=2))
    log.info("wrote %s", path)
    return result
