"""How the student's weights leave the distill learner: ``WeightPublisher``, a mixin of ``DistillWorker``.

The object-store transport (``publish_weights``: rank 0 ``ray.put``s, every rank gathers under ZeRO-3) and
the torch.distributed transport (rank 0 is the root of a group of its own with every rollout actor,
``anyflow_ray/run/weight_sync.py``). The worker provides ``model``, ``rank``, ``zero_stage``, ``cfg``,
``device``, ``_ema_shadows`` and ``_refuse_after_halt``.
"""

from __future__ import annotations

import time

import ray
import torch

from anyflow_ray.run.weight_sync import WeightGroup, host_store, layout_of, pack, resolve_backend
from learners.partitions import gather_parts, gather_to_cpu
from learners.ranks import every_rank, rank_zero


class WeightPublisher:
    @rank_zero
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The student's trainable parameters by name (LoRA adapters only when LoRA is on); whole at
        ZeRO <= 2 (under ZeRO-3 use ``publish_weights``, a collective)."""
        return {n: p.detach().cpu().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def _rollout_weights(self) -> dict[str, torch.Tensor]:
        """What the rollout actors sample with (ZeRO <= 2): the trainable parameters as trained, or their
        EMA in the parameters' dtype (``experiments.rollout_weights=ema``), by name."""
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if self.cfg.experiments.rollout_weights != "ema":
            return {n: p.detach() for n, p in params.items()}
        shadow_of = self._ema_shadows()
        return {n: shadow_of[id(p)].to(p.dtype) for n, p in params.items()}

    @every_rank
    def publish_weights(self, full: bool = False) -> list | None:
        """ray.put the student's trainable parameters (or their EMA: ``experiments.rollout_weights``), whole (or
        its full state dict, for comparison); rank 0 returns the wrapped ref, the other ranks None. Every
        rank is called: under ZeRO-3 the parameters (or each rank's EMA partition) are gathered, a
        collective; at ZeRO <= 2 rank 0 alone works, the others return at once."""
        self._refuse_after_halt("weight publish")
        if self.zero_stage == 3:
            named = [(n, p) for n, p in self.model.named_parameters() if full or p.requires_grad]
            if self.cfg.experiments.rollout_weights == "ema" and not full:  # each rank's EMA of its partition
                shadow_of, dtype_of = self._ema_shadows(), {n: p.dtype for n, p in named}
                state = gather_parts(named, [shadow_of[id(p)] for _, p in named], keep=self.rank == 0)
                state = {n: t.to(dtype_of[n]) for n, t in state.items()}  # the parameters' dtype, as at ZeRO <= 2
            else:
                state = gather_to_cpu(named, keep=self.rank == 0)
            if full and self.rank == 0:  # the persistent buffers, never partitioned
                state.update({n: t for n, t in self.model.state_dict().items() if n not in state})
        elif self.rank == 0:
            state = self.model.state_dict() if full else self._rollout_weights()
        if self.rank != 0:
            return None
        return [ray.put({k: v.detach().cpu() for k, v in state.items()})]

    # torch.distributed backend (anyflow_ray/run/weight_sync.py): rank 0 is the root of a group of its own
    @rank_zero
    def weight_layout(self) -> list:
        return layout_of({n: p for n, p in self.model.named_parameters() if p.requires_grad})

    @rank_zero
    def weight_group_address(self, size: int) -> tuple[str, int]:
        """Host the store of the next group (OS-chosen port, never learner.master_port); its (ip, port)."""
        self.close_weight_group()
        host = ray.util.get_node_ip_address()
        self._weight_store = host_store(host, size, float(self.cfg.distill.sync_timeout_s))
        return host, self._weight_store.port

    @rank_zero
    def open_weight_group(self, host: str, port: int, size: int, epoch: int, backend: str) -> str:
        """Join as rank 0 of the store from ``weight_group_address``; returns once every actor has joined."""
        backend = resolve_backend(backend, self.device)
        self.weight_group = WeightGroup(host, port, 0, size, epoch, backend, float(self.cfg.distill.sync_timeout_s),
                                        store=self._weight_store)
        return backend

    @rank_zero
    def close_weight_group(self) -> None:
        group = getattr(self, "weight_group", None)
        if group is not None:
            group.close()
        self.weight_group = None
        self._weight_store = None  # the store goes with its last handle

    @rank_zero
    def broadcast_weights(self) -> float:
        """Send the trainable parameters to every member; the seconds it took."""
        group = getattr(self, "weight_group", None)
        if group is None:
            raise RuntimeError("broadcast_weights before open_weight_group")
        start = time.perf_counter()
        named = self._rollout_weights()
        device = self.device if group.backend == "nccl" else torch.device("cpu")
        group.broadcast(pack(named, layout_of(named), device))
        return time.perf_counter() - start
