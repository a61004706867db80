"""Whole tensors from ZeRO-3 partitions.

Under ZeRO-3 DeepSpeed keeps only a flat slice of each parameter on each rank (``p.ds_tensor``);
``p.data`` is an empty placeholder outside a forward. A whole tensor exists only inside
``deepspeed.zero.GatheredParameters``, a collective that every rank must enter with the same
parameters in the same order. At ZeRO <= 2 every rank holds every parameter whole and nothing here
communicates.
"""

from __future__ import annotations

import torch

CHUNK_BYTES = 1 << 30  # whole tensors alive at once while gathering (per rank)


def is_partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_tensor")


def local_part(p: torch.nn.Parameter) -> torch.Tensor:
    """The tensor of ``p`` this rank holds: its ZeRO-3 partition, or ``p`` itself."""
    return p.ds_tensor if is_partitioned(p) else p


def whole_size(p: torch.Tensor) -> int:
    return int(p.ds_numel) if is_partitioned(p) else p.numel()


def chunks(named: list[tuple], limit: int = CHUNK_BYTES):
    """``named`` ((name, parameter, ...) tuples) in consecutive groups of at most ``limit`` bytes whole
    (one tensor at least)."""
    group, size = [], 0
    for item in named:
        p = item[1]
        nbytes = whole_size(p) * p.element_size()
        if group and size + nbytes > limit:
            yield group
            group, size = [], 0
        group.append(item)
        size += nbytes
    if group:
        yield group


def gather_to_cpu(named: list[tuple[str, torch.nn.Parameter]], keep: bool, limit: int = CHUNK_BYTES
                  ) -> dict[str, torch.Tensor]:
    """Whole CPU copies of ``named`` (name, parameter) pairs; ``keep=False`` ranks take part in the
    gathers and return {}. A collective when any parameter is partitioned: every rank calls it with
    the same list. At most ``limit`` bytes of whole tensors are gathered at a time."""
    import deepspeed

    out: dict[str, torch.Tensor] = {}
    for group in chunks(named, limit):
        with deepspeed.zero.GatheredParameters([p for _, p in group]):  # a no-op when none is partitioned
            if keep:
                for name, p in group:
                    out[name] = p.detach().to("cpu", copy=True)
    return out


def gather_parts(named: list[tuple[str, torch.nn.Parameter]], parts: list[torch.Tensor], keep: bool,
                 limit: int = CHUNK_BYTES) -> dict[str, torch.Tensor]:
    """Whole CPU tensors from each rank's ``parts``, one per partitioned parameter and laid out as its
    ``ds_tensor`` (equal slices in rank order, the last padded): e.g. an EMA each rank keeps of its own
    partition. GatheredParameters cannot do this (it leaves parameters ZeRO keeps whole, the small
    "persistent" ones, as they are). A collective; ``keep=False`` ranks return {}."""
    import torch.distributed as dist

    world = dist.get_world_size()
    out: dict[str, torch.Tensor] = {}
    for group in chunks([(name, p, part) for (name, p), part in zip(named, parts)], limit):
        flat = torch.cat([part.detach().reshape(-1) for _, _, part in group])
        slots = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(slots, flat)
        offset = 0
        for name, p, part in group:
            n = part.numel()
            if keep:
                whole = torch.cat([slot[offset:offset + n] for slot in slots])[:p.ds_numel]
                out[name] = whole.view(p.ds_shape).to("cpu", copy=True)
            offset += n
    return out
