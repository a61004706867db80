"""``LearnerWorker``: one DeepSpeed rank, run as a Ray actor by ``LearnerGroup``.

It owns the model (teacher or flow-map student), a DeepSpeed engine around it (ZeRO stage from the
config; fp32 on the CPU, bf16 on GPUs; gradient clipping; AdamW with linear warm-up), an EMA of the
trainable parameters, optional LoRA (peft) and gradient checkpointing, and the training data. One
worker class serves every job; the job only picks the objective (``anyflow_ray.training.objectives``).

Checkpoints (layout in ``anyflow_ray.training.checkpoint``) go through DeepSpeed's own ``save_checkpoint`` /
``load_checkpoint`` for every engine (any ZeRO stage, fp32 or bf16), plus the EMA, the RNG state, the
weight version and the driver's state; DeepSpeed's pickles are read with ``restricted_torch_load``.
"""

from __future__ import annotations

import copy
import logging
import os
import pickle
import socket
import time
from pathlib import Path
from datetime import timedelta

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from anyflow_ray.training import checkpoint as ckpt_io
from anyflow_ray.run.config import ConfigError
from anyflow_ray.data.shards import read_shards
from anyflow_ray.data.stream import RowStream
from anyflow_ray.data.uncond import load_uncond
from anyflow_ray.run.device import collective_backend, cuda_index, resolve_device, resolve_dtype, set_threads
from anyflow_ray.training.objectives import OBJECTIVES, TrainData, objective_models
from anyflow_ray.run.storage import Storage, data_source, job_inputs
from anyflow_ray.training.export import export_dtype, export_files, final_model, job_model, write_pipeline
from anyflow_ray.training.optim import EMA, warmup_lambda
from learners.partitions import gather_parts, gather_to_cpu, local_part
from learners.ranks import every_rank, rank_zero

log = logging.getLogger("anyflow_ray")


def job_settings(cfg: DictConfig, job: str) -> DictConfig:
    """Optimizer/EMA settings of a job, read from its config section."""
    section = {"teacher": cfg.teacher, "pretrain": cfg.pretrain, "distill": cfg.distill}[job]
    betas = tuple(section.betas) if "betas" in section else (0.9, 0.999)
    return OmegaConf.create(dict(lr=section.lr, betas=list(betas), weight_decay=section.weight_decay,
                                 warmup=section.get("warmup", 0), ema=section.ema,
                                 ema_warmup=section.get("ema_warmup", 0), grad_clip=section.grad_clip))


def build_model(cfg: DictConfig, job: str, dtype: torch.dtype) -> torch.nn.Module:
    """The job's trainable model (``training.export.job_model``: what a checkpoint's model is rebuilt from),
    with gradient checkpointing when configured."""
    model = job_model(cfg, job, dtype)
    if cfg.model.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model


def grad_norm_of(params: list[torch.nn.Parameter]) -> float:
    """The 2-norm over all gradients (before clipping)."""
    grads = [p.grad for p in params if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def deepspeed_pickle_types() -> list:
    """The non-tensor types DeepSpeed's engine checkpoints hold (ZeRO 0-3, fp32 and bf16; DeepSpeed 0.19)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def restricted_torch_load(path, map_location=None):
    """DeepSpeed's checkpoint reader with the least trust it allows: torch's weights-only unpickler with
    an allow-list of DeepSpeed's own types (DeepSpeed itself calls ``torch.load(weights_only=False)``)."""
    try:
        with torch.serialization.safe_globals(deepspeed_pickle_types()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ckpt_io.CheckpointError(f"{path} holds objects outside the allow-list of DeepSpeed checkpoint "
                                      f"types; refusing to unpickle it ({str(err).splitlines()[-1]})") from err


def allreduce_bus_bandwidth(device: torch.device, world_size: int, mib: int | None = None, repeats: int = 5) -> float:
    """The group's all-reduce bus bandwidth in GB/s (nccl-tests' busbw: bytes x 2 (n - 1) / n per second),
    timed over ``repeats`` all-reduces of ``mib`` MiB (256 on GPUs, 8 on the CPU) after one warm-up."""
    mib = mib or (256 if device.type == "cuda" else 8)
    buf = torch.ones(mib * 2**20 // 4, dtype=torch.float32, device=device)
    dist.all_reduce(buf)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dist.all_reduce(buf)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / repeats
    return buf.numel() * 4 * 2 * (world_size - 1) / world_size / seconds / 1e9


def job_zero_stage(cfg: DictConfig, job: str) -> int:
    """The ZeRO stage a job's learner ranks run: Stage 2 may have its own (``distill.zero_stage``)."""
    return int(cfg.distill.zero_stage if job == "distill" else cfg.learner.zero_stage)


def accumulation_steps(cfg: DictConfig, job: str) -> int:
    """Micro-steps per optimizer step (``learner.grad_accum``; teacher and Stage 1; Stage 2 takes one)."""
    return 1 if job == "distill" else int(cfg.learner.grad_accum)


def deepspeed_config(cfg: DictConfig, job: str, micro_batch: int, dtype: torch.dtype) -> dict:
    settings = job_settings(cfg, job)
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation_steps(cfg, job),
        "gradient_clipping": settings.grad_clip,
        "zero_optimization": {"stage": job_zero_stage(cfg, job)},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "steps_per_print": 10**9,
        "zero_allow_untested_optimizer": True,
    }


class LearnerWorker:
    def __init__(self, cfg: dict, job: str, rank: int, world_size: int):
        if job not in OBJECTIVES:
            raise ValueError(f"unknown learner job {job!r}; expected one of {sorted(OBJECTIVES)}")
        self.cfg = OmegaConf.create(cfg)
        self.job, self.rank, self.world_size = job, rank, world_size
        self.zero_stage = job_zero_stage(self.cfg, job)
        threads = max(1, int(self.cfg.run.threads) // world_size)
        set_threads(threads)

    @rank_zero
    def rendezvous_address(self) -> tuple[str, int]:
        """(ip, free port) of this actor's node, for rank 0 to host the process group."""
        with socket.socket() as s:
            s.bind(("", self.cfg.learner.master_port))
            port = s.getsockname()[1]
        import ray

        return ray.util.get_node_ip_address(), port

    @every_rank
    def setup(self, master_addr: str, master_port: int, board=None) -> dict:
        """Join the process group, fetch what this node lacks, build the model, data and engines; each
        phase posted to ``board`` (the group's SetupBoard) as it starts."""
        import deepspeed

        self._board = board
        self._progress("joining the process group")
        import ray

        gpu_ids = [str(i) for i in ray.get_gpu_ids()]
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        self.device = resolve_device(self.cfg.run.device, len(gpu_ids))  # this process's GPUs, not the driver's
        index = 0  # the GPU this rank drives, among those it sees (reported on fake GPUs too)
        if gpu_ids and (self.device.type == "cuda" or visible is None or str(gpu_ids[0]) in visible.split(",")):
            index = cuda_index(gpu_ids, visible)
        if self.device.type == "cuda":
            torch.cuda.set_device(index)
            self.device = torch.device("cuda", index)
        local = index if self.device.type == "cuda" else 0  # DeepSpeed takes its device from LOCAL_RANK
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK=str(local),
                          MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        self.dtype = resolve_dtype(self.cfg.run.precision, self.device)
        timeout = timedelta(seconds=float(self.cfg.learner.timeouts.collective))
        backend = collective_backend(self.device)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   timeout=timeout, rank=self.rank, world_size=self.world_size)
        busbw = allreduce_bus_bandwidth(self.device, self.world_size) if self.world_size > 1 else None
        torch.manual_seed(self.cfg.run.seed)
        self._progress("fetching the job's inputs this node lacks (run.storage)")
        Storage.of(self.cfg).fetch_all(job_inputs(self.cfg, self.job))
        self._build()
        self._progress("ready")
        # ZeRO-3: each rank averages its own partition of the trainable parameters (``local_part``)
        self.ema = EMA(self.trainable, self._ema_decay(), job_settings(self.cfg, self.job).ema_warmup, local=local_part)
        model = self.model
        return {"rank": self.rank, "device": str(self.device), "dtype": str(self.dtype), "gpu_ids": gpu_ids,
                "visible_devices": visible, "cuda_index": index, "backend": backend, "allreduce_busbw_gbs": busbw,
                "node_id": ray.get_runtime_context().get_node_id(),
                "trainable": sum(p.numel() for p in self.trainable),
                "total": sum(p.numel() for p in model.parameters())}

    def _progress(self, text: str) -> None:
        """Post what this rank is doing now to the group's set-up board (no wait: the board only reads)."""
        board = getattr(self, "_board", None)
        if board is not None:
            board.post.remote(self.rank, text, time.time())

    def _build(self) -> None:
        """Model, optimizer, warm-up schedule, objective and DeepSpeed engine of this job."""
        import deepspeed

        self._progress(f"loading the {self.job} model")
        model = build_model(self.cfg, self.job, self.dtype).to(self.device)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        settings = job_settings(self.cfg, self.job)
        optimizer = torch.optim.AdamW(self.trainable, lr=settings.lr, betas=tuple(settings.betas),
                                      weight_decay=settings.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_lambda(settings.warmup))
        self.objective = OBJECTIVES[self.job](self._load_data(), self.cfg,
                                              **objective_models(self.cfg, self.job, self.device, self.dtype))
        self.micro_steps = accumulation_steps(self.cfg, self.job)
        micro = self.objective.global_batch // (self.world_size * self.micro_steps)
        self._progress("initialising the DeepSpeed engine")
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(self.cfg, self.job, micro, self.dtype), dist_init_required=False)
        self.model = model

    def _ema_decay(self) -> float:
        return job_settings(self.cfg, self.job).ema

    def checkpoint_engines(self) -> dict:
        """The DeepSpeed engines a checkpoint holds, by folder name under ``training_state/``."""
        return {"model": self.engine}

    def _load_data(self) -> TrainData:
        from pathlib import Path

        if self.cfg.data.rank_shards:  # its own rows, streamed in bounded memory (data/stream.py)
            self._progress("indexing the data's row groups")
            source, filesystem = data_source(self.cfg)
            clips = RowStream(source, self.rank, self.world_size, seed=int(self.cfg.run.seed),
                              window=int(self.cfg.data.window_row_groups), filesystem=filesystem)
            self._progress(f"data indexed: {len(clips)} rows")
        else:  # the whole data set, in memory
            self._progress("reading the whole data set into memory")
            clips = read_shards(Path(self.cfg.data.root) / "train")
            self._progress(f"data read: {len(clips)} clips")
        self._progress("c_null: the stored one, or the text encoder")
        uncond = load_uncond(self.cfg)  # written by prepare / data beside the shards: no text encoder here
        return TrainData(clips=clips, uncond=uncond)

    # -- training ---------------------------------------------------------------------------
    @every_rank
    def train_step(self, step: int) -> dict:
        """One optimizer step: ``learner.grad_accum`` micro-steps (DeepSpeed scales each backward by
        1 / micro-steps and steps the optimizer at the last), then the EMA."""
        self.engine.train()
        all_reduce = dist.all_reduce if self.world_size > 1 else None
        total, per_micro = 0.0, []
        for micro in range(self.micro_steps):
            loss, metrics = self.objective.loss(self.engine.module, step, self.rank, self.world_size, all_reduce,
                                                micro, self.micro_steps)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"rank {self.rank}: non-finite loss {loss.item()} at step {step}")
            self.engine.backward(loss)
            # ZeRO-0 with a torch optimizer: DeepSpeed clips but does not keep the norm, so take it here
            # (gradients are whole and already averaged over ranks after backward); ZeRO >= 1 reports its own.
            last = micro == self.micro_steps - 1
            local_norm = grad_norm_of(self.trainable) if self.zero_stage == 0 and last else None
            self.engine.step()
            total += float(loss.detach()) / self.micro_steps
            per_micro.append(metrics)
        self.ema.update()
        keys = dict.fromkeys(k for m in per_micro for k in m)  # each over the micro-steps that report it
        metrics = {k: sum(m[k] for m in per_micro if k in m) / sum(k in m for m in per_micro) for k in keys}
        metrics.update({k: per_micro[-1][k] for k in ("diag_loss_mean",) if k in metrics})  # the whole batch's m
        mean_loss = torch.tensor(total, dtype=torch.float32, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(mean_loss)
            mean_loss /= self.world_size
        grad_norm = local_norm if local_norm is not None else self.engine.get_global_grad_norm()
        return {**metrics, "loss": float(mean_loss), "lr": self.scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan")}

    # -- checkpoints --------------------------------------------------------------------------
    @every_rank
    def save(self, root: str, step: int, weight_version: int = 0, driver_state: dict | None = None) -> str:
        """Every rank saves its engines' trainable DeepSpeed state and its RNG (rank 0 also the EMA, every
        rank its part of it under ZeRO-3); once all have, rank 0 writes meta.json (with the resolved config,
        so the checkpoint rebuilds its model alone), moves ``latest`` and drops old checkpoints.
        ``driver_state``: JSON-able state of the driver (e.g. buffer statistics), returned on resume."""
        ckpt = ckpt_io.step_dir(root, step)
        if self.rank == 0:
            ckpt_io.clear_unfinished(root, ckpt)
        self._barrier()
        for name, engine in self.checkpoint_engines().items():  # frozen weights are re-read from their folders
            engine.save_checkpoint(str(ckpt_io.state_dir(ckpt)), tag=name, client_state={"step": step},
                                   save_latest=False, exclude_frozen_parameters=True)
        tensors = {"rng.torch": torch.get_rng_state()}
        if self.device.type != "cpu":
            tensors["rng.device"] = torch.get_device_module(self.device).get_rng_state(self.device)
        if self.rank == 0 or self.zero_stage == 3:  # ZeRO <= 2: the same EMA on every rank
            tensors.update(self.ema.state_dict())
        ckpt_io.save_rank_state(ckpt, self.rank, tensors)
        self._barrier()
        files = ckpt_io.manifest(ckpt, self.rank)  # the files this rank wrote: fsynced, sized and hashed
        if self.world_size > 1:
            files = {name: record for part in self._all_gather(files) for name, record in part.items()}
        if self.rank == 0:
            ckpt_io.save_meta(ckpt, {"format": ckpt_io.FORMAT, "step": step, "job": self.job,
                                     "world_size": self.world_size, "zero_stage": self.zero_stage,
                                     "dtype": str(self.dtype), "engines": sorted(self.checkpoint_engines()),
                                     "weight_version": weight_version, "driver_state": driver_state or {},
                                     "config": OmegaConf.to_container(self.cfg, resolve=True), "files": files})
            ckpt_io.write_latest(root, ckpt)
            doomed = ckpt_io.rotate(root, int(self.cfg.run.keep_checkpoints))
        self._upload_checkpoint(root, ckpt, doomed if self.rank == 0 else [])
        return str(ckpt)

    def _upload_checkpoint(self, root: str, ckpt, doomed: list) -> None:
        """With ``run.storage``: each rank uploads the files it wrote (its ZeRO partition and rank file),
        rank 0 the rest, then, once every rank is done, meta.json and the ``latest`` marker, and it drops
        the rotated-out checkpoints from storage too."""
        storage = Storage.of(self.cfg)
        if not storage.enabled:
            return
        meta = ckpt_io.state_dir(ckpt) / "meta.json"
        for path in sorted(p for p in ckpt.rglob("*") if p.is_file() and p != meta):
            if ckpt_io.writer_rank(path.name) == self.rank:
                storage.upload(path)
        self._barrier()
        if self.rank == 0:
            storage.upload(meta)
            storage.upload(Path(root) / "checkpoints" / ckpt_io.LATEST)
            for path in doomed:
                storage.delete(path)

    @every_rank
    def load_latest(self, root: str) -> int:
        """Resume from ``root``'s newest intact checkpoint; returns the next step (0 when there is none).
        Each rank verifies the files it wrote (sizes, SHA-256) and the ranks agree on the checkpoint: the one
        ``latest`` names, or, when it is damaged or ``latest`` is gone, the newest intact one (rank 0 then sets
        the damaged folders aside, points ``latest`` at it and keeps the warning for ``resume_warning``)."""
        storage = Storage.of(self.cfg)  # with run.storage: the marker from storage, then each candidate tried
        checkpoints = Path(root) / "checkpoints"
        listed = None
        if storage.enabled:
            storage.fetch(checkpoints / ckpt_io.LATEST, refresh=True)
            listed = storage.list_names(checkpoints)
        agree = self._all_gather if self.world_size > 1 else None
        ckpt, meta, damaged, warning = ckpt_io.choose_resume(root, self.world_size, self.rank, agree,
                                                             fetch=storage.fetch if storage.enabled else None,
                                                             listed=listed)
        self.resume_warning = warning
        if ckpt is None:
            return 0
        if warning and self.rank == 0:
            log.warning("%s: %s", self.job, warning)
            ckpt_io.settle_resume(root, ckpt, damaged)
            if storage.enabled:
                storage.upload(checkpoints / ckpt_io.LATEST)
        engines = self.checkpoint_engines()
        if sorted(engines) != meta.get("engines"):
            raise ckpt_io.CheckpointError(f"checkpoint {ckpt} holds engines {meta.get('engines')}, this "
                                          f"{self.job} learner has {sorted(engines)}")
        for name, engine in engines.items():
            engine.checkpoint_engine.load = restricted_torch_load
            frozen = any(not p.requires_grad for p in engine.module.parameters())  # not in the checkpoint
            path, _ = engine.load_checkpoint(str(ckpt_io.state_dir(ckpt)), tag=name, load_module_strict=not frozen)
            if path is None:
                raise ckpt_io.CheckpointError(f"DeepSpeed found no {name} checkpoint in {ckpt_io.state_dir(ckpt)}")
        tensors = ckpt_io.load_rank_state(ckpt, self.rank)
        if not any(k.startswith("ema.") for k in tensors):
            tensors.update(ckpt_io.load_rank_state(ckpt, 0))  # ZeRO <= 2: rank 0 holds the EMA
        self.ema.load_state_dict({k: v for k, v in tensors.items() if k.startswith("ema.")})
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.device" in tensors and self.device.type != "cpu":
            torch.get_device_module(self.device).set_rng_state(tensors["rng.device"], self.device)
        self._barrier()
        return int(meta["step"])

    @rank_zero
    def resume_report(self) -> str | None:
        """The warning of the last ``load_latest`` that did not resume the checkpoint ``latest`` named."""
        return getattr(self, "resume_warning", None)

    def _all_gather(self, value) -> list:
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    @rank_zero
    def checkpoint_meta(self, root: str) -> dict | None:
        """``weight_version``, ``driver_state`` and ``step`` of ``root``'s latest checkpoint (None: none)."""
        ckpt = ckpt_io.find_latest(root)
        if ckpt is None:
            return None
        meta = ckpt_io.read_meta(ckpt)
        return {"step": int(meta["step"]), "weight_version": int(meta.get("weight_version", 0)),
                "driver_state": meta.get("driver_state") or {}}

    @every_rank
    def export_pipeline(self, out: str, step: int | None = None) -> str:
        """The EMA weights as an AnyFlowPipeline folder in ``run.export_dtype`` (LoRA fused; written as
        ``training.export.write_pipeline`` writes, its marker last; uploaded with ``run.storage``). Rank 0
        writes; under ZeRO-3 every rank gathers with it first, otherwise the others return at once."""
        if self.zero_stage < 3 and self.rank != 0:
            return out
        if self.zero_stage == 3:
            model = self._whole_ema_model()
            if model is None:
                return out
        else:
            model = copy.deepcopy(self.model).cpu()
            self.ema.copy_to(model.parameters())
        write_pipeline(final_model(model, self.cfg).float(), self.cfg, out, export_dtype(self.cfg, self.dtype), step=step)
        storage = Storage.of(self.cfg)
        for name in export_files(out) if storage.enabled else []:  # the marker last
            storage.upload(Path(out) / name)
        return out

    def _ema_shadows(self) -> dict[int, torch.Tensor]:
        """Each trainable parameter's EMA (this rank's partition of it under ZeRO-3), by ``id`` of the parameter."""
        return {id(p): shadow for p, shadow in zip(self.ema.params, self.ema.shadow)}

    def _whole_ema_model(self) -> torch.nn.Module | None:
        """ZeRO-3: a CPU copy of the model holding the whole EMA weights, on rank 0 (None elsewhere):
        the EMA partitions of every rank put together, the frozen parameters gathered as they are."""
        shadow_of = self._ema_shadows()
        named = list(self.model.named_parameters())
        averaged = [(n, p) for n, p in named if id(p) in shadow_of]
        keep = self.rank == 0
        whole = gather_parts(averaged, [shadow_of[id(p)] for _, p in averaged], keep)
        whole.update(gather_to_cpu([(n, p) for n, p in named if id(p) not in shadow_of], keep))
        if self.rank != 0:
            return None
        model = copy.deepcopy(self.model).cpu()  # its parameters: ZeRO-3's empty placeholders
        for name, p in model.named_parameters():
            p.data = whole.pop(name)
        return model

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    @every_rank
    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
