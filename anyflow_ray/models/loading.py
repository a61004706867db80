"""Loading models from local diffusers folders, and writing the tiny one.

The same code reads Wan2.1-T2V-1.3B-Diffusers and the folder ``anyflow-ray make-tiny`` writes:
``transformer/`` (WanTransformer3DModel or a flow map, causal or not), ``text_encoder/`` (UMT5EncoderModel),
``tokenizer/``, ``scheduler/`` and, for latent models, ``vae/`` (AutoencoderKLWan). Nothing is ever
downloaded: a missing folder is an error naming it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel
from transformers import AutoTokenizer, UMT5EncoderModel

from anyflow_ray.models.architectures import tiny_transformer_config
from anyflow_ray.models.causal import WanCausalFlowMapTransformer3DModel
from anyflow_ray.models.flowmap import (DELTA_EMBEDDER, DIFFUSERS_CLASS, LEGACY_PREFIX, WanFlowMapTransformer3DModel,
                                        init_kwargs, is_flow_map)
from anyflow_ray.models.text import build_word_tokenizer, tiny_text_encoder

LOCAL_ONLY = dict(local_files_only=True)


def _require_folder(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"{what} not found at {path} (expected a diffusers/transformers folder with "
                                f"config.json; run `anyflow-ray make-tiny` or point model.base at Wan2.1 weights)")
    return path


def verify_recorded(folder: str | Path) -> None:
    """The files of a pipeline component (``<export>/transformer``) against the SHA-256 its export recorded
    in ``<export>/export.json``; a folder without one (diffusers', NVIDIA's, a base model) is taken as it is.
    A mismatch or a missing file is refused naming the file."""
    from anyflow_ray.training.checkpoint import CheckpointError, sha256_of

    folder = Path(folder)
    try:
        files = json.loads((folder.parent / "export.json").read_text()).get("files", {})
    except (OSError, ValueError):
        return
    for rel, record in sorted(files.items()):
        path = folder.parent / rel
        if not isinstance(record, dict) or "sha256" not in record or Path(rel).parts[0] != folder.name:
            continue
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: {folder.parent / 'export.json'} lists it")
        if sha256_of(path) != record["sha256"]:
            raise CheckpointError(f"{path} does not match the SHA-256 {folder.parent / 'export.json'} recorded "
                                  f"(overwritten or torn since it was exported: export it again, `anyflow-ray export`)")


# transformer/config.json ``_class_name`` -> what the folder holds
FLOW_MAP_CLASSES = (WanFlowMapTransformer3DModel.__name__, DIFFUSERS_CLASS)
REFERENCE_CLASS = "FAR_Wan_Transformer3DModel"  # NVlabs/AnyFlow's own class (older NVIDIA snapshots)
FAR_CLASS = "AnyFlowFARTransformer3DModel"
RELEASED_CHUNKS = [1, 3, 3, 3, 3, 3, 3, 2]  # chunk_partition of NVIDIA's FAR students (21 latent frames)


class ModelFormatError(ValueError):
    """A model folder of a kind anyflow-ray does not load, or one whose weights do not fit its config."""


def transformer_kind(config: dict, folder: Path) -> str:
    """"wan" (single-time), "flow_map" or "causal" for a transformer ``config.json``; other kinds refused
    in one line naming what was found."""
    name = config.get("_class_name")
    if name == "WanTransformer3DModel":
        return "wan"
    if name in FLOW_MAP_CLASSES:
        return "flow_map"
    if name in (WanCausalFlowMapTransformer3DModel.__name__, FAR_CLASS):
        return "causal"
    if name == REFERENCE_CLASS and not config.get("init_far_model"):
        return "flow_map" if config.get("init_flowmap_model") else "wan"
    if name == REFERENCE_CLASS and config.get("init_flowmap_model"):
        return "causal"
    if name == REFERENCE_CLASS:
        raise ModelFormatError(f"{folder}: a FAR model of the reference ({name}) without the flow map "
                               f"(init_flowmap_model false): a single-time causal model, which anyflow-ray does not train")
    raise ModelFormatError(f"{folder}: transformer class {name!r} is not a Wan2.1 or AnyFlow transformer (expected "
                           f"WanTransformer3DModel, {DIFFUSERS_CLASS}, {REFERENCE_CLASS} or anyflow-ray's own)")


def weight_keys(folder: Path) -> list[str] | None:
    """The tensor names of a diffusers model folder, read from its safetensors headers (None: not safetensors)."""
    from safetensors import safe_open

    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        return sorted(json.loads(index.read_text())["weight_map"])
    single = folder / "diffusion_pytorch_model.safetensors"
    if not single.is_file():
        return None
    with safe_open(str(single), framework="pt") as f:
        return sorted(f.keys())


def _check_weights(cls, kwargs: dict, folder: Path) -> None:
    """Refuse a folder whose tensors are not exactly the ones ``cls(**kwargs)`` has (diffusers would
    initialise the missing ones at random with only a warning): one line naming them."""
    keys = weight_keys(folder)
    if keys is None:
        return
    if any(k.startswith(LEGACY_PREFIX) for k in keys) and (folder / "diffusion_pytorch_model.safetensors.index.json").is_file():
        raise ModelFormatError(f"{folder}: a sharded flow map written by an earlier anyflow-ray "
                               f"(condition_embedder.time_embedder_r.*); export it again with this version")
    keys = {DELTA_EMBEDDER + k[len(LEGACY_PREFIX):] if k.startswith(LEGACY_PREFIX) else k for k in keys}
    try:
        with torch.device("meta"):
            expected = set(cls(**kwargs).state_dict())
    except ValueError as err:  # ConfigError included: the folder's config builds no model
        raise ModelFormatError(f"{folder}: its config does not build {cls.__name__}: {err}") from err
    missing, unexpected = sorted(expected - keys), sorted(keys - expected)
    if missing or unexpected:
        def few(names):
            return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise ModelFormatError(f"{folder}: its weights do not fit {config_name(folder)} as {cls.__name__}"
                               + (f"; missing {few(missing)}" if missing else "")
                               + (f"; unexpected {few(unexpected)}" if unexpected else ""))


def config_name(folder: Path) -> str:
    return repr(json.loads((folder / "config.json").read_text()).get("_class_name"))


def _init_kwargs(cls, config: dict) -> dict:
    """``config`` as ``cls``'s init arguments: a legacy ``flow_map_gate`` read as ``gate_value``, keys the
    class does not take (the reference's ``chunk_partition``, ``init_far_model``...) dropped."""
    config = dict(config)
    if "flow_map_gate" in config:
        config.setdefault("gate_value", config.pop("flow_map_gate"))
    if "full_chunk_limit" in config and not config.get("causal_chunks"):  # diffusers' / the reference's FAR
        config["causal_chunks"] = list(config.get("chunk_partition") or RELEASED_CHUNKS)
    return {k: tuple(v) if k in ("patch_size", "compressed_patch_size") else v
            for k, v in init_kwargs(cls, config).items()}


def load_transformer(folder: str | Path, flow_map: bool = False, gate: float = 0.25,
                     dtype: torch.dtype = torch.float32, causal_chunks: list[int] | None = None) -> torch.nn.Module:
    """A transformer from ``folder`` (a pipeline root with ``transformer/``, or the transformer folder).

    Reads Wan2.1 (``WanTransformer3DModel``), diffusers' and NVIDIA's AnyFlow students
    (``AnyFlowTransformer3DModel``), the reference's ``FAR_Wan_Transformer3DModel`` layout and the project's
    own folders, also those of earlier versions; other kinds are refused naming what was found, and so is a
    folder whose weights do not fit its config (never a silently re-initialised module).
    ``flow_map=True`` returns a two-time model: loaded as is when the folder holds one (causal or not),
    otherwise the single-time weights are wrapped (E_r := copy of E_t). ``causal_chunks`` (non-empty,
    with ``flow_map=True``) returns the causal flow map on those chunks (docs/method.md §6), wrapping a
    bidirectional folder or re-chunking a causal one. ``flow_map=False`` returns the folder's kind.
    """
    folder = Path(folder)
    if (folder / "transformer").is_dir():
        folder = folder / "transformer"
    _require_folder(folder, "transformer")
    verify_recorded(folder)
    config = json.loads((folder / "config.json").read_text())
    cls = {"wan": WanTransformer3DModel, "flow_map": WanFlowMapTransformer3DModel,
           "causal": WanCausalFlowMapTransformer3DModel}[transformer_kind(config, folder)]
    kwargs = _init_kwargs(cls, {k: v for k, v in config.items() if not k.startswith("_")})
    _check_weights(cls, kwargs, folder)
    model = cls.from_pretrained(folder, dtype=dtype, **kwargs, **LOCAL_ONLY)
    if flow_map and not is_flow_map(model):
        model = WanFlowMapTransformer3DModel.from_base(model, gate)
    chunks = [int(c) for c in causal_chunks or []]
    if flow_map and chunks and list(getattr(model.config, "causal_chunks", None) or []) != chunks:
        model = WanCausalFlowMapTransformer3DModel.from_base(model, chunks, gate)
    return model


def load_text_encoder(root: str | Path, dtype: torch.dtype = torch.float32):
    """(tokenizer, text_encoder) from ``root/tokenizer`` and ``root/text_encoder``."""
    root = Path(root)
    tokenizer = AutoTokenizer.from_pretrained(_require_folder(root / "tokenizer", "tokenizer"), **LOCAL_ONLY)
    encoder = UMT5EncoderModel.from_pretrained(_require_folder(root / "text_encoder", "text encoder"),
                                               dtype=dtype, **LOCAL_ONLY).eval()
    return tokenizer, encoder


def text_max_length(root: str | Path, default: int = 512) -> int:
    """Prompt length the model folder was built for (``anyflow.json``), Wan's 512 otherwise."""
    meta = Path(root) / "anyflow.json"
    return json.loads(meta.read_text()).get("text_max_length", default) if meta.is_file() else default


def sample_size(root: str | Path) -> list[int] | None:
    """(frames, height, width) of the videos a tiny model folder was built for (``anyflow.json``), else None."""
    meta = Path(root) / "anyflow.json"
    return json.loads(meta.read_text()).get("sample_size") if meta.is_file() else None


def make_tiny(out_dir: str | Path, tiny, channels: int = 3, seed: int = 0, pixel_space: bool = True,
              sample_size: tuple[int, int, int] | None = None) -> Path:
    """Write a complete tiny model folder in the diffusers layout; returns its path.

    ``tiny`` is a TinyModelConfig. The tokenizer is word-level over the synthetic prompts'
    vocabulary, built locally; the text encoder is a random tiny UMT5; the transformer a random tiny
    Wan DiT working on ``channels`` channels: pixels (identity autoencoder, no ``vae/``) or, with
    ``pixel_space=False``, the latents of a tiny random ``AutoencoderKLWan`` written to ``vae/``.
    ``sample_size``: (frames, height, width) of its data, the pipelines' default video size.
    """
    from anyflow_ray.data.synthetic import COLORS, DIRECTIONS, SHAPES

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(**tiny_transformer_config(tiny, channels))
    transformer.save_pretrained(out / "transformer", safe_serialization=True)

    words = ["a", "moving", *COLORS, *SHAPES, *DIRECTIONS]
    tokenizer = build_word_tokenizer(words, out / "tokenizer")
    encoder = tiny_text_encoder(len(tokenizer), tiny.text_dim, tiny.text_layers, tiny.text_heads, seed=seed)
    encoder.save_pretrained(out / "text_encoder", safe_serialization=True)

    FlowMatchEulerDiscreteScheduler(shift=5.0).save_pretrained(out / "scheduler")
    (out / "anyflow.json").write_text(json.dumps({"text_max_length": tiny.text_max_length,
                                                  "pixel_space": pixel_space, "channels": channels,
                                                  "sample_size": list(sample_size) if sample_size else None}, indent=2))
    if not pixel_space:
        from anyflow_ray.data.encode import make_tiny_vae

        make_tiny_vae(out, z_dim=channels, seed=seed)
    return out
