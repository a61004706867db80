"""Pipeline folders in the field's format: every Wan / AnyFlow folder read, exports diffusers loads.

**Writing** (``write_folder``): a latent-space bidirectional flow map is written as diffusers'
``AnyFlowPipeline`` (transformer ``AnyFlowTransformer3DModel``, scheduler ``FlowMapEulerDiscreteScheduler``
with the run's shift), a latent-space single-time teacher as diffusers' ``WanPipeline`` (scheduler
``FlowMatchEulerDiscreteScheduler``), so ``DiffusionPipeline.from_pretrained(folder)`` samples either.
diffusers' pipelines need a VAE and have no chunk-by-chunk sampler, so pixel-space models (the tiny
default) and the causal flow map without FAR's compressed context are written as the project's
``AnyFlowRayPipeline`` (its transformer folder is still diffusers-readable where diffusers has the class);
a latent causal one with it (``model.causal.full_chunk_limit``) as diffusers' ``AnyFlowFARPipeline``. What only the project reads (the
prompt length and negative prompt the model was trained with, its video size) is kept in ``anyflow.json``
beside ``model_index.json``, which diffusers ignores.

**Reading** (``open_folder``): any such folder, one written by diffusers itself, NVIDIA's released
``AnyFlow-Wan2.1-T2V-*-Diffusers`` students, the reference's ``far.*`` layout and the project's earlier
``AnyFlowPipeline`` folders, component by component into an ``AnyFlowRayPipeline`` (the transformer
through ``models.loading.load_transformer``, which refuses other kinds naming them).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from anyflow_ray.models.causal import is_causal
from anyflow_ray.models.flowmap import is_flow_map, unwrap_model
from anyflow_ray.models.text import UNCONDITIONAL_PROMPT

SETTINGS = "anyflow.json"
OWN_PIPELINE = "AnyFlowRayPipeline"
SETTING_KEYS = ("text_max_length", "negative_prompt", "sample_size", "shift")
DIFFUSERS_TRANSFORMERS = ("WanTransformer3DModel", "AnyFlowTransformer3DModel", "AnyFlowFARTransformer3DModel")


class FolderError(ValueError):
    """A path that is no pipeline folder anyflow-ray reads."""


def pipeline_class(transformer: torch.nn.Module, latent: bool) -> str:
    """The ``model_index.json`` class a folder of ``transformer`` is written as (module docstring)."""
    model = unwrap_model(transformer)
    if not latent or (is_causal(model) and model.diffusers_config() is None):
        return OWN_PIPELINE
    if is_causal(model):
        return "AnyFlowFARPipeline"
    if is_flow_map(model):
        return "AnyFlowPipeline" if model.diffusers_config() is not None else OWN_PIPELINE
    return "WanPipeline"


def scheduler_for(transformer: torch.nn.Module, shift: float):
    from diffusers import FlowMapEulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    if is_flow_map(transformer):
        return FlowMapEulerDiscreteScheduler(shift=shift)
    return FlowMatchEulerDiscreteScheduler(shift=shift)


def link_tree(src: Path, dst: Path) -> None:
    """``src``'s files under ``dst``: hard links where the file system allows, copies elsewhere."""
    for path in sorted(src.rglob("*")):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        try:
            os.link(path, target)
        except OSError:  # another file system, or links not allowed
            shutil.copy2(path, target)


def write_folder(transformer: torch.nn.Module, base: str | Path, out: str | Path,
                 negative_prompt: str = UNCONDITIONAL_PROMPT, shift: float = 5.0) -> Path:
    """``transformer`` (saved in its own dtype) with ``base``'s tokenizer, text encoder and VAE (linked)
    as a pipeline folder ``out`` in the format the module docstring gives; returns ``out``."""
    from diffusers import __version__
    from transformers import AutoTokenizer

    from anyflow_ray.models.loading import sample_size, text_max_length

    base, out = Path(base), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    latent = (base / "vae" / "config.json").is_file()
    model = unwrap_model(transformer)
    model.save_pretrained(out / "transformer", safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(base / "tokenizer", local_files_only=True)
    tokenizer.save_pretrained(out / "tokenizer")
    link_tree(base / "text_encoder", out / "text_encoder")
    scheduler = scheduler_for(model, shift)
    scheduler.save_pretrained(out / "scheduler")
    transformer_class = json.loads((out / "transformer" / "config.json").read_text())["_class_name"]
    library = "diffusers" if transformer_class in DIFFUSERS_TRANSFORMERS else "anyflow_ray"
    index = {"_class_name": pipeline_class(model, latent), "_diffusers_version": __version__,
             "tokenizer": ["transformers", type(tokenizer).__name__],
             "text_encoder": ["transformers", "UMT5EncoderModel"],
             "transformer": [library, transformer_class],
             "scheduler": ["diffusers", type(scheduler).__name__],
             "vae": [None, None]}
    if latent:
        link_tree(base / "vae", out / "vae")
        index["vae"] = ["diffusers", json.loads((base / "vae" / "config.json").read_text())["_class_name"]]
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    settings = {"text_max_length": text_max_length(base), "negative_prompt": negative_prompt,
                "sample_size": sample_size(base), "shift": shift, "pixel_space": not latent,
                "channels": int(model.config.in_channels), "written_by": "anyflow-ray"}
    (out / SETTINGS).write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n")
    return out


def folder_settings(root: Path) -> dict:
    """The sampling settings of folder ``root``: ``anyflow.json`` (this version's folders and tiny bases),
    ``model_index.json`` (the project's earlier folders kept them there), the scheduler's shift
    (diffusers' and NVIDIA's folders), Wan's defaults otherwise (512 text tokens, no stored size)."""
    found: dict = {}
    for name in ("model_index.json", SETTINGS):
        path = root / name
        if path.is_file():
            found.update({k: v for k, v in json.loads(path.read_text()).items() if k in SETTING_KEYS})
    scheduler = root / "scheduler" / "scheduler_config.json"
    if "shift" not in found and scheduler.is_file():
        found["shift"] = float(json.loads(scheduler.read_text()).get("shift", 5.0))
    return {"text_max_length": int(found.get("text_max_length") or 512),
            "negative_prompt": found.get("negative_prompt", UNCONDITIONAL_PROMPT),
            "sample_size": found.get("sample_size"), "shift": float(found.get("shift", 5.0))}


def open_folder(path: str | Path, dtype: torch.dtype = torch.float32):
    """A pipeline folder as an ``AnyFlowRayPipeline`` (module docstring); a path without
    ``model_index.json`` is refused naming it."""
    from anyflow_ray.models.loading import load_text_encoder, load_transformer
    from anyflow_ray.pipeline import AnyFlowRayPipeline

    root = Path(path)
    if not (root / "model_index.json").is_file():
        raise FolderError(f"{root}: no model_index.json (expected a pipeline folder: an anyflow-ray export, a "
                          f"diffusers AnyFlow/Wan folder or a checkpoint)")
    transformer = load_transformer(root, dtype=dtype)
    tokenizer, encoder = load_text_encoder(root, dtype)
    vae = None
    if (root / "vae" / "config.json").is_file():
        from anyflow_ray.data.encode import load_vae

        vae = load_vae(root)
    return AnyFlowRayPipeline(transformer=transformer, text_encoder=encoder, tokenizer=tokenizer, vae=vae,
                              **folder_settings(root))


# -- LoRA --------------------------------------------------------------------------------------------
LORA_FILE = "pytorch_lora_weights.safetensors"  # what diffusers' load_lora_weights looks for by default


def write_lora(model: torch.nn.Module, out: str | Path, base: str | Path, dtype: torch.dtype = torch.bfloat16,
               about: dict | None = None) -> Path:
    """The LoRA adapters of ``model`` (peft, not fused) in diffusers' LoRA format under ``out``, so
    ``AnyFlowPipeline.from_pretrained(base).load_lora_weights(out)`` (``WanPipeline`` for a teacher) is the
    fused model. ``base``: the folder the adapters apply to (the stage's init), kept in ``lora.json`` with
    ``about``. A model trained partly outside its adapters (E_r trained in full when
    ``model.lora.flow_map_targets`` is empty) is refused naming those parameters: the adapters alone would
    not be the trained model."""
    from diffusers import AnyFlowPipeline, WanPipeline
    from peft.utils import get_peft_model_state_dict

    inner = unwrap_model(model)
    if not any("lora_" in name for name, _ in inner.named_parameters()):
        raise ValueError("the model has no LoRA adapters (model.lora.enabled=false): export the fused model instead")
    full = [name for name, p in inner.named_parameters() if p.requires_grad and "lora_" not in name]
    if full:
        shown = ", ".join(full[:3]) + (f" and {len(full) - 3} more" if len(full) > 3 else "")
        raise ValueError(f"{shown} were trained in full, outside the LoRA adapters (model.lora.flow_map_targets="
                         f"[] trains E_r in full): a LoRA export would lose them; export the fused model instead")
    state = {k: v.detach().to(dtype).contiguous() for k, v in get_peft_model_state_dict(inner).items()}
    config = inner.peft_config[next(iter(inner.peft_config))]
    metadata = {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": sorted(config.target_modules)}
    out = Path(out)
    writer = AnyFlowPipeline if is_flow_map(inner) else WanPipeline
    writer.save_lora_weights(out, transformer_lora_layers=state, weight_name=LORA_FILE,
                             transformer_lora_adapter_metadata=metadata)
    (out / "lora.json").write_text(json.dumps({"base": str(base), "pipeline": writer.__name__, **metadata,
                                               **(about or {})}, indent=2) + "\n")
    return out
