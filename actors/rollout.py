"""``RolloutActor``: holds a copy of the student and makes on-policy trajectories by flow-map backward
simulation (no gradient), stamped with the weight version it used.

Generator trajectories carry z_k (the prefix jump) for the learner to finish with gradient; critic
trajectories carry the complete x_hat. A causal student (``model.causal.chunks``) is rolled out chunk by
chunk on the KV cache of its own outputs, and its generator trajectories also carry ``context_chunks``
(its x_hat of every chunk: what the learner's teacher-forced re-run attends to, docs/method.md §6).
How they are made is the run's rollout strategy (anyflow_ray/training/distill.py), the one the learners
re-run. Trajectories go to the object store (owned by this actor); only their refs go to the ``TrajectoryBuffer``.
Newer weights are loaded between rollouts.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import ray
import torch
from omegaconf import OmegaConf

from anyflow_ray.run.weight_sync import WeightGroup, check_layout, empty_buffers, resolve_backend, unpack_into
from anyflow_ray.data.shards import read_shards
from anyflow_ray.data.stream import RowStream
from anyflow_ray.models.causal import is_causal
from anyflow_ray.models.loading import load_transformer
from anyflow_ray.models.lora import apply_lora
from anyflow_ray.run.device import resolve_device, resolve_dtype, set_threads
from anyflow_ray.run.storage import Storage, data_source, job_inputs
from anyflow_ray.training.distill import Trajectory, rollout_strategy


class RolloutActor:
    def __init__(self, cfg: dict, actor_id: str, buffer: str, registry: str):
        """``buffer`` / ``registry``: names of the job's named actors (looked up again after a restart)."""
        self.cfg = OmegaConf.create(cfg)
        set_threads(self.cfg.rollout.threads)
        self.actor_id, self.buffer, self.registry = actor_id, ray.get_actor(buffer), ray.get_actor(registry)
        self.gpu_ids = [str(i) for i in ray.get_gpu_ids()]
        self.device = resolve_device(self.cfg.run.device, len(self.gpu_ids))  # resolved in this process
        self.dtype = resolve_dtype(self.cfg.run.precision, self.device)
        Storage.of(self.cfg).fetch_all(job_inputs(self.cfg, "distill"))  # what this node lacks (run.storage)
        student = load_transformer(self.cfg.distill.init, flow_map=True, gate=self.cfg.model.gate, dtype=self.dtype,
                                   causal_chunks=list(self.cfg.model.causal.chunks))
        self.strategy = rollout_strategy(self.cfg, is_causal(student))  # the learner's too (learners/distill.py)
        if self.cfg.model.lora.enabled:  # the same adapters as the learner, so published names match
            apply_lora(student, self.cfg.model.lora)
        self.student = student.to(self.device).eval().requires_grad_(False)
        # prompt embeddings only, no videos. With data.rank_shards this actor streams its share of the rows
        # (a bounded window; data/stream.py) and each trajectory carries its embeddings (the learners hold
        # other rows); otherwise it holds every embedding and draws from them
        self.stream, self.cursor = None, None
        if self.cfg.data.rank_shards:
            source, filesystem = data_source(self.cfg)
            self.stream = RowStream(source, int(actor_id.rsplit("-", 1)[1]), int(self.cfg.rollout.num_actors),
                                    seed=int(self.cfg.run.seed), window=int(self.cfg.data.window_row_groups),
                                    columns=["prompt_embedding"], filesystem=filesystem)
            self.embeddings, self.clip_shape = None, self.stream.video_shape
        else:
            clips = read_shards(Path(self.cfg.data.root) / "train", columns=["prompt_embedding"])
            self.embeddings, self.clip_shape = clips.embeddings, clips.video_shape
        self.version = -1
        self.lock = threading.Lock()  # weights change only between trajectories
        self.load_latest_weights()
        ray.get(self.registry.report_started.remote(actor_id, self.version))

    @ray.method(concurrency_group="weights")
    def current_version(self) -> int:
        """The weight version held now (answered even while a rollout waits for buffer space)."""
        return self.version

    @ray.method(concurrency_group="weights")
    def whereabouts(self) -> dict:
        """Where this process runs and what it resolved for itself: node, GPUs given by Ray, device."""
        return {"actor": self.actor_id, "node_id": ray.get_runtime_context().get_node_id(),
                "gpu_ids": self.gpu_ids, "device": str(self.device)}

    def state_of(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named student parameters as this actor holds them (for checks and debugging)."""
        params = dict(self.student.named_parameters())
        return {name: params[name].detach().cpu().clone() for name in names}

    def load_latest_weights(self) -> int:
        version, wrapped = ray.get(self.registry.latest.remote())
        if wrapped is not None and version > self.version:
            state = ray.get(wrapped[0])
            missing = set(state) - set(dict(self.student.named_parameters()))
            if missing:
                raise KeyError(f"published weights name unknown parameters: {sorted(missing)[:3]}")
            with self.lock:
                self.student.load_state_dict(state, strict=False)
                self.version = version
            ray.get(self.registry.report_loaded.remote(self.actor_id, version))
        return self.version

    # torch.distributed backend (anyflow_ray/run/weight_sync.py). These methods run in their own concurrency
    # group ("weights"), so a broadcast is taken even while a rollout waits for buffer space; the lock
    # keeps a rollout from ever seeing half-loaded weights.
    @ray.method(concurrency_group="weights")
    def accept_weight_layout(self, layout: list) -> None:
        """Checked before the group forms, so a mismatch fails fast instead of stalling the root."""
        check_layout(dict(self.student.named_parameters()), layout)
        self.weight_layout = layout

    @ray.method(concurrency_group="weights")
    def weight_group_epoch(self) -> int:
        """The epoch this process joined (-1: none, e.g. after a restart)."""
        group = getattr(self, "weight_group", None)
        return -1 if group is None else group.epoch

    @ray.method(concurrency_group="weights")
    def join_weight_group(self, host: str, port: int, rank: int, size: int, epoch: int, backend: str) -> int:
        if getattr(self, "weight_group", None) is not None:
            self.weight_group.close()
        self.weight_group = None
        backend = resolve_backend(backend, self.device)
        self.weight_group = WeightGroup(host, port, rank, size, epoch, backend, float(self.cfg.distill.sync_timeout_s))
        return epoch

    @ray.method(concurrency_group="weights")
    def receive_weights(self, version: int) -> int:
        """Take part in rank 0's broadcast of ``version``; load it and report what was loaded."""
        if getattr(self, "weight_group", None) is None:
            raise RuntimeError(f"{self.actor_id}: receive_weights before join_weight_group")
        layout = self.weight_layout
        params = dict(self.student.named_parameters())
        buffers = empty_buffers(layout, self.device if self.weight_group.backend == "nccl" else torch.device("cpu"))
        self.weight_group.broadcast(buffers)
        with self.lock:
            unpack_into(params, layout, [b.to(self.device) for b in buffers])
            self.version = version
        ray.get(self.registry.report_loaded.remote(self.actor_id, version))
        return version

    def make_trajectory(self, kind: str, seed: int) -> Trajectory:
        """One trajectory of ``rollout.batch_size`` clips: prompts, noise, (N, k) drawn from ``seed``."""
        batch = int(self.cfg.rollout.batch_size)
        embeddings, in_order = self.embeddings, False
        if self.stream is not None:  # the next rows of this actor's stream (a fresh place after a restart)
            if self.cursor is None:
                self.cursor = seed * batch % len(self.stream)
            embeddings, in_order = self.stream.batch(self.cursor, batch)[1], True
            self.cursor += batch
        with self.lock:
            return self.strategy.make(self.student, kind, seed, embeddings, self.clip_shape, batch, self.version,
                                      self.device, self.dtype, in_order=in_order)

    def rollout(self, kind: str, seed: int) -> dict:
        """Make one trajectory and push its ref into the buffer, awaiting space while it is full.

        There is no time-out on that wait: the buffer answers when the learner takes a batch, or with
        False when the run ends (the trajectory is then discarded, never counted as accepted). With
        ``weight_sync=torch_dist`` a process that has not yet received weights (fresh after a restart,
        before the driver re-forms the group) makes nothing: it returns ``skipped``.
        """
        self.load_latest_weights()
        if self.version < 0:
            time.sleep(0.05)
            return {"actor": self.actor_id, "kind": kind, "version": self.version, "skipped": True}
        start = time.perf_counter()
        payload = self.make_trajectory(kind, seed)
        version = payload.version  # the weights it was made with (a broadcast may land meanwhile)
        accepted = ray.get(self.buffer.put.remote([ray.put(payload)], version, kind, self.actor_id))
        return {"actor": self.actor_id, "kind": kind, "version": version, "num_steps": payload.num_steps,
                "k": payload.k, "seconds": time.perf_counter() - start, "closed": not accepted}
