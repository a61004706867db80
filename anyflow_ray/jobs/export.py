"""`anyflow-ray export <checkpoint>`: a checkpoint's EMA model as a pipeline folder; and the export of a
run whose training finished but whose export did not (``run.records``: ``RunRecord.export_only``).

Both rebuild the model on this process's CPU from the checkpoint alone (``training.export``): the run's
config is in its meta.json, the frozen weights are read from the folders it names. No Ray, no DeepSpeed,
no GPU: a 14B model needs about 2x its bf16 size in host memory (56 GB) while it is rebuilt.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from anyflow_ray.jobs.common import log, record_config
from anyflow_ray.run.storage import Storage
from anyflow_ray.training import checkpoint as ckpt_io
from anyflow_ray.training.export import export_checkpoint, export_files, export_lora, resolve_checkpoint


def run(cfg: DictConfig, checkpoint: str, out: str | None = None, dtype: str | None = None,
        lora: bool = False) -> Path:
    """Export ``checkpoint`` (a checkpoint folder, or a run folder: its latest) to ``out`` (default
    ``<run>/exports/<step folder>``, ``-lora`` appended with ``lora``); ``dtype``: fp32 | bf16 (default the
    run's ``run.export_dtype``). ``lora``: the trained adapters alone, in diffusers' LoRA format."""
    ckpt = resolve_checkpoint(checkpoint)
    target = Path(out) if out else ckpt.parent.parent / "exports" / (ckpt.name + ("-lora" if lora else ""))
    log.info("export%s: %s -> %s", " --lora" if lora else "", ckpt, target)
    if lora:
        export_lora(ckpt, target, dtype)
        print(f"exported the LoRA adapters of {ckpt} to {target} (they apply to "
              f"{json.loads((target / 'lora.json').read_text())['base']})", flush=True)
        return target
    export_checkpoint(ckpt, target, dtype)
    print(f"exported {ckpt} to {target}", flush=True)
    return target


def export_finished_run(cfg: DictConfig, job: str, out: Path) -> Path:
    """A run trained to its budget whose export is missing or incomplete: its final model exported from
    the last checkpoint into ``out`` (uploaded with ``run.storage``, its marker last), Stage 2's pipeline
    summary written from that checkpoint's books when the run died before writing it, and its config
    recorded."""
    storage = Storage.of(cfg)
    marker = out / "checkpoints" / ckpt_io.LATEST
    if storage.enabled and marker.is_file():
        storage.fetch(marker.parent / marker.read_text().strip())
    ckpt = resolve_checkpoint(out)  # run.records found it intact and at the budget (latest names it)
    export_checkpoint(ckpt, out)
    for name in export_files(out) if storage.enabled else []:
        storage.upload(out / name)
    summary = out / "pipeline_summary.json"
    if job == "distill" and not summary.is_file():
        meta = ckpt_io.read_meta(ckpt)
        summary.write_text(json.dumps({"from_checkpoint": ckpt.name, "step": meta["step"],
                                       "weight_version": meta.get("weight_version", 0),
                                       **(meta.get("driver_state") or {})}, indent=2))
        storage.upload(summary)
    record_config(cfg, out)
    log.info("%s: final model exported from %s to %s", job, ckpt, out)
    return out
