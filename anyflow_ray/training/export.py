"""The model of a checkpoint, and exported pipeline folders written so that none is ever half there.

A checkpoint (``training.checkpoint``, format 3) holds the trainable state only: DeepSpeed's engines
without frozen weights, the EMA of the trainable parameters, RNG and books, and the run's resolved
config. The model is rebuilt from it the way its learner built it (``job_model``: the base or the
stage's init folder, LoRA when configured) with the EMA written into the trainable parameters
(``ema_model``), so a checkpoint is enough to sample (``open_pipeline``) or to export
(``export_checkpoint``, the ``anyflow-ray export`` command) without a GPU, Ray or DeepSpeed.

An export (``write_pipeline``) is a pipeline folder in ``run.export_dtype`` (bf16 by default), in the format
``formats.write_folder`` gives (diffusers' ``AnyFlowPipeline`` for a latent flow map): the transformer
saved, the base folder's text encoder and VAE hard-linked (copied where the file system does not allow a
link) and its tokenizer saved, so it is self-contained at the price of one copy per stage, not per checkpoint.
It is built under ``<out>/.export-partial/`` and moved into place component by component; ``export.json``
(the step, the dtype, every file's size and SHA-256) is written last and removed first, so its presence
is the proof an export is complete (``export_complete``); loading the transformer verifies its hashes
(``models.loading.verify_recorded``; a folder without export.json, diffusers' or NVIDIA's, is loaded as
is). A run whose training finished but whose export is not complete is exported again from its last
checkpoint (``run.records``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from anyflow_ray.formats import SETTINGS
from anyflow_ray.training import checkpoint as ckpt_io

log = logging.getLogger("anyflow_ray")
MARKER = "export.json"
PARTIAL = ".export-partial"


def job_model(cfg: DictConfig, job: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The trainable model of ``job`` as its learner builds it: the teacher (the base's single-time
    transformer), the Stage-1 student (``pretrain.init`` as a two-time flow map, causal over
    ``model.causal.chunks`` when set) or the Stage-2 student (``distill.init``); LoRA when enabled."""
    from anyflow_ray.models.causal import WanCausalFlowMapTransformer3DModel, is_causal
    from anyflow_ray.models.loading import load_transformer
    from anyflow_ray.models.lora import apply_lora
    from anyflow_ray.run.config import ConfigError

    chunks = [int(c) for c in cfg.model.causal.chunks]
    limit = int(cfg.model.causal.get("full_chunk_limit", 0)) or None
    if job == "teacher":
        model = load_transformer(cfg.model.base, flow_map=False, dtype=dtype)
    elif job == "pretrain":
        model = load_transformer(cfg.pretrain.init, flow_map=True, gate=cfg.model.gate, dtype=dtype)
        if is_causal(model) and list(model.config.causal_chunks) != chunks:
            raise ConfigError(f"model.causal.chunks={chunks}: pretrain.init={cfg.pretrain.init} holds a causal "
                              f"model over chunks {list(model.config.causal_chunks)}")
        if is_causal(model) and model.config.full_chunk_limit != limit:
            raise ConfigError(f"model.causal.full_chunk_limit={limit or 0}: pretrain.init={cfg.pretrain.init} holds "
                              f"a causal model with full_chunk_limit={model.config.full_chunk_limit or 0}")
        if chunks and not is_causal(model):
            model = WanCausalFlowMapTransformer3DModel.from_base(model, chunks, gate=cfg.model.gate,
                                                                 full_chunk_limit=limit)
    elif job == "distill":
        model = load_transformer(cfg.distill.init, flow_map=True, gate=cfg.model.gate, dtype=dtype,
                                 causal_chunks=chunks)
    else:
        raise ValueError(f"unknown job {job!r}; expected teacher, pretrain or distill")
    if cfg.model.lora.enabled:
        apply_lora(model, cfg.model.lora)
    return model


def export_dtype(cfg: DictConfig, trained: torch.dtype | None = None) -> torch.dtype:
    """``run.export_dtype``: fp32 | bf16 | auto (the dtype the run trained in: bf16 on GPUs, fp32 on the CPU)."""
    choice = str(cfg.run.get("export_dtype", "auto"))
    if choice == "auto":
        return torch.bfloat16 if trained == torch.bfloat16 or str(trained) == "torch.bfloat16" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[choice]


def final_model(model: torch.nn.Module, cfg: DictConfig) -> torch.nn.Module:
    """``model`` (a CPU copy holding the EMA weights) as it is exported: LoRA fused into the weights."""
    if cfg.model.lora.enabled:
        model.fuse_lora()
        model.unload_lora()
    return model


# -- a checkpoint's model ------------------------------------------------------------------------------
def resolve_checkpoint(path: str | Path, verify: bool = False) -> Path:
    """A checkpoint folder (``.../checkpoints/step-000500``), or a run's ``checkpoints/`` folder or run
    folder, meaning its newest checkpoint (the one ``latest`` names; with ``verify``, the newest intact
    one, with a warning when that is not the one ``latest`` names or ``latest`` is gone)."""
    path = Path(path)
    for root in (path.parent, path) if path.name == "checkpoints" else (path,):
        if (root / "checkpoints").is_dir() and not (ckpt_io.state_dir(path) / "meta.json").is_file():
            if not verify and (root / "checkpoints" / ckpt_io.LATEST).is_file():
                return ckpt_io.find_latest(root)
            found, _, _, warning = ckpt_io.choose_resume(root, None)
            if warning:
                log.warning("%s", warning)
            if found is not None:
                return found
    if not (ckpt_io.state_dir(path) / "meta.json").is_file():
        raise ckpt_io.CheckpointError(f"{path} is not a checkpoint (no training_state/meta.json) nor a run "
                                      f"folder with checkpoints")
    return path


def checkpoint_config(ckpt: Path, meta: dict) -> DictConfig:
    """The run's resolved config: meta.json's (format 3), else the run folder's config.yaml (format 2)."""
    if meta.get("config"):  # its folders where the run folder is now (a copied or moved run)
        from anyflow_ray.run.config import relocate_run

        return OmegaConf.create(relocate_run(meta["config"], str(meta.get("job", "")), ckpt.parent.parent))
    recorded = ckpt.parent.parent / "config.yaml"
    if not recorded.is_file():
        raise ckpt_io.CheckpointError(f"checkpoint {ckpt} (format {meta.get('format')}) holds no config and "
                                      f"{recorded} is missing: it cannot be rebuilt")
    return OmegaConf.load(recorded)


def ema_model(ckpt: str | Path, fuse: bool = True) -> tuple[torch.nn.Module, DictConfig, dict]:
    """(the EMA model of checkpoint ``ckpt`` on the CPU in fp32, LoRA fused unless ``fuse=False``; its run's
    config; meta.json)."""
    given = Path(ckpt)
    ckpt = resolve_checkpoint(given, verify=True)  # a run folder: its newest intact checkpoint, verified
    meta = ckpt_io.read_meta(ckpt)
    if ckpt == given:  # a checkpoint folder named: its files verified here
        meta = ckpt_io.validate_checkpoint(ckpt, int(meta.get("world_size", 1)))
    meta["path"] = str(ckpt)
    cfg = checkpoint_config(ckpt, meta)
    model = job_model(cfg, meta["job"], torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]
    ranks = [ckpt_io.load_rank_state(ckpt, r) for r in range(int(meta["world_size"]))]
    with torch.no_grad():
        for i, p in enumerate(params):
            key = f"ema.{i}"
            if key not in ranks[0]:
                raise ckpt_io.CheckpointError(f"{ckpt_io.rank_file(ckpt, 0)} has no {key}: the checkpoint holds "
                                              f"fewer EMA tensors than the {meta['job']} model has trainable "
                                              f"parameters ({len(params)})")
            if int(meta.get("zero_stage", 0)) == 3:  # each rank's flat partition, in rank order, the last padded
                flat = torch.cat([r[key].reshape(-1) for r in ranks])[:p.numel()]
            else:
                flat = ranks[0][key]
            if flat.numel() != p.numel():
                raise ckpt_io.CheckpointError(f"{ckpt}: EMA tensor {i} has {flat.numel()} values, the model's "
                                              f"parameter has {p.numel()} (another model or config?)")
            p.copy_(flat.reshape(p.shape).to(p.dtype))
    return (final_model(model, cfg) if fuse else model), cfg, meta


def pipeline_of(transformer: torch.nn.Module, cfg: DictConfig, dtype: torch.dtype = torch.float32):
    """An AnyFlowRayPipeline in memory around ``transformer`` with ``model.base``'s text encoder and VAE."""
    from anyflow_ray.formats import folder_settings
    from anyflow_ray.models.loading import load_text_encoder
    from anyflow_ray.pipeline import AnyFlowRayPipeline

    base = Path(cfg.model.base)
    tokenizer, encoder = load_text_encoder(base, dtype)
    vae = None
    if (base / "vae" / "config.json").is_file():
        from anyflow_ray.data.encode import load_vae

        vae = load_vae(base)
    settings = {**folder_settings(base), "negative_prompt": cfg.model.negative_prompt, "shift": cfg.schedule.shift}
    return AnyFlowRayPipeline(transformer=transformer.to(dtype), text_encoder=encoder, tokenizer=tokenizer, vae=vae,
                              **settings)


def open_pipeline(path: str | Path, dtype: torch.dtype = torch.float32):
    """A pipeline folder of any kind ``formats.open_folder`` reads, or a checkpoint (its EMA model, see
    ``resolve_checkpoint``)."""
    from anyflow_ray.formats import open_folder

    path = Path(path)
    if (path / "model_index.json").is_file():
        return open_folder(path, dtype)  # the transformer verified against export.json, where there is one
    model, cfg, _ = ema_model(path)
    return pipeline_of(model, cfg, dtype)


def is_model(path: str | Path) -> bool:
    """Whether ``path`` is something ``open_pipeline`` opens (an exported folder or a checkpoint)."""
    path = Path(path)
    try:
        return (path / "model_index.json").is_file() or resolve_checkpoint(path) is not None
    except ckpt_io.CheckpointError:
        return False


def export_checkpoint(ckpt: str | Path, out: str | Path, dtype: str | None = None) -> Path:
    """Write checkpoint ``ckpt``'s EMA model as a pipeline folder ``out`` (``dtype``: fp32 | bf16, default
    the run's ``run.export_dtype``)."""
    model, cfg, meta = ema_model(ckpt)
    trained = torch.bfloat16 if meta.get("dtype") == "torch.bfloat16" else torch.float32
    chosen = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype] if dtype else export_dtype(cfg, trained)
    return write_pipeline(model, cfg, out, chosen, step=int(meta["step"]), source=meta["path"])


def export_lora(ckpt: str | Path, out: str | Path, dtype: str | None = None) -> Path:
    """Checkpoint ``ckpt``'s EMA LoRA adapters in diffusers' LoRA format under ``out`` (``formats.write_lora``:
    they apply to the stage's init folder, which ``lora.json`` names); ``dtype`` as ``export_checkpoint``."""
    from anyflow_ray.formats import write_lora

    model, cfg, meta = ema_model(ckpt, fuse=False)
    base = {"teacher": cfg.model.base, "pretrain": cfg.pretrain.init, "distill": cfg.distill.init}[meta["job"]]
    chosen = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype] if dtype else export_dtype(cfg)
    try:
        return write_lora(model, out, base, chosen, {"job": meta["job"], "step": int(meta["step"]),
                                                     "source": meta["path"]})
    except ValueError as err:
        raise ckpt_io.CheckpointError(f"{meta['path']}: {err}") from err


# -- writing an export ---------------------------------------------------------------------------------
def write_pipeline(transformer: torch.nn.Module, cfg: DictConfig, out: str | Path, dtype: torch.dtype,
                   step: int | None = None, source: str = "learner") -> Path:
    """``transformer`` in ``dtype`` as a pipeline folder ``out`` (``formats.write_folder``: diffusers'
    ``AnyFlowPipeline`` / ``WanPipeline`` for latent models), written so that it is never half there (the
    module docstring); returns ``out``."""
    from anyflow_ray.formats import write_folder

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).unlink(missing_ok=True)  # from here on the folder holds no complete export
    partial = out / PARTIAL
    shutil.rmtree(partial, ignore_errors=True)
    write_folder(transformer.to(dtype), cfg.model.base, partial, cfg.model.negative_prompt, cfg.schedule.shift)
    components = sorted(p.name for p in partial.iterdir() if p.is_dir())
    for name in components:  # each component replaced as a whole, model_index.json last
        shutil.rmtree(out / name, ignore_errors=True)
        os.replace(partial / name, out / name)
    os.replace(partial / SETTINGS, out / SETTINGS)
    os.replace(partial / "model_index.json", out / "model_index.json")
    partial.rmdir()
    files = {str(p.relative_to(out)): ckpt_io.file_record(p) for name in components
             for p in sorted((out / name).rglob("*")) if p.is_file()}  # fsynced, sized and hashed
    for name in (SETTINGS, "model_index.json"):
        files[name] = ckpt_io.file_record(out / name)
    tmp = out / f"{MARKER}.tmp"
    tmp.write_text(json.dumps({"step": step, "dtype": str(dtype).removeprefix("torch."), "source": source,
                               "components": components, "files": files}, indent=2) + "\n")
    ckpt_io.fsync_path(tmp)
    os.replace(tmp, out / MARKER)
    ckpt_io.fsync_path(out)
    return out


def export_files(out: str | Path) -> list[str]:
    """What an export wrote into ``out``, relative to it (its marker last: upload in this order)."""
    marker = json.loads((Path(out) / MARKER).read_text())
    return [*marker["files"], MARKER]


def export_complete(out: str | Path, step: int, check_files: bool = True) -> bool:
    """Whether ``out`` holds a complete export of step ``step``: its marker names that step and (with
    ``check_files``) every file it lists is there with the size written."""
    marker = Path(out) / MARKER
    try:
        record = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if record.get("step") != step:
        return False
    sizes = {rel: r["bytes"] if isinstance(r, dict) else r for rel, r in record.get("files", {}).items()}
    return not check_files or all((Path(out) / rel).is_file() and (Path(out) / rel).stat().st_size == size
                                  for rel, size in sizes.items())
