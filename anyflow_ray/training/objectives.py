"""Training objectives over a data set: which clips a step uses, on which rank, and with which loss.

The learner worker (DeepSpeed, under Ray) and the plain single-process loop call the same
``objective.loss(model, step, rank, world_size)``: the clips of a step are a deterministic function of
(seed, step), so a resumed run sees the same batches as an uninterrupted one, and a rank's slice of
the global batch does not depend on anything but its rank.

When every rank holds the whole data set (``data.rank_shards: false``, the tiny configs) a run's draws do
not depend on the number of ranks either. With ``data.rank_shards: true`` (real data) each rank streams
its own rows in bounded memory (``data/stream.py``: a global shuffle of row groups per epoch, dealt to
the ranks; step s is rows [s * local, (s + 1) * local) of the rank's stream): the clips drawn then
depend on the number of ranks, the noise and times drawn for each batch position still do not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from anyflow_ray.data.shards import ClipBatch
from anyflow_ray.data.stream import RowStream
from anyflow_ray.training.losses import FlowMapLossConfig, draw_layout, flowmap_loss, sample_seeds, teacher_loss
from anyflow_ray.sampling.schedule import Beta08Weight
from anyflow_ray.training.seeds import epoch_seed, step_generator


@dataclass
class TrainData:
    clips: ClipBatch | RowStream  # the whole data set in memory, or this rank's stream (data.rank_shards)
    uncond: torch.Tensor  # (1, L, D) embedding of the unconditional prompt

    @property
    def clip_shape(self) -> tuple[int, ...]:
        return tuple(self.clips.video_shape)

    @property
    def embedding_shape(self) -> tuple[int, ...]:
        clips = self.clips
        return tuple(clips.embedding_shape if isinstance(clips, RowStream) else clips.embeddings.shape[1:])

    def global_indices(self, step: int, global_batch: int, seed: int) -> torch.Tensor:
        """Clip indices of step ``step``'s global batch: epoch-wise permutations, seeded by (seed, epoch)."""
        n = len(self.clips.prompts)
        if global_batch > n:
            raise ValueError(f"global batch {global_batch} is larger than the data set ({n} clips)")
        per_epoch = n // global_batch
        epoch, slot = divmod(step, per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)))
        return order[slot * global_batch:(slot + 1) * global_batch]

    def local_batch(self, step: int, global_batch: int, seed: int, rank: int, world_size: int, device, dtype,
                    micro: int = 0, micro_steps: int = 1):
        """(x0, context, positions in the global batch) of this rank's slice of micro-step ``micro`` of
        ``micro_steps`` (gradient accumulation): micro-step a covers global positions
        [a * ranks * local, (a + 1) * ranks * local), rank r the r-th ``local`` of them, so the micro-steps
        sweep the global batch in order (the Stage-1 split is by position, ``losses.split_positions``)."""
        if global_batch % (world_size * micro_steps):
            raise ValueError(f"a global batch of {global_batch} does not split into {world_size} rank(s) x "
                             f"{micro_steps} micro-step(s)")
        local = global_batch // (world_size * micro_steps)
        start = (micro * world_size + rank) * local
        positions = torch.arange(start, start + local)
        if isinstance(self.clips, RowStream):
            if self.clips.part != (rank, world_size):
                raise ValueError(f"the data stream is part {self.clips.part} (rank, ranks) but rank {rank} of "
                                 f"{world_size} draws from it")
            videos, embeddings = self.clips.batch((step * micro_steps + micro) * local, local)
            return videos.to(device, dtype), embeddings.to(device, dtype), positions
        idx = self.global_indices(step, global_batch, seed)[positions]
        return (self.clips.videos[idx].to(device, dtype), self.clips.embeddings[idx].to(device, dtype), positions)


class TeacherObjective:
    """docs/method.md §3: flow matching of a single-time model."""

    name = "teacher"

    def __init__(self, data: TrainData, cfg: DictConfig):
        self.data, self.cfg = data, cfg
        self.global_batch = cfg.teacher.batch_size

    def loss(self, model, step: int, rank: int = 0, world_size: int = 1, all_reduce=None, micro: int = 0,
             micro_steps: int = 1):
        device, dtype = _device_dtype(model)
        x0, context, _ = self.data.local_batch(step, self.global_batch, self.cfg.run.seed, rank, world_size,
                                               device, dtype, micro, micro_steps)
        generator = step_generator(self.cfg.run.seed, step, "rank", micro * world_size + rank)
        return teacher_loss(model, x0, context, self.data.uncond.to(device, dtype), generator,
                            self.cfg.schedule.shift, self.cfg.teacher.uncond_prob)


class PretrainObjective:
    """docs/method.md §4: forward flow-map training with guidance fusion and adaptive normalisation.

    ``teacher``: the frozen single-time teacher, needed (and only used) with ``pretrain.target=teacher``.
    With ``model.causal.chunks`` the student is causal and the loss teacher-forced (§6): each step draws
    its chunk layout (``losses.draw_layout``) and, with probability ``bidirectional_aux`` (default
    ``model.causal.bidirectional_aux``; Stage 2's co-training passes 0 as the reference does), adds a
    bidirectional flow-matching step. Both draws depend on (seed, step) only, so every rank makes them alike.
    """

    name = "pretrain"

    def __init__(self, data: TrainData, cfg: DictConfig, teacher: torch.nn.Module | None = None,
                 bidirectional_aux: float | None = None):
        pc = cfg.pretrain
        self.data, self.cfg, self.teacher = data, cfg, teacher
        self.causal = cfg.model.causal
        self.bidirectional_aux = self.causal.bidirectional_aux if bidirectional_aux is None else bidirectional_aux
        self.global_batch = pc.global_batch
        self.loss_cfg = FlowMapLossConfig(shift=cfg.schedule.shift, guidance=pc.guidance, delta=pc.fd_delta,
                                          uncond_prob=pc.uncond_prob, derivative=pc.derivative, target=pc.target)
        if pc.target == "teacher" and teacher is None:
            raise ValueError("pretrain.target=teacher: the Stage-1 objective needs the teacher model")
        self.weight = Beta08Weight(cfg.schedule.shift)
        self._carried: torch.Tensor | None = None

    def loss(self, model, step: int, rank: int = 0, world_size: int = 1, all_reduce=None, micro: int = 0,
             micro_steps: int = 1):
        """This rank's loss of micro-step ``micro`` of ``micro_steps`` (1: the whole local batch at once)."""
        device, dtype = _device_dtype(model)
        x0, context, positions = self.data.local_batch(step, self.global_batch, self.cfg.run.seed, rank,
                                                       world_size, device, dtype, micro, micro_steps)
        if micro == 0:  # the adaptive normaliser's diagonal (sum, count), carried over the step's micro-steps
            self._carried = torch.zeros(2, dtype=torch.float64, device=device)
        seeds = sample_seeds(self.cfg.run.seed, step, positions)
        layout, bidirectional = None, False
        if self.causal.chunks:
            layout = draw_layout(list(self.causal.chunks), self.causal.noisy_chunks, self.causal.long_context_prob,
                                 self.cfg.run.seed, step)
            gen = step_generator(self.cfg.run.seed, step, "aux")
            bidirectional = float(torch.rand((), generator=gen, dtype=torch.float64)) < self.bidirectional_aux
        return flowmap_loss(model, x0, context, self.data.uncond.to(device, dtype), positions, self.global_batch,
                            seeds, self.weight, self.loss_cfg, all_reduce=all_reduce, teacher=self.teacher,
                            layout=layout, bidirectional=bidirectional,
                            carried=self._carried if micro_steps > 1 else None)


OBJECTIVES = {"teacher": TeacherObjective, "pretrain": PretrainObjective}


def objective_models(cfg: DictConfig, job: str, device=None, dtype: torch.dtype | None = None) -> dict:
    """Frozen models an objective needs besides the trained one, as keyword arguments of its
    constructor: the teacher (``pretrain.init``) for Stage 1 with ``pretrain.target=teacher``."""
    if job == "pretrain" and cfg.pretrain.target == "teacher":
        from anyflow_ray.models.loading import load_transformer

        teacher = load_transformer(cfg.pretrain.init, flow_map=False, dtype=dtype)
        return {"teacher": teacher.to(device).eval().requires_grad_(False)}
    return {}


def _device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype
