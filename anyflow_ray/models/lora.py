"""LoRA through peft on the Wan transformer (the learner, the rollout actors and the dry run share it)."""

from __future__ import annotations

import torch


def apply_lora(model: torch.nn.Module, lora) -> None:
    """LoRA adapters on the attention and FFN projections (``lora``: rank, alpha, target_modules);
    everything else frozen, except the flow map's E_r, which stays fully trainable."""
    from peft import LoraConfig

    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=list(lora.target_modules),
                                 init_lora_weights=True))
    r_embedder = getattr(model.condition_embedder, "time_embedder_r", None)
    if r_embedder is not None:
        r_embedder.requires_grad_(True)
