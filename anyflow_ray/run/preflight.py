"""Pre-flight: each job's inputs checked before Ray starts or any resource is asked for.

``check(cfg, command)`` reads only small files (configs, Parquet footers, one row of shapes) and raises
``PreflightError`` with one line naming the config key and the path: a model folder that is missing or
lacks what the job loads, a dataset folder without shards, a shard that is not readable Parquet
(truncated) or lacks a schema column, prompt embeddings whose width is not the model's ``text_dim``,
clips whose frames/height/width are not multiples of the model's patch size or whose channels are not
its ``in_channels``. Inputs that live only in ``run.storage`` (not yet staged on this node) are left to
the job, which fetches them.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from anyflow_ray.run.config import ConfigError
from anyflow_ray.run.storage import Storage


class PreflightError(ConfigError):
    """An input of a job is missing or does not fit the model; the message names the key and the path."""


def check(cfg: DictConfig, command: str) -> None:
    """The pre-flight of ``command`` (nothing for commands that make their own inputs)."""
    checks = {"teacher": _training, "pretrain": _training, "distill": _training, "sample": _sample,
              "evaluate": _evaluate, "prepare": _prepare}
    if command in checks:
        checks[command](cfg, command)


def _training(cfg: DictConfig, command: str) -> None:
    starts = {"teacher": [], "pretrain": ["pretrain.init"], "distill": ["distill.init", "distill.teacher"]}[command]
    transformer = model_folder(cfg, "model.base", text=True)
    for key in starts:
        finished_stage(cfg, key)
        model_folder(cfg, key)
    if transformer is not None:
        check_data(cfg, "data.root", Path(cfg.data.root) / "train", transformer)


def _sample(cfg: DictConfig, command: str) -> None:
    """``sample.model`` when set (it replaces ``sample.models``), else every folder of ``sample.models``."""
    if cfg.sample.get("model"):
        _pipeline_folder(cfg, "sample.model", str(cfg.sample.model))
        return
    for path in cfg.sample.get("models") or []:
        _pipeline_folder(cfg, "sample.models", str(path))


def _prepare(cfg: DictConfig, command: str) -> None:
    """Local inputs exist (URIs are listed by the job through pyarrow.fs); the model encodes prompts."""
    if not cfg.prepare.input:
        raise PreflightError("prepare.input is empty: give folders, .mp4 files, .tar shards or .csv/.jsonl "
                             "manifests, e.g. prepare.input=[/data/videos]")
    for path in cfg.prepare.input:
        if "://" not in str(path) and not Path(path).exists():
            raise PreflightError(f"prepare.input: {path}: no such file or folder")
    model_folder(cfg, "model.base", text=True)


def _evaluate(cfg: DictConfig, command: str) -> None:
    _pipeline_folder(cfg, "teacher.output", cfg.teacher.output)
    for key in ("eval.models", "eval.consistency_models"):
        for path in OmegaConf.select(cfg, key):
            _pipeline_folder(cfg, key, str(path))


# -- models -------------------------------------------------------------------------------------
def model_folder(cfg: DictConfig, key: str, text: bool = False) -> dict | None:
    """The transformer config of the model folder ``key`` names (None: left to storage). ``text``: the
    folder must also hold the text encoder and tokenizer (``model.base``)."""
    path = Path(OmegaConf.select(cfg, key))
    if _staged_later(cfg, path):
        return None
    if not path.is_dir():
        raise PreflightError(f"{key}={path}: no such folder{_follows_output_dir(cfg, key, path)}")
    config = path / "transformer" / "config.json"
    if not config.is_file():
        config = path / "config.json"
    if not config.is_file():
        raise PreflightError(f"{key}={path}: no transformer/config.json there (expected a diffusers model folder; "
                             f"`anyflow-ray make-tiny` writes one, or point {key} at Wan2.1-T2V-*-Diffusers)")
    needs = [("text_encoder/config.json", "text encoder"), ("tokenizer", "tokenizer")] if text else []
    for rel, what in needs:
        if not (path / rel).exists():
            raise PreflightError(f"{key}={path}: no {rel} there (the {what} the jobs encode prompts with)")
    try:
        found = json.loads(config.read_text())
    except ValueError as err:
        raise PreflightError(f"{key}={path}: {config} is not valid JSON ({err})") from err
    _model_kind(key, config.parent)
    return found


def finished_stage(cfg: DictConfig, key: str) -> None:
    """A folder ``key`` names that holds a training run (its config.yaml or checkpoints) must hold that
    run's complete export (``export.json`` of its last checkpoint's step, every file there): a run killed
    before its export, or still training, is refused naming the command that completes it."""
    from anyflow_ray.run.records import JOB_SECTIONS, resume_meta
    from anyflow_ray.training.export import MARKER, export_complete

    path = Path(OmegaConf.select(cfg, key))
    if _staged_later(cfg, path) or not ((path / "config.yaml").is_file() or (path / "checkpoints").is_dir()):
        return
    meta = resume_meta(path) or {}
    step = meta.get("step")
    if step is not None and export_complete(path, int(step)):
        return
    if step is None and (path / MARKER).is_file():
        return  # exported, its checkpoints gone (rotated out or removed): the export stands alone
    job = next((j for j in JOB_SECTIONS if Path(str(cfg[j].output)).absolute() == path.absolute()), None)
    if job is None:  # the run's own config names its job
        try:
            job = next(j for j in JOB_SECTIONS if str(OmegaConf.load(path / "config.yaml")[j].output) == str(path))
        except Exception:  # unreadable or foreign: the export command works for any run folder
            job = None
    redo = (f"`anyflow-ray {job} --config <its config>` with that run's values (it trains on from its last "
            f"checkpoint, or only exports it when training is done)" if job else "")
    export = f"`anyflow-ray export {path} --out {path}` (its last checkpoint as it is)"
    where = f"trained to step {step}" if step is not None else "with no checkpoint yet"
    raise PreflightError(f"{key}={path}: holds a {job or 'training'} run {where} whose export is missing or "
                         f"incomplete (no complete {MARKER}: killed before it, or still running): finish it "
                         f"with {redo + ', or ' if redo else ''}{export}")


def _pipeline_folder(cfg: DictConfig, key: str, path: str) -> None:
    folder = Path(path)
    if _staged_later(cfg, folder):
        return
    if not folder.is_dir():
        raise PreflightError(f"{key}={path}: no such folder (expected a pipeline folder: a training "
                             f"job's output, a diffusers AnyFlow or Wan2.1 folder){_follows_output_dir(cfg, key, folder)}")
    from anyflow_ray.training.export import is_model

    if not is_model(folder):
        raise PreflightError(f"{key}={path}: no model_index.json there and no checkpoint (expected a pipeline "
                             f"folder: a training job's output or a diffusers AnyFlow / Wan2.1 folder, or a "
                             f"checkpoint: training_state/meta.json, or a run folder with checkpoints/latest)")
    _model_kind(key, folder / "transformer")


def _model_kind(key: str, transformer: Path) -> None:
    """A pipeline folder's transformer of a kind the project does not load (another model, a FAR model)
    refused before Ray starts, in the loader's words."""
    from anyflow_ray.models.loading import ModelFormatError, transformer_kind

    try:
        transformer_kind(json.loads((transformer / "config.json").read_text()), transformer)
    except (OSError, ValueError) as err:
        if isinstance(err, ModelFormatError):
            raise PreflightError(f"{key}: {err}") from err


def _follows_output_dir(cfg: DictConfig, key: str, path: Path) -> str:
    root = Path(cfg.run.output_dir)
    if path.is_relative_to(root) and not root.is_dir():
        return (f" (it follows run.output_dir={root}, which does not exist: run make-tiny / data / the earlier "
                f"stages with the same run.output_dir, or set {key})")
    return ""


def _staged_later(cfg: DictConfig, path: Path) -> bool:
    """True for a path this node lacks that the job fetches from ``run.storage`` itself."""
    storage = Storage.of(cfg)
    return storage.enabled and not path.exists() and storage.remote_of(path) is not None


# -- data ---------------------------------------------------------------------------------------
def check_data(cfg: DictConfig, key: str, folder: Path, transformer: dict) -> None:
    """Every shard of ``folder`` is readable Parquet with the shard schema; the first row's shapes fit the
    model (``transformer``: its config.json)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from anyflow_ray.data.shards import SHARD_GLOB, SHARD_SCHEMA

    if _staged_later(cfg, folder):
        return
    where = f"{key}={OmegaConf.select(cfg, key)}"
    if not folder.is_dir():
        raise PreflightError(f"{where}: no dataset folder {folder}{_follows_output_dir(cfg, key, folder)} "
                             f"(`anyflow-ray data` writes one, `anyflow-ray prepare` from videos)")
    shards = sorted(folder.glob(SHARD_GLOB))
    if not shards:
        raise PreflightError(f"{where}: {folder} holds no {SHARD_GLOB} files (`anyflow-ray data` writes them)")
    first = None
    for path in shards:
        try:
            shard = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as err:
            raise PreflightError(f"{where}: shard {path} is not a readable Parquet file, truncated or damaged "
                                 f"({err}); write it again or remove it") from err
        missing = [name for name in SHARD_SCHEMA.names if name not in shard.schema_arrow.names]
        if missing:
            raise PreflightError(f"{where}: shard {path} lacks the columns {missing} of the shard schema")
        first = first or shard
    row = first.read_row_group(0, columns=["video_shape", "embedding_shape"]).slice(0, 1).to_pylist()[0]
    _check_shapes(where, folder, row["video_shape"], row["embedding_shape"], transformer, cfg.model.base)


def _check_shapes(where: str, folder: Path, video_shape: list[int], embedding_shape: list[int],
                  transformer: dict, model: str) -> None:
    text_dim = transformer.get("text_dim")
    if text_dim is not None and embedding_shape and embedding_shape[-1] != text_dim:
        raise PreflightError(f"{where}: the prompt embeddings in {folder} are {embedding_shape[-1]} wide, the "
                             f"model model.base={model} reads text_dim={text_dim}: encode the data with this "
                             f"model's text encoder")
    channels = transformer.get("in_channels")
    if channels is not None and len(video_shape) == 4 and video_shape[0] != channels:
        raise PreflightError(f"{where}: the clips in {folder} have {video_shape[0]} channels, the model "
                             f"model.base={model} takes in_channels={channels}")
    patch = list(transformer.get("patch_size") or [])
    dims = list(video_shape[-3:])
    if len(patch) == 3 and len(dims) == 3 and any(d % p for d, p in zip(dims, patch)):
        raise PreflightError(f"{where}: the clips in {folder} are frames x height x width = "
                             f"{' x '.join(map(str, dims))}, not multiples of the patch size {patch} of "
                             f"model.base={model} (set data.frames/height/width to multiples and write the data again)")
