"""The one place that decides device, collective backend and precision (cpu/cuda, gloo/nccl, fp32/bf16)."""

from __future__ import annotations

import os

import torch


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu. Asking for cuda without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device=cuda but no CUDA device is available")
    return torch.device(name)


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bf16 on GPUs, fp32 on the CPU."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]


def collective_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def set_threads(n: int) -> None:
    """Limit intra-op threads (and OMP/MKL for child libraries) on small machines."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(n))
    torch.set_num_threads(max(1, n))
