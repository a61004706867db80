"""The one place that decides device, collective backend and precision (cpu/cuda, gloo/nccl, fp32/bf16)."""

from __future__ import annotations

import os

import torch


def resolve_device(name: str = "auto", gpus_assigned: int | None = None) -> torch.device:
    """``auto`` -> cuda when available, else cpu. Asking for cuda without one is an error.

    ``gpus_assigned``: how many GPUs the scheduler gave this process (Ray actors pass
    ``len(ray.get_gpu_ids())``); 0 keeps ``auto`` on the CPU even on a GPU node, so a process that
    asked for no GPU never lands on ``cuda:0`` unaccounted.
    """
    if name == "auto":
        usable = torch.cuda.is_available() and gpus_assigned != 0
        return torch.device("cuda" if usable else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device=cuda but no CUDA device is available")
    if name == "cuda" and gpus_assigned == 0:
        raise RuntimeError("run.device=cuda but this process was given no GPU (learner.gpus_per_rank / "
                           "rollout.gpus_per_actor resolve to 0: the cluster reports no GPU)")
    return torch.device(name)


def cuda_index(gpu_ids: list[str], visible: str | None) -> int:
    """The CUDA device index of this process's first assigned GPU (``ray.get_gpu_ids()``: the node's GPU
    ids). With Ray's default ``CUDA_VISIBLE_DEVICES`` holds just the assigned ones (index 0); when the
    process sees its node's GPUs (``learner.see_node_gpus``, so NCCL can use P2P/NVLink between the ranks
    of a node) it is the id's place among the visible devices, or the id itself when none are listed."""
    if not gpu_ids:
        raise ValueError("no GPU was assigned to this process")
    first = str(gpu_ids[0])
    if visible is None:
        return int(first)
    listed = [v.strip() for v in visible.split(",") if v.strip()]
    if first not in listed:
        raise ValueError(f"GPU {first} was assigned to this process but CUDA_VISIBLE_DEVICES={visible!r} does not "
                         f"list it")
    return listed.index(first)


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
