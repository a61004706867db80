"""LoRA through peft on the Wan transformer (the learner, the rollout actors and the dry run share it)."""

from __future__ import annotations

import torch


def lora_targets(model: torch.nn.Module, lora) -> list[str]:
    """The modules that get adapters: ``target_modules`` for every model, plus ``flow_map_targets`` (the
    time embedders E_t and E_r in the reference's Stage 1/2) when ``model`` is a two-time flow map, so the
    teacher and the critic keep the reference's self-attention + FFN targets."""
    targets = list(lora.target_modules)
    if _r_embedder(model) is not None:
        targets += [t for t in lora.get("flow_map_targets", []) if t not in targets]
    return targets


def apply_lora(model: torch.nn.Module, lora) -> None:
    """LoRA adapters on ``lora_targets`` (``lora``: rank, alpha, target_modules, flow_map_targets);
    everything else frozen. The flow map's E_r, a new module, stays fully trainable unless it has
    adapters of its own (the reference trains LoRA on E_r, not E_r itself)."""
    from peft import LoraConfig

    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=lora_targets(model, lora),
                                 init_lora_weights=True))
    r_embedder = _r_embedder(model)
    if r_embedder is not None and not any("lora_" in name for name, _ in r_embedder.named_parameters()):
        r_embedder.requires_grad_(True)


def _r_embedder(model: torch.nn.Module) -> torch.nn.Module | None:
    return getattr(getattr(model, "condition_embedder", None), "delta_embedder", None)


class AdaptersOff(torch.nn.Module):
    """``model`` with its LoRA adapters switched off for the duration of each call.

    Stage 2 with ``distill.critic=lora``: the critic F is LoRA on the frozen teacher, and this view of
    the same module is the real score R, so one copy of the base weights serves both. It holds
    ``model`` as ``module`` (so wrappers unwrap it), owns no parameters of its own, and must not be
    frozen with ``requires_grad_(False)``: that would freeze F's adapters too.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.module = model

    def forward(self, *args, **kwargs):
        self.module.disable_adapters()
        try:
            return self.module(*args, **kwargs)
        finally:
            self.module.enable_adapters()
