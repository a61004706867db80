"""Range checks OmegaConf's type checks cannot express (``load_config`` runs them on the resolved config).

Each error is a ``ConfigError`` that starts with the offending ``key=value``."""

from __future__ import annotations

import math

from typing import Any

from omegaconf import DictConfig, OmegaConf

from anyflow_ray.run.config import INHERITED, ConfigError, latent_frames


def _require(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {why}")


PHASES = ("placement", "setup", "step", "save", "collective")  # learner.timeouts.*


def validate(cfg: DictConfig, inherits: dict[str, str] | None = None) -> None:
    """Range checks; each error names its key. ``inherits``: the keys that kept their interpolated default
    (``config.INHERITED``), each with the key it follows (an error then names the key the user set)."""
    inherits = inherits or {}
    for key in ("schedule.shift", "data.fps", "run.gpu_memory_gb", "learner.cpus_per_rank",
                "pretrain.fd_delta", "distill.sync_timeout_s", *(f"learner.timeouts.{phase}" for phase in PHASES)):
        _require(OmegaConf.select(cfg, key) > 0, key, OmegaConf.select(cfg, key), "must be > 0")
    limits = cfg.learner.timeouts
    _require(limits.collective >= max(limits.step, limits.save), "learner.timeouts.collective", limits.collective,
             f"must be >= learner.timeouts.step ({limits.step:g}) and .save ({limits.save:g}): ranks wait in a "
             f"collective while another trains or saves")
    _require(cfg.run.export_dtype in ("auto", "fp32", "bf16"), "run.export_dtype", cfg.run.export_dtype,
             "must be auto, fp32 or bf16")
    _require(math.isfinite(cfg.run.lease_expiry_s) and cfg.run.lease_expiry_s >= 1, "run.lease_expiry_s",
             cfg.run.lease_expiry_s, "must be >= 1 (seconds; the heartbeat renews it every tenth of it)")
    _require(0.0 <= cfg.model.gate <= 1.0, "model.gate", cfg.model.gate, "must be in [0, 1]")
    _require(cfg.model.full_size in ("", "1.3b", "14b"), "model.full_size", cfg.model.full_size, "must be '', '1.3b' or '14b'")
    _require(cfg.run.device in ("auto", "cpu", "cuda"), "run.device", cfg.run.device, "must be auto, cpu or cuda")
    _require(cfg.run.precision in ("auto", "fp32", "bf16"), "run.precision", cfg.run.precision, "must be auto, fp32 or bf16")
    actors = cfg.rollout.num_actors
    _require(actors == "auto" or (isinstance(actors, int) and actors >= 1), "rollout.num_actors", actors,
             "must be >= 1 or auto (sized from the learner's throughput)")
    for key in ("run.threads", "run.keep_checkpoints", "learner.num_ranks", "rollout.batch_size",
                "rollout.failures_before_restart", "eval.num_prompts", "model.lora.rank", "prepare.vae_batch_size",
                "prepare.text_batch_size", "prepare.clips_per_block", "data.shard_format"):
        _require(OmegaConf.select(cfg, key) >= 1, key, OmegaConf.select(cfg, key), "must be >= 1")
    for key in ("prepare.decode_cpus", "prepare.vae_gpus", "prepare.text_gpus", "prepare.actor_cpus", "teacher.ema_warmup",
                "pretrain.ema_warmup", "distill.ema_warmup", "distill.max_policy_lag", "distill.real_weight",
                "rollout.cpus_per_actor", "rollout.restarts_on_error", "model.causal.cache_chunks", "sample.max_chunks"):
        _require(OmegaConf.select(cfg, key) >= 0, key, OmegaConf.select(cfg, key), "must be >= 0")
    for key in ("prepare.vae_concurrency", "prepare.text_concurrency"):  # auto: sized from the cluster's GPUs
        value = str(OmegaConf.select(cfg, key))
        _require(value == "auto" or value.isdigit() and int(value) >= 1, key, value, "must be auto or an int >= 1")
    _require(cfg.data.shard_format in (1, 2), "data.shard_format", cfg.data.shard_format, "must be 1 or 2")
    _require(cfg.prepare.vae_dtype in ("auto", "fp32", "bf16"), "prepare.vae_dtype", cfg.prepare.vae_dtype,
             "must be auto, fp32 or bf16")
    _require(0.0 <= cfg.prepare.heldout_fraction < 1.0, "prepare.heldout_fraction", cfg.prepare.heldout_fraction,
             "must be in [0, 1)")
    patch = list(cfg.model.tiny.patch_size)
    _require(len(patch) == 3 and all(p >= 1 for p in patch), "model.tiny.patch_size", patch, "must be 3 positive ints")
    _require(cfg.data.frames % patch[0] == 0 and cfg.data.height % patch[1] == 0 and cfg.data.width % patch[2] == 0,
             "data.frames/height/width", (cfg.data.frames, cfg.data.height, cfg.data.width),
             f"must be divisible by model.tiny.patch_size={patch}")
    for key in ("num_train", "num_heldout", "frames", "height", "width", "shard_size", "row_group_size",
                "window_row_groups"):
        _require(cfg.data[key] >= 1, f"data.{key}", cfg.data[key], "must be >= 1")
    _require(cfg.data.format in ("parquet", "mp4"), "data.format", cfg.data.format, "must be parquet or mp4")
    for key in ("steps", "batch_size", "warmup", "log_every"):
        _require(cfg.teacher[key] >= (0 if key == "warmup" else 1), f"teacher.{key}", cfg.teacher[key], "out of range")
    for stage in ("teacher", "pretrain", "distill"):  # the optimizer keys every stage has, checked alike
        section = cfg[stage]
        for key in ("lr", *(("critic_lr",) if stage == "distill" else ())):
            value = float(section[key])
            _require(math.isfinite(value) and value > 0, f"{stage}.{key}", section[key], "must be a finite number > 0")
        _require(0.0 <= section.ema < 1.0, f"{stage}.ema", section.ema, "must be in [0, 1)")
        for key in ("grad_clip", "weight_decay"):
            value = float(section[key])
            _require(math.isfinite(value) and value >= 0, f"{stage}.{key}", section[key], "must be a finite number >= 0")
        _require(len(section.betas) == 2 and all(0 <= b < 1 for b in section.betas), f"{stage}.betas",
                 list(section.betas), "must be two numbers in [0, 1)")
        if "uncond_prob" in section:
            _require(0.0 <= section.uncond_prob < 1.0, f"{stage}.uncond_prob", section.uncond_prob, "must be in [0, 1)")
        if "warmup" in section:
            _require(section.warmup >= 0, f"{stage}.warmup", section.warmup, "must be >= 0")
    for key, steps in (("sample.steps", cfg.sample.steps), ("eval.steps", cfg.eval.steps)):
        _require(len(steps) > 0 and all(int(n) >= 1 for n in steps), key, list(steps), "must be a non-empty list of ints >= 1")
    _require(cfg.eval.reference_steps >= max(cfg.eval.steps), "eval.reference_steps", cfg.eval.reference_steps,
             "must be >= the largest eval step count")
    _require(cfg.run.wandb_mode in ("offline", "online", "disabled"), "run.wandb_mode", cfg.run.wandb_mode,
             "must be offline, online or disabled")
    _validate_causal(cfg)
    _require(cfg.run.storage == "" or "://" in cfg.run.storage, "run.storage", cfg.run.storage,
             "must be empty (run.output_dir is the storage) or a URI such as s3://bucket/prefix or file:///abs/path")
    _require(cfg.learner.zero_stage in (0, 1, 2, 3), "learner.zero_stage", cfg.learner.zero_stage, "must be 0, 1, 2 or 3")
    pc = cfg.pretrain
    _require(pc.global_batch > 0 and pc.global_batch % 4 == 0, "pretrain.global_batch", pc.global_batch,
             "must be a positive multiple of 4 (the 50/25/25 diagonal / r=0 / r<t split)")
    ranks, accum = cfg.learner.num_ranks, cfg.learner.grad_accum
    _require(isinstance(accum, int) and accum >= 1, "learner.grad_accum", accum, "must be an integer >= 1")
    for key, batch in (("pretrain.global_batch", pc.global_batch), ("teacher.batch_size", cfg.teacher.batch_size)):
        _require(batch % (ranks * accum) == 0, key, batch,
                 f"must be divisible by learner.num_ranks x learner.grad_accum = {ranks} x {accum}")
    _require(pc.derivative in ("fd", "jvp"), "pretrain.derivative", pc.derivative, "must be fd or jvp")
    _require(pc.target in ("data", "teacher"), "pretrain.target", pc.target, "must be data or teacher")
    _require(pc.guidance >= 1.0, "pretrain.guidance", pc.guidance, "must be >= 1")
    for key in ("steps", "save_every", "log_every"):
        _require(pc[key] >= 1, f"pretrain.{key}", pc[key], "must be >= 1")
    dc = cfg.distill
    for key in ("steps", "save_every", "log_every", "sync_every"):
        _require(dc[key] >= 1, f"distill.{key}", dc[key], "must be >= 1")
    _require(dc.buffer_capacity >= 0, "distill.buffer_capacity", dc.buffer_capacity, "must be >= 0 (0: from the demand)")
    # the keys whose default follows another key (0 / -1 meant that before they were interpolations)
    for key, ok, why in (("distill.critic_lr", dc.critic_lr > 0, "must be > 0"),
                         ("experiments.dmd_shift", cfg.experiments.dmd_shift > 0, "must be > 0"),
                         ("distill.num_ranks", dc.num_ranks >= 1, "must be >= 1"),
                         ("distill.zero_stage", dc.zero_stage in (0, 1, 2, 3), "must be 0, 1, 2 or 3")):
        source, legacy = INHERITED[key]
        _require(ok, key, OmegaConf.select(cfg, key), f"{why}; left unset it follows {source} ({legacy} no "
                 f"longer means that)")
    for key, allowed in (("distill.grad_scope", ("last", "all")), ("distill.rollout", ("flowmap", "consistency")),
                         ("experiments.critic_times", ("logit_normal", "uniform")),
                         ("experiments.rollout_weights", ("current", "ema")), ("distill.critic", ("copy", "lora")),
                         ("distill.weight_sync", ("object_store", "torch_dist")),
                         ("distill.sync_backend", ("auto", "gloo", "nccl"))):
        value = OmegaConf.select(cfg, key)
        _require(value in allowed, key, value, f"must be {', '.join(allowed[:-1])} or {allowed[-1]}")
    ex = cfg.experiments
    _require(ex.critic_updates >= 1, "experiments.critic_updates", ex.critic_updates, "must be >= 1")
    _require(not ex.grad_jump_only or (dc.rollout == "flowmap" and not cfg.model.causal.chunks),
             "experiments.grad_jump_only", ex.grad_jump_only, "needs a bidirectional student (model.causal.chunks=[]) "
             "and distill.rollout=flowmap")
    _require(dc.rollout == "flowmap" or (dc.grad_scope == "last" and not cfg.model.causal.chunks), "distill.rollout",
             dc.rollout, "consistency takes distill.grad_scope=last and a bidirectional student (model.causal.chunks=[])")
    _require(dc.critic != "lora" or cfg.model.lora.enabled, "distill.critic", dc.critic,
             "lora needs model.lora.enabled=true (the critic is LoRA adapters on the frozen teacher)")
    _require(len(dc.budgets) > 0 and all(int(n) >= 1 for n in dc.budgets), "distill.budgets", list(dc.budgets),
             "must be a non-empty list of ints >= 1")
    zero_key = inherits.get("distill.zero_stage", "distill.zero_stage")
    _require(dc.weight_sync != "torch_dist" or dc.zero_stage < 3, "distill.weight_sync", dc.weight_sync,
             f"torch_dist broadcasts whole weights from learner rank 0 alone, which {zero_key}=3 partitions; "
             f"use distill.weight_sync=object_store or {zero_key} <= 2")
    ranks = dc.num_ranks
    _require(dc.real_batch > 0 and dc.real_batch % 4 == 0 and dc.real_batch % ranks == 0,
             "distill.real_batch", dc.real_batch, f"must be a positive multiple of 4 and of the {ranks} Stage-2 "
             f"learner rank(s)")
    for key in ("learner.gpus_per_rank", "rollout.gpus_per_actor"):
        value = OmegaConf.select(cfg, key)
        _require(value == "auto" or _is_amount(value), key, value, "must be auto or a number >= 0")
    if cfg.rollout.colocate:
        for key in ("learner.gpus_per_rank", "rollout.gpus_per_actor"):
            value = OmegaConf.select(cfg, key)
            _require(value == "auto" or float(value) < 1, key, value,
                     "must be auto or below 1 with rollout.colocate (learner and actor share one GPU)")


def _validate_causal(cfg: DictConfig) -> None:
    """The FAR student's keys (docs/method.md §6): chunks tile the latent frames, Stage-1 options in range."""
    cc, chunks, frames = cfg.model.causal, list(cfg.model.causal.chunks), latent_frames(cfg)
    p_t = 1 if cfg.model.full_size else cfg.model.tiny.patch_size[0]
    _require(all(c >= 1 and c % p_t == 0 for c in chunks) and sum(chunks) in (0, frames), "model.causal.chunks",
             chunks, f"must be empty (bidirectional) or sizes (multiples of {p_t}) summing to the {frames} latent frames")
    _require(0 <= cc.noisy_chunks <= len(chunks), "model.causal.noisy_chunks", cc.noisy_chunks, f"must be in [0, {len(chunks)}]")
    _require(0 <= cc.bidirectional_aux <= 1 and (cc.bidirectional_aux == 0 or chunks), "model.causal.bidirectional_aux",
             cc.bidirectional_aux, "must be in [0, 1]; above 0 it needs model.causal.chunks")
    _require(0 <= cc.long_context_prob <= 1 and (cc.long_context_prob == 0 or cc.noisy_chunks > 0),
             "model.causal.long_context_prob", cc.long_context_prob, "must be in [0, 1]; above 0 it needs noisy_chunks > 0")
    limit = cc.full_chunk_limit
    _require(limit == 0 or (limit >= 2 and chunks), "model.causal.full_chunk_limit", limit,
             "must be 0 (off) or >= 2 with model.causal.chunks (the chunk being made and one before it at full size)")
    _require(not limit or len(chunks) <= limit or 1 <= cc.noisy_chunks <= limit, "model.causal.noisy_chunks",
             cc.noisy_chunks, f"must be in [1, full_chunk_limit={limit}]: Stage 1 noises the last noisy_chunks "
             f"chunks, and the ones older than full_chunk_limit are compressed clean context")
    _require(not chunks or cfg.pretrain.target == "data", "pretrain.target", cfg.pretrain.target,
             "must be data for a causal student: the teacher's velocity sees noisy, not clean, earlier chunks (§6)")


def _is_amount(value: str) -> bool:
    try:
        return float(value) >= 0
    except ValueError:
        return False
