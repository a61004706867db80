"""Training pieces shared by every trainer: AdamW with linear warm-up, EMA, and a plain-PyTorch step.

The DeepSpeed learner worker reuses ``EMA`` and ``warmup_lambda``; the single-process loop here is
what the core jobs and the benchmark's baseline run.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch


def warmup_lambda(warmup_steps: int) -> Callable[[int], float]:
    """Linear warm-up from 1/warmup to 1 over ``warmup_steps`` optimizer steps, then constant."""
    return lambda step: min(1.0, (step + 1) / max(1, warmup_steps))


class EMA:
    """Exponential moving average of a set of parameters (kept in fp32, on their device).

    ``warmup``: for the first ``warmup`` updates the average is a plain copy of the weights (the
    reference's EMA warm-up), so an early export is the trained model, not mostly its initialisation.
    The update count is part of the state, so a resumed run continues the warm-up where it stopped.

    ``local``: the tensor of a parameter this process averages (default: the parameter itself). With
    weights partitioned over ranks (ZeRO-3) it is the rank's own partition, so each rank keeps the
    average of its part only; the caller gathers whole tensors when it needs them.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], decay: float, warmup: int = 0,
                 local: Callable[[torch.nn.Parameter], torch.Tensor] | None = None):
        self.decay, self.warmup, self.updates = decay, int(warmup), 0
        self.local = local or _whole
        self.params = [p for p in params if p.requires_grad]
        self.shadow = [self.local(p).detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        weight = 1.0 if self.updates < self.warmup else 1.0 - self.decay
        for shadow, p in zip(self.shadow, self.params):
            shadow.lerp_(self.local(p).detach().float(), weight)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Write the averages into ``params`` (same order as the tracked parameters)."""
        targets = [p for p in params if p.requires_grad]
        if len(targets) != len(self.shadow):
            raise ValueError(f"EMA tracks {len(self.shadow)} tensors, got {len(targets)} targets")
        for shadow, p in zip(self.shadow, targets):
            p.copy_(shadow.to(p.dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**{f"ema.{i}": s for i, s in enumerate(self.shadow)}, "ema.updates": torch.tensor(self.updates)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Shadows and update count; a state without ``ema.updates`` (older checkpoints) keeps the count."""
        shadows = {k: v for k, v in state.items() if k != "ema.updates"}
        if len(shadows) != len(self.shadow):
            raise ValueError(f"EMA state has {len(shadows)} tensors, expected {len(self.shadow)}")
        for i, s in enumerate(self.shadow):
            if tuple(shadows[f"ema.{i}"].shape) != tuple(s.shape):  # e.g. partitions of another world size
                raise ValueError(f"EMA tensor {i} has shape {tuple(shadows[f'ema.{i}'].shape)}, expected "
                                 f"{tuple(s.shape)}")
            s.copy_(shadows[f"ema.{i}"])
        if "ema.updates" in state:
            self.updates = int(state["ema.updates"])


def _whole(p: torch.nn.Parameter) -> torch.Tensor:
    return p


class SimpleTrainer:
    """One process, one model: AdamW + warm-up + grad clipping + EMA around a loss function."""

    def __init__(self, model: torch.nn.Module, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 weight_decay: float = 0.0, warmup: int = 0, grad_clip: float = 1.0, ema_decay: float = 0.999,
                 ema_warmup: int = 0):
        self.model = model
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_lambda(warmup))
        self.grad_clip = grad_clip
        self.ema = EMA(params, ema_decay, ema_warmup)
        self.step = 0

    def train_step(self, loss_fn: Callable[[torch.nn.Module], tuple[torch.Tensor, dict]]) -> dict[str, float]:
        """loss_fn(model) -> (loss, metrics). Returns metrics plus loss, grad_norm and lr."""
        self.model.train()
        loss, metrics = loss_fn(self.model)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {self.step}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.ema.update()
        self.step += 1
        return {**metrics, "loss": float(loss.detach()), "grad_norm": float(grad_norm),
                "lr": self.scheduler.get_last_lr()[0]}
