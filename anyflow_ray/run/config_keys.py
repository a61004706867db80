"""One line per config key: what it means. ``anyflow-ray config --config C [key=value ...]`` prints every
resolved key with its value, its schema default and this meaning (``describe``).

``KEYS`` covers exactly the schema's leaf keys (``anyflow_ray/run/config.py``; tests/run/test_config.py
checks it): a key added to the schema gets its line here, a key deleted there loses it. Later issues
extend this table (value ranges, for instance) rather than start another."""

from __future__ import annotations

import dataclasses

from omegaconf import DictConfig, OmegaConf

KEYS: dict[str, str] = {
    # run: the run's folders, seed, device and bookkeeping
    "run.output_dir": "the run's folder: every default output path (teacher/, stage1/, stage2/, ...) is under it",
    "run.storage": "durable storage root (s3://, gs://, file:///abs) for nodes that share no disk; \"\": run.output_dir is the storage",
    "run.seed": "base seed of the training jobs' random streams",
    "run.device": "auto | cpu | cuda (auto: resolved inside each actor's own process)",
    "run.precision": "auto (fp32 on CPU, bf16 on GPU) | fp32 | bf16",
    "run.wandb_mode": "offline | online | disabled (overridden by WANDB_MODE when set)",
    "run.wandb_project": "wandb project name",
    "run.threads": "torch / OMP threads of the driver process (split over the learner ranks)",
    "run.keep_checkpoints": "newest <output>/checkpoints/step-* folders kept after `latest` moves",
    "run.autoscaling": "the cluster grows on demand: wait for nodes instead of refusing a placement the nodes present cannot hold",
    "run.gpu_memory_gb": "per-GPU memory the --dry-run memory plan must fit in",
    "run.new_run": "a training job whose output folder holds an earlier run starts a fresh <output>-2 (-3, ...) instead of resuming",
    "run.export_dtype": "dtype of exported pipelines: auto (the training precision: bf16 on GPUs), fp32 or bf16",
    "run.lease_expiry_s": "one writer per run folder: a crashed driver's lease (<output>/.lease.json) lets go this long after its last heartbeat (at once for a dead process of the same host)",
    # model: the base model and how the flow map wraps it
    "model.base": "the base model: a diffusers folder (make-tiny writes one; or Wan2.1-*-Diffusers)",
    "model.tiny.num_layers": "tiny model: transformer blocks",
    "model.tiny.num_attention_heads": "tiny model: attention heads per block",
    "model.tiny.attention_head_dim": "tiny model: channels per attention head (width = heads x this)",
    "model.tiny.ffn_dim": "tiny model: hidden width of each block's feed-forward network",
    "model.tiny.freq_dim": "tiny model: width of the sinusoidal time embedding",
    "model.tiny.patch_size": "tiny model: (frames, height, width) of a patch, one token each",
    "model.tiny.text_dim": "tiny model: width of the tiny text encoder's embeddings",
    "model.tiny.text_layers": "tiny model: layers of the tiny text encoder",
    "model.tiny.text_heads": "tiny model: attention heads of the tiny text encoder",
    "model.tiny.text_max_length": "tiny model: prompt tokens the tiny text encoder reads",
    "model.gate": "fixed weight of the r-time MLP in e = (1-gate) E_t(T) + gate E_r(R)",
    "model.pixel_space": "true: identity autoencoder (tiny); false: the Wan VAE (latents)",
    "model.lora.enabled": "train LoRA adapters instead of the full weights",
    "model.lora.rank": "LoRA rank",
    "model.lora.alpha": "LoRA alpha (scale alpha / rank)",
    "model.lora.target_modules": "modules that get LoRA adapters",
    "model.lora.flow_map_targets": "extra LoRA targets of the two-time student only (e.g. time_embedder.linear_1); empty: E_r is trained in full",
    "model.causal.chunks": "FAR student: latent frames per chunk, e.g. [1,3,3,3,3,3,3,2] of 21; empty: bidirectional",
    "model.causal.cache_chunks": "chunks kept in the rolling KV cache when streaming past the training length (0: all)",
    "model.causal.bidirectional_aux": "Stage 1: probability of a bidirectional flow-matching step (reference 0.1)",
    "model.causal.noisy_chunks": "Stage 1: the last chunks noised, earlier ones clean context only (reference 3; 0: all)",
    "model.causal.long_context_prob": "Stage 1: probability of a longer prefix than noisy_chunks chunks (reference 0.5)",
    "model.causal.full_chunk_limit": "FAR's compressed context: chunks older than this many enter at a quarter of the "
                                     "tokens (reference and NVIDIA's FAR students 3; 0: off; Stage 1 and sampling)",
    "model.gradient_checkpointing": "recompute each block's activations in the backward pass (memory for time)",
    "model.full_size": "\"\", 1.3b or 14b: the Wan2.1 architecture (--dry-run plans, meta-device counts)",
    "model.negative_prompt": "c_null: replaces dropped prompts; the unconditional branch of CFG fusion, DMD and sampling",
    # schedule
    "schedule.shift": "time shift of the noise schedule, sigma = shift t / (1 + (shift - 1) t)",
    # data: synthetic clips and the Parquet shards
    "data.root": "dataset folder (train/ and heldout/ Parquet shards)",
    "data.num_train": "synthetic training clips `anyflow-ray data` writes",
    "data.num_heldout": "synthetic held-out clips (evaluation prompts and real data)",
    "data.frames": "frames per clip (pixel space; 1 + 4k through the Wan VAE)",
    "data.height": "clip height in pixels",
    "data.width": "clip width in pixels",
    "data.shard_size": "clips per Parquet shard",
    "data.seed": "seed of the synthetic clips (the held-out split uses its own offset)",
    "data.fps": "frame rate clips are sampled at (`prepare`; the mp4 files `data` writes with format=mp4)",
    "data.format": "what `anyflow-ray data` writes: parquet (shards) or mp4 (mp4 + json clips)",
    "data.rank_shards": "true: each learner rank and rollout actor streams only its own rows, a few row groups at a time (a global shuffle of row groups per epoch; draws depend on the rank count); false: every process holds the whole data set in memory",
    "data.row_group_size": "rows per Parquet row group the data and prepare commands write: the unit a stream reads",
    "data.window_row_groups": "row groups a stream (data.rank_shards) holds at once: its memory bound and the reach of its shuffle",
    "data.shard_format": "shard format written: 2 (bf16 arrays, prompt embeddings trimmed to their tokens) or 1 (fp32, padded); both read",
    # prepare: captioned videos -> Wan latents + UMT5 embeddings (Ray Data)
    "prepare.input": "folders, .mp4 files, .tar shards, .csv/.jsonl manifests to encode",
    "prepare.output": "folder of the Parquet shards `prepare` writes",
    "prepare.decode_cpus": "CPUs per decode task",
    "prepare.vae_batch_size": "clips per VAE call",
    "prepare.vae_concurrency": "VAE actors: a number, or auto (the cluster's GPUs less the text pool's, / prepare.vae_gpus; 1 without GPUs)",
    "prepare.vae_dtype": "VAE precision: fp32, bf16 (each actor checks its first batch against fp32 and falls back above 1% error) or auto (bf16 on a GPU)",
    "prepare.vae_gpus": "GPUs per VAE actor (1 on a GPU cluster)",
    "prepare.text_batch_size": "captions per text-encoder call",
    "prepare.text_concurrency": "text-encoder actors: a number, or auto (one per 32 cluster GPUs, at least 1)",
    "prepare.text_gpus": "GPUs per text-encoder actor",
    "prepare.actor_cpus": "CPUs per VAE / text-encoder actor",
    "prepare.retry_skipped": "a re-run tries the clips of the skip list again (after fixing them)",
    "prepare.clips_per_block": "clips per Ray Data block of work items (one decode task each)",
    "prepare.heldout_fraction": "fraction of the clips found in the inputs written to prepare.heldout_output instead (those of the lowest key hashes: the same on every run over the same inputs)",
    "prepare.heldout_output": "folder of the held-out split's shards (prepare.heldout_fraction > 0)",
    # teacher: the single-time flow-matching teacher (docs/method.md §3)
    "teacher.output": "the teacher's folder (pipeline, checkpoints, metrics)",
    "teacher.steps": "teacher: optimizer steps (the step budget)",
    "teacher.batch_size": "teacher: clips per step over all ranks",
    "teacher.lr": "teacher: AdamW learning rate",
    "teacher.betas": "teacher: AdamW betas",
    "teacher.weight_decay": "teacher: AdamW weight decay",
    "teacher.warmup": "teacher: linear learning-rate warm-up steps",
    "teacher.uncond_prob": "teacher: probability a prompt is dropped (replaced by c_null) for CFG",
    "teacher.ema": "teacher: EMA decay of the exported weights",
    "teacher.ema_warmup": "teacher: the EMA is a plain copy of the weights for the first N steps, then decays",
    "teacher.grad_clip": "teacher: gradient-norm clip",
    "teacher.log_every": "teacher: steps between metric logs",
    "teacher.save_every": "teacher: steps between checkpoints",
    # learner: the DeepSpeed learner group (N Ray actors, one rank each)
    "learner.num_ranks": "learner ranks (Ray actors, one DeepSpeed rank each) of teacher and Stage 1",
    "learner.zero_stage": "DeepSpeed ZeRO stage of the learner ranks (0-3)",
    "learner.grad_accum": "micro-steps per optimizer step of teacher and Stage 1 (gradient accumulation)",
    "learner.see_node_gpus": "learner ranks see their node's GPUs and pick their own, so NCCL can use P2P/NVLink",
    "learner.cpus_per_rank": "CPUs per learner rank (fractional on small machines)",
    "learner.gpus_per_rank": "auto (1 when the cluster has GPUs, 0.5 with rollout.colocate, else 0) or a number; read from the cluster",
    "learner.timeouts.placement": "seconds to place the ranks' and actors' bundles (run.autoscaling: nodes arriving)",
    "learner.timeouts.setup": "seconds one rank's set-up may take (process group, data index, weights); ranks report progress",
    "learner.timeouts.step": "seconds a training step, a trajectory fetch or the final drain may take; a hung rank is named",
    "learner.timeouts.save": "seconds a checkpoint save, its load on resume or the stage's export may take",
    "learner.timeouts.collective": "torch.distributed watchdog on one collective (>= step and save)",
    "learner.master_port": "torch.distributed port of rank 0 (0: rank 0 picks a free port)",
    # pretrain: Stage 1, forward flow-map training (docs/method.md §4)
    "pretrain.output": "Stage 1's folder",
    "pretrain.init": "the model the student wraps (E_r := copy of E_t): the teacher's folder, or ${model.base} (the reference)",
    "pretrain.steps": "Stage 1: optimizer steps (the step budget)",
    "pretrain.global_batch": "Stage 1: clips per step over all ranks; a multiple of 4 (50/25/25 split)",
    "pretrain.lr": "Stage 1: AdamW learning rate",
    "pretrain.betas": "Stage 1: AdamW betas",
    "pretrain.weight_decay": "Stage 1: AdamW weight decay",
    "pretrain.warmup": "Stage 1: linear learning-rate warm-up steps",
    "pretrain.ema": "Stage 1: EMA decay of the exported student",
    "pretrain.ema_warmup": "Stage 1: the EMA is a plain copy of the weights for the first N steps, then decays",
    "pretrain.grad_clip": "Stage 1: gradient-norm clip",
    "pretrain.guidance": "Stage 1: CFG scale fused into the student",
    "pretrain.fd_delta": "Stage 1: finite-difference step of the time derivative (derivative=fd)",
    "pretrain.uncond_prob": "Stage 1: probability a prompt is dropped (replaced by c_null)",
    "pretrain.derivative": "Stage 1: time derivative of the flow map by fd (finite difference) or jvp",
    "pretrain.target": "v in the target: data (eps - x0) or teacher (the frozen teacher's velocity: no single-clip variance, one more call)",
    "pretrain.save_every": "Stage 1: steps between checkpoints",
    "pretrain.log_every": "Stage 1: steps between metric logs",
    "pretrain.resume": "continue from <output>/checkpoints/latest when present",
    # rollout: Stage-2 rollout actors
    "rollout.num_actors": "rollout actors (scale independently of the learner ranks), or auto: as many as the learners keep busy",
    "rollout.cpus_per_actor": "CPUs per rollout actor",
    "rollout.gpus_per_actor": "auto (1 when the cluster has GPUs, 0.5 with colocate, else 0) or a number",
    "rollout.colocate": "place rollout actor i in learner rank i mod ranks' bundle, sharing its GPU (e.g. 0.5 + 0.5)",
    "rollout.threads": "torch threads per rollout actor",
    "rollout.batch_size": "clips per trajectory (one trajectory per learner rank and step)",
    "rollout.failures_before_restart": "consecutive rollouts of one actor that raised (out of memory, I/O, ...) before Ray restarts it",
    "rollout.restarts_on_error": "such restarts of one actor before it is retired; the run stops, naming the error, when every actor is retired",
    # distill: Stage 2, on-policy distillation with flow-map backward simulation (docs/method.md §5)
    "distill.output": "Stage 2's folder",
    "distill.init": "student G's start: the Stage-1 export",
    "distill.teacher": "the frozen real score R; the critic F starts as its copy",
    "distill.steps": "Stage 2: learner steps (the step budget)",
    "distill.lr": "Stage 2: AdamW learning rate of the student G",
    "distill.critic_lr": "Stage 2: AdamW learning rate of the critic F (default: distill.lr, the reference)",
    "distill.betas": "Stage 2: AdamW betas (student and critic)",
    "distill.weight_decay": "Stage 2: AdamW weight decay",
    "distill.ema": "Stage 2: EMA decay of the exported student",
    "distill.ema_warmup": "Stage 2: the EMA is a plain copy of the weights for the first N steps, then decays",
    "distill.grad_clip": "Stage 2: gradient-norm clip",
    "distill.critic": "critic F: copy (a trainable copy of the teacher) or lora (adapters on the frozen teacher itself; needs LoRA on)",
    "distill.dmd_guidance": "CFG scale of the real score in DMD (x0 form)",
    "distill.budgets": "step budgets N drawn for backward simulation",
    "distill.grad_scope": "last: grad through the k-th step and the jump to 0; all: the prefix too (the reference)",
    "distill.rollout": "flowmap: backward simulation (the method); consistency: the rollout ablation's baseline",
    "distill.real_batch": "Stage-1 co-training batch (global, a multiple of 4 and of the ranks)",
    "distill.real_weight": "weight of the Stage-1 co-training loss against the DMD loss (the reference: 1)",
    "distill.num_ranks": "learner ranks of Stage 2 (default: learner.num_ranks; rollout actors share the nodes)",
    "distill.zero_stage": "ZeRO stage of Stage 2's learner ranks (default: learner.zero_stage)",
    "distill.sync_every": "learner steps between weight broadcasts to the rollout actors",
    "distill.weight_sync": "object_store: rank 0 ray.puts, actors pull; torch_dist: a collective group",
    "distill.sync_backend": "torch_dist only: auto (nccl on GPUs, gloo on the CPU), gloo or nccl",
    "distill.sync_timeout_s": "torch_dist only: time-out of forming the group and of each broadcast",
    "distill.max_policy_lag": "weight versions a trajectory may lag: 0 strict on-policy alternation; 1 one-step-off",
    "distill.buffer_capacity": "trajectory buffer size; 0: sized from the demand, 2 x ranks x (max_policy_lag + 1), >= actors",
    "distill.save_every": "Stage 2: steps between checkpoints",
    "distill.log_every": "Stage 2: steps between metric logs",
    "distill.resume": "continue from <output>/checkpoints/latest when present",
    # sample
    "sample.models": "pipeline folders to sample, each into <output>/<folder name>/ (default: Stage 2's student)",
    "sample.model": "one pipeline folder, sampled instead of sample.models when set",
    "sample.prompts": "prompts sampled",
    "sample.steps": "step counts sampled (one video per prompt and count)",
    "sample.guidance_scale": "CFG scale of sampling",
    "sample.output": "folder of the samples (GIF/MP4 and a contact sheet)",
    "sample.seed": "seed of the sampling noise",
    "sample.max_chunks": "causal students: chunks to generate (0: the training length; more streams on)",
    # eval
    "eval.models": "pipeline folders evaluated (teacher, Stage 1, Stage 2 by default)",
    "eval.steps": "step counts evaluated",
    "eval.num_prompts": "held-out prompts evaluated",
    "eval.reference_steps": "Euler steps of the teacher's reference ODE solution",
    "eval.teacher_guidance": "CFG scale of the teacher's samples and of its reference ODE solution",
    "eval.batch_size": "clips per sampling batch",
    "eval.swd_projections": "random projections of the sliced Wasserstein distance",
    "eval.output": "folder of the evaluation (table, JSON, plot)",
    "eval.seed": "seed of the evaluation's noise",
    "eval.consistency_models": "folders also sampled the consistency way (the demo trains them)",
    "eval.frechet": "Fréchet distance + adherence of the data's feature classifier (synthetic prompts only)",
    # experiments: Stage 2's study knobs, fenced off from the method (docs/experiments.md); defaults = the reference
    "experiments.critic_updates": "critic updates per student update (the reference: 1; DMD2: 5), same x_hat, fresh noise",
    "experiments.dmd_shift": "shift of DMD's and the critic's noise levels (default: schedule.shift, the reference)",
    "experiments.critic_times": "the critic's noise levels: logit_normal (the reference) or uniform (DMD's, sigma_shift(U(0,1)))",
    "experiments.rollout_weights": "what the actors roll out with: the student as trained (current) or its EMA (ema)",
    "experiments.grad_jump_only": "DMD's gradient through the final jump alone, not the k-th step (bidirectional students)",
}


def schema_defaults() -> dict[str, object]:
    """Every leaf key of the schema (``Config``) with its default as written there (an interpolation such
    as ``${distill.lr}`` stays a string), in the schema's order. A nested dataclass is a group, anything
    else (lists included) a leaf: a group added to the schema is picked up as it is."""
    from anyflow_ray.run.config import Config

    def walk(node: DictConfig, prefix: str):
        raw = OmegaConf.to_container(node, resolve=False)
        for key, default in raw.items():
            if dataclasses.is_dataclass(OmegaConf.get_type(node, key)):
                yield from walk(node[key], f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", default

    return dict(walk(OmegaConf.structured(Config), ""))


def describe(cfg: DictConfig, source: str = "") -> str:
    """Every resolved key of ``cfg`` grouped by section, aligned: value, schema default, meaning; ``*``
    marks a key whose value differs from its default (an interpolated default resolved in ``cfg``)."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    probe = OmegaConf.create(plain)
    rows, changed = [], 0
    for key, default in schema_defaults().items():
        value = OmegaConf.select(probe, key)
        value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        OmegaConf.update(probe, key, default, merge=False)  # the default, resolved against this config
        resolved = OmegaConf.select(probe, key)
        resolved = OmegaConf.to_container(resolved, resolve=True) if OmegaConf.is_config(resolved) else resolved
        OmegaConf.update(probe, key, value, merge=False)
        mark = "*" if value != resolved else " "
        changed += mark == "*"
        rows.append((key, mark, _show(value), _show(default), KEYS.get(key, "(no entry in config_keys.KEYS)")))
    widths = [max(len(r[0]) for r in rows), *(min(32, max(len(r[i]) for r in rows)) for i in (2, 3))]
    starts = [2, 4 + widths[0], 6 + widths[0] + widths[1], 8 + widths[0] + widths[1] + widths[2]]
    lines = [f"# {source or 'the schema defaults'}: {len(rows)} keys, {changed} marked * (value differs from "
             f"its default)", _row(("key", "value", "default", "meaning"), starts)]
    section = None
    for key, mark, *cells in rows:
        if key.split(".")[0] != section:
            section = key.split(".")[0]
            lines.append(f"{section}:")
        lines.append(mark + _row((key, *cells), starts)[1:])
    return "\n".join(lines) + "\n"


def _row(cells, starts) -> str:
    """Cells at fixed columns; a cell wider than its column pushes the rest onto an aligned next line."""
    lines, line = [], ""
    for cell, start in zip(cells, starts):
        if line and len(line) > start - 2:
            lines.append(line.rstrip())
            line = ""
        line = line.ljust(start) + cell
    return "\n".join([*lines, line.rstrip()])


def _show(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)
