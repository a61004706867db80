"""Weight sync: the interface the Stage-2 driver calls (``WeightSync``) and the torch.distributed
transport that learner rank 0 and the rollout actors both call (``WeightGroup``, ``pack`` / ``unpack_into``).

The two implementations of the interface (object store, torch.distributed broadcast) drive Ray actors
and live beside the weight registry in actors/weights.py; the job builds one and hands it the learner
group. This module imports no Ray.

**The broadcast transport.**

The group is learner rank 0 (root, rank 0 here) plus every rollout actor (ranks 1..M). It is built
directly from a ``TCPStore`` hosted by the learner, so it never touches the learners' default
DeepSpeed group: gloo on the CPU, nccl when the learner and all actors hold their student on a GPU.
Membership is fixed per *epoch*: when a rollout actor is restarted, the driver forms a new epoch
(fresh store key prefix) with the restarted process in it and re-broadcasts the current version.

Payload: the trainable parameters packed into one flat buffer per dtype, in the order of a
``layout`` (name, shape, dtype) that the root publishes; a receiver whose own parameters do not
match the layout refuses with the first mismatching name.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from anyflow_ray.run.device import collective_backend

Layout = list[tuple[str, tuple[int, ...], str]]


class WeightSync:
    """How a new weight version reaches the rollout actors. ``start`` publishes the first version and
    returns the fleet (``make_fleet()``: before or after it, as the transport needs); ``publish`` hands
    over ``version`` (returns the driver's seconds); ``heal`` brings a restarted actor up to ``version``;
    ``finish`` waits for everything queued. ``overlaps_learner``: whether a publish may be queued behind
    a learner step instead of awaited; ``times``: seconds until each version could be loaded."""

    name: str
    overlaps_learner: bool
    times: list[float]

    def start(self, version: int, make_fleet):
        raise NotImplementedError

    def publish(self, version: int, fleet) -> float:
        raise NotImplementedError

    def heal(self, version: int, fleet) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        raise NotImplementedError


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` is nccl on a GPU, gloo on the CPU; a GPU-only backend on the CPU is refused."""
    if backend == "auto":
        return collective_backend(device)
    if backend == "nccl" and collective_backend(device) != "nccl":
        raise ValueError(f"distill.sync_backend=nccl needs the student on a GPU; it is on {device}")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"distill.sync_backend must be auto, gloo or nccl, got {backend!r}")
    return backend


def host_store(host: str, size: int, timeout_s: float) -> dist.TCPStore:
    """The group's store on rank 0, on a port the OS picks (no pick-then-bind race)."""
    return dist.TCPStore(host, 0, world_size=size, is_master=True, timeout=timedelta(seconds=timeout_s),
                         wait_for_workers=False)


class WeightGroup:
    """One member's handle on the weight-broadcast group of one epoch (rank 0 passes the store it hosts)."""

    def __init__(self, host: str, port: int, rank: int, size: int, epoch: int, backend: str, timeout_s: float,
                 store: dist.TCPStore | None = None):
        timeout = timedelta(seconds=timeout_s)
        self.store = store if store is not None else dist.TCPStore(host, port, world_size=size, is_master=False,
                                                                   timeout=timeout)
        prefixed = dist.PrefixStore(f"anyflow-weights/{epoch}", self.store)
        if backend == "nccl":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.group = dist.ProcessGroupNCCL(prefixed, rank, size, options)
        else:
            self.group = dist.ProcessGroupGloo(prefixed, rank, size, timeout)
        self.rank, self.size, self.epoch, self.backend = rank, size, epoch, backend
        if backend == "nccl":  # NCCL connects lazily: connect now, so a member that cannot join fails here
            self.broadcast([torch.zeros(1, device=torch.device("cuda", torch.cuda.current_device()))])

    def broadcast(self, buffers: list[torch.Tensor]) -> None:
        """In place: rank 0's buffers overwrite everyone else's. Returns when the data has arrived."""
        for buf in buffers:
            self.group.broadcast(buf, 0).wait()
        if self.backend == "nccl":  # wait() only orders the GPU stream; wait for the copy itself
            torch.cuda.synchronize(buffers[0].device)

    def close(self) -> None:
        """Release the communicator now rather than at garbage collection (matters for nccl)."""
        shutdown = getattr(self.group, "shutdown", None)
        if self.backend == "nccl" and shutdown is not None:
            shutdown()
        self.group = None


def layout_of(named: dict[str, torch.Tensor]) -> Layout:
    return [(name, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in sorted(named.items())]


def _buckets(layout: Layout) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    out: dict[str, list] = {}
    for name, shape, dtype in layout:
        out.setdefault(dtype, []).append((name, shape))
    return out


def pack(named: dict[str, torch.Tensor], layout: Layout, device: torch.device) -> list[torch.Tensor]:
    """One flat buffer per dtype, in layout order."""
    return [torch.cat([named[name].detach().reshape(-1) for name, _ in entries]).to(device)
            for _, entries in sorted(_buckets(layout).items())]


def empty_buffers(layout: Layout, device: torch.device) -> list[torch.Tensor]:
    return [torch.empty(sum(int(torch.Size(shape).numel()) for _, shape in entries), dtype=getattr(torch, dtype),
                        device=device)
            for dtype, entries in sorted(_buckets(layout).items())]


def check_layout(params: dict[str, torch.nn.Parameter], layout: Layout) -> None:
    """Refuse a layout this model cannot take, naming the first bad parameter. Dtypes may differ (a bf16
    learner feeding fp32 CPU actors): the receiver casts when it unpacks."""
    for name, shape, _ in layout:
        if name not in params:
            raise KeyError(f"broadcast weights name a parameter this student lacks: {name!r}")
        p = params[name]
        if tuple(p.shape) != tuple(shape):
            raise ValueError(f"broadcast parameter {name!r} has shape {list(shape)}, this student's is "
                             f"{list(p.shape)}")


@torch.no_grad()
def unpack_into(params: dict[str, torch.nn.Parameter], layout: Layout, buffers: list[torch.Tensor]) -> None:
    for buf, (_, entries) in zip(buffers, sorted(_buckets(layout).items()), strict=True):
        offset = 0
        for name, shape in entries:
            n = int(torch.Size(shape).numel())
            params[name].copy_(buf[offset:offset + n].view(shape))
            offset += n
