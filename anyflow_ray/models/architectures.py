"""Wan2.1 transformer configurations: the full-size 1.3B / 14B ones and the tiny laptop one.

Full-size configs match the ``transformer/config.json`` of Wan2.1-T2V-{1.3B,14B}-Diffusers. They are
instantiated on the meta device (no memory, no weights) for dry runs and parameter counts.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel

from anyflow_ray.models.flowmap import WanFlowMapTransformer3DModel

_WAN_COMMON = dict(patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
                   freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                   rope_max_seq_len=1024)

WAN_CONFIGS: dict[str, dict] = {
    "1.3b": dict(_WAN_COMMON, num_attention_heads=12, ffn_dim=8960, num_layers=30),
    "14b": dict(_WAN_COMMON, num_attention_heads=40, ffn_dim=13824, num_layers=40),
}


def tiny_transformer_config(tiny, channels: int) -> dict:
    """Wan transformer kwargs for the tiny model (``tiny`` is a TinyModelConfig)."""
    return dict(patch_size=tuple(tiny.patch_size), num_attention_heads=tiny.num_attention_heads,
                attention_head_dim=tiny.attention_head_dim, in_channels=channels, out_channels=channels,
                text_dim=tiny.text_dim, freq_dim=tiny.freq_dim, ffn_dim=tiny.ffn_dim, num_layers=tiny.num_layers,
                cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)


def meta_transformer(size: str, flow_map: bool = True, gate: float = 0.25) -> torch.nn.Module:
    """A full-size Wan2.1 transformer on the meta device (shapes only)."""
    if size not in WAN_CONFIGS:
        raise ValueError(f"unknown Wan2.1 size {size!r}; expected one of {sorted(WAN_CONFIGS)}")
    with torch.device("meta"):
        if flow_map:
            return WanFlowMapTransformer3DModel(**WAN_CONFIGS[size], gate_value=gate)
        return WanTransformer3DModel(**WAN_CONFIGS[size])


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def memory_per_gpu(total: int, trainable: int, zero_stage: int, world_size: int, weight_bytes: int = 2) -> dict:
    """Model-state memory per GPU (bytes) under ZeRO: weights, gradients, optimizer, EMA.

    Mixed precision: bf16 weights and gradients, fp32 master copy + two Adam moments (12 bytes per
    trainable parameter), fp32 EMA of the trainable parameters. Stage 1 partitions the optimizer,
    stage 2 also the gradients, stage 3 also the weights. Activations are not included.
    """
    n = max(1, world_size)
    weights = weight_bytes * total / (n if zero_stage >= 3 else 1)
    grads = weight_bytes * trainable / (n if zero_stage >= 2 else 1)
    optimizer = 12 * trainable / (n if zero_stage >= 1 else 1)
    ema = 4 * trainable
    return {"weights": weights, "gradients": grads, "optimizer": optimizer, "ema": ema,
            "total": weights + grads + optimizer + ema}
