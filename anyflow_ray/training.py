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
    """Exponential moving average of a set of parameters (kept in fp32, on their device)."""

    def __init__(self, params: Iterable[torch.nn.Parameter], decay: float):
        self.decay = decay
        self.params = [p for p in params if p.requires_grad]
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        for shadow, p in zip(self.shadow, self.params):
            shadow.lerp_(p.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Write the averages into ``params`` (same order as the tracked parameters)."""
        targets = [p for p in params if p.requires_grad]
        if len(targets) != len(self.shadow):
            raise ValueError(f"EMA tracks {len(self.shadow)} tensors, got {len(targets)} targets")
        for shadow, p in zip(self.shadow, targets):
            p.copy_(shadow.to(p.dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"ema.{i}": s for i, s in enumerate(self.shadow)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if len(state) != len(self.shadow):
            raise ValueError(f"EMA state has {len(state)} tensors, expected {len(self.shadow)}")
        for i, s in enumerate(self.shadow):
            s.copy_(state[f"ema.{i}"])


class SimpleTrainer:
    """One process, one model: AdamW + warm-up + grad clipping + EMA around a loss function."""

    def __init__(self, model: torch.nn.Module, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 weight_decay: float = 0.0, warmup: int = 0, grad_clip: float = 1.0, ema_decay: float = 0.999):
        self.model = model
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_lambda(warmup))
        self.grad_clip = grad_clip
        self.ema = EMA(params, ema_decay)
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
