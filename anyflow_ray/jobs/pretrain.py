"""`anyflow-ray pretrain`: Stage 1, forward flow-map training on the learner group (docs/method.md §4).

The student wraps the teacher (``pretrain.init``) as a two-time flow map and trains on the real
(synthetic) data; the final model is exported as a pipeline folder (``formats``).
``--dry-run`` builds the configured model on the meta device (no weights), applies LoRA, and prints
parameter counts, the DeepSpeed config and the per-GPU memory plan (``anyflow_ray/run/memory_plan.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig

from anyflow_ray.jobs import dry_run
from anyflow_ray.jobs.train_loop import run_job
from anyflow_ray.models.architectures import count_parameters, memory_per_gpu, meta_transformer
from anyflow_ray.run.config import ConfigError


def run(cfg: DictConfig, dry_run: bool = False) -> Path | dict:
    if dry_run:  # `anyflow-ray pretrain --dry-run`
        return dry_run_report(cfg)
    return run_job(cfg, "pretrain")


def dry_run_report(cfg: DictConfig) -> dict:
    """Meta-device model + LoRA: trainable/total parameters, DeepSpeed config, memory per GPU."""
    from anyflow_ray.models.lora import apply_lora
    from learners.worker import deepspeed_config

    if not cfg.model.full_size:
        raise ConfigError("pretrain --dry-run needs model.full_size (1.3b or 14b), e.g. --config "
                         "configs/wan2.1-t2v-1.3b.yaml")
    model = meta_transformer(cfg.model.full_size, flow_map=True, gate=cfg.model.gate)
    if cfg.model.lora.enabled:
        apply_lora(model, cfg.model.lora)
    total, trainable = count_parameters(model), count_parameters(model, trainable_only=True)
    world = cfg.learner.num_ranks
    micro = cfg.pretrain.global_batch // world
    ds_config = deepspeed_config(cfg, "pretrain", micro, torch.bfloat16)
    chunks = list(cfg.model.causal.chunks)
    kind = f"causal flow map, chunks {chunks}, teacher-forced (docs/method.md §6)" if chunks else "flow map"
    print(f"model: Wan2.1-T2V-{cfg.model.full_size.upper()} {kind} (meta device, no weights)")
    print(f"parameters: total {total:,}  trainable {trainable:,} ({100 * trainable / total:.2f}%)"
          f"{'  [LoRA rank %d]' % cfg.model.lora.rank if cfg.model.lora.enabled else ''}")
    print("deepspeed config:\n" + json.dumps(ds_config, indent=2))
    print(f"model-state memory per GPU ({world} rank(s), bf16 weights; activations not included):")
    rows = {}
    for stage in range(4):
        mem = memory_per_gpu(total, trainable, stage, world)
        rows[stage] = mem
        mark = "  <- learner.zero_stage" if stage == cfg.learner.zero_stage else ""
        print(f"  ZeRO-{stage}: " + "  ".join(f"{k} {v / 2**30:6.2f} GiB" for k, v in mem.items()) + mark)
    plan = dry_run.run(cfg, "pretrain")  # the full plan (activations included); refuses one that does not fit
    return {"total": total, "trainable": trainable, "deepspeed": ds_config, "memory": rows, "plan": plan}
