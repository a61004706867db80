"""Training checkpoints: DeepSpeed's own engine checkpoints plus our state, a ``latest`` marker written last.

    <root>/checkpoints/step-000500/
        training_state/meta.json                format, step, job, world size, ZeRO stage, dtype, weight
                                                version, the driver's state (e.g. buffer statistics), the
                                                run's resolved config, file manifest
        training_state/rank-00000.safetensors   per rank: torch RNG state; EMA shadow tensors of the trainable
                                                parameters (rank 0's file, or every rank's under ZeRO-3)
        training_state/<engine>/                engine.save_checkpoint(training_state, tag=<engine>,
                                                exclude_frozen_parameters=True): model (teacher, Stage 1) |
                                                student, critic (Stage 2); e.g. mp_rank_00_model_states.pt,
                                                zero_pp_rank_0_mp_rank_00_optim_states.pt
    <root>/checkpoints/latest                   "step-000500", written after every rank has saved

Only the trainable state is saved (format 3): frozen weights (the base under LoRA, the teacher) are read
again from the folders the config names, and no pipeline is exported per checkpoint. The model of a
checkpoint is rebuilt by ``training.export`` (``anyflow-ray export``, ``sample``/``evaluate`` given a
checkpoint); a stage exports its pipeline once, at its end. Format 2 checkpoints (with an exported
pipeline inside) still resume.

After ``latest`` moves, the newest ``run.keep_checkpoints`` step folders up to it are kept and older ones
deleted. The data position is a pure function of the step (``anyflow_ray.training.objectives``), so the step is
all a resume needs of it.

Trust: the exported model is safetensors, but DeepSpeed's engine files are torch pickles. The learner
reads them with torch's weights-only unpickler and an allow-list of the few DeepSpeed types they hold
(``learners/worker.py``), the least trust DeepSpeed allows; even so, resume only from a folder you trust
(your own run's output). A checkpoint with a missing, truncated or malformed file is refused with a
message naming the file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

LATEST = "latest"
FORMAT = 3  # 2: format 3 plus the EMA model exported as a pipeline in every checkpoint (still resumed);
# 1: our own safetensors of parameters and optimizer moments (fp32 ZeRO-0 only)
RESUMED_FORMATS = (2, 3)


class CheckpointError(RuntimeError):
    pass


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / "checkpoints" / f"step-{step:06d}"


def state_dir(ckpt: Path) -> Path:
    return ckpt / "training_state"


def rank_file(ckpt: Path, rank: int) -> Path:
    return state_dir(ckpt) / f"rank-{rank:05d}.safetensors"


def save_rank_state(ckpt: Path, rank: int, tensors: dict[str, torch.Tensor]) -> Path:
    path = rank_file(ckpt, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)
    return path


def manifest(ckpt: Path) -> dict[str, int]:
    """Every file under ``training_state/`` but meta.json, with its size (checked on resume)."""
    root = state_dir(ckpt)
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "meta.json"}


def save_meta(ckpt: Path, meta: dict) -> None:
    path = state_dir(ckpt) / "meta.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, path)


def write_latest(root: str | Path, ckpt: Path) -> None:
    """Point ``latest`` at ``ckpt`` atomically; call only once every rank's files are on disk."""
    marker = Path(root) / "checkpoints" / LATEST
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(ckpt.name + "\n")
    os.replace(tmp, marker)


def find_latest(root: str | Path) -> Path | None:
    marker = Path(root) / "checkpoints" / LATEST
    if not marker.is_file():
        return None
    ckpt = marker.parent / marker.read_text().strip()
    if not ckpt.is_dir():
        raise CheckpointError(f"{marker} points at {ckpt}, which does not exist")
    return ckpt


def _step_of(path: Path) -> int | None:
    name = path.name
    if not (path.is_dir() and name.startswith("step-") and name[5:].isdigit()):
        return None
    return int(name[5:])


_RANK_OWNED = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_|rank-0*(\d+)\.")


def writer_rank(filename: str) -> int:
    """Which learner rank writes a checkpoint file: a rank's ZeRO partitions (DeepSpeed's
    ``zero_pp_rank_<r>_mp_rank_00_optim_states.pt``, ``bf16_zero_pp_rank_<r>_...`` in bf16 and
    ``zero_pp_rank_<r>_mp_rank_00_model_states.pt`` at ZeRO-3) and its ``rank-<r>.safetensors`` are its
    own; everything else (``mp_rank_00_model_states.pt``, the exported pipeline, meta.json) is rank 0's.
    Each file has one writer, so uploads to storage never race."""
    match = _RANK_OWNED.match(filename)
    return int(match.group(1) or match.group(2)) if match else 0


def clear_unfinished(root: str | Path, ckpt: Path) -> None:
    """Remove ``ckpt`` before saving into it when it is a leftover of a killed run (``latest`` never
    pointed at it), so no stale file of that run ends up in the new checkpoint's manifest."""
    marker = Path(root) / "checkpoints" / LATEST
    current = marker.read_text().strip() if marker.is_file() else None
    if ckpt.is_dir() and ckpt.name != current:
        shutil.rmtree(ckpt)


def rotate(root: str | Path, keep: int) -> list[Path]:
    """Keep the newest ``keep`` step folders up to the one ``latest`` names; delete older ones. Folders
    newer than ``latest`` (leftovers of a killed run) are left alone. Returns what was deleted."""
    latest = find_latest(root)
    if latest is None:
        return []
    newest = _step_of(latest)
    steps = sorted((s, p) for p in (Path(root) / "checkpoints").iterdir()
                   if (s := _step_of(p)) is not None and s <= newest)
    doomed = [p for _, p in steps[:-keep]] if keep < len(steps) else []
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def read_meta(ckpt: Path) -> dict:
    meta_path = state_dir(ckpt) / "meta.json"
    if not meta_path.is_file():
        raise CheckpointError(f"checkpoint {ckpt} is missing {meta_path.relative_to(ckpt)}")
    try:
        return json.loads(meta_path.read_text())
    except ValueError as err:
        raise CheckpointError(f"{meta_path} is not valid JSON ({err})") from err


def validate_checkpoint(ckpt: Path, world_size: int) -> dict:
    """Check every file a resume needs; returns meta.json. Names the first bad file."""
    meta = read_meta(ckpt)
    if meta.get("format") not in RESUMED_FORMATS:
        raise CheckpointError(f"checkpoint {ckpt} has format {meta.get('format', 1)}; this version resumes "
                              f"formats {RESUMED_FORMATS} (DeepSpeed engine checkpoints) only: start a new run "
                              f"from its exported model instead")
    if meta.get("world_size") != world_size:
        raise CheckpointError(f"checkpoint {ckpt} was written by {meta.get('world_size')} ranks; this run has "
                              f"{world_size} (resume with learner.num_ranks={meta.get('world_size')}, "
                              f"or distill.num_ranks for Stage 2)")
    files = dict(meta.get("files", {}))
    for rank in range(world_size):
        files.setdefault(str(rank_file(ckpt, rank).relative_to(state_dir(ckpt))), None)
    for rel, size in files.items():
        path = state_dir(ckpt) / rel
        if not path.is_file():
            raise CheckpointError(f"checkpoint file missing: {path}")
        if path.suffix == ".safetensors":
            _check_safetensors(path)
        elif path.suffix == ".pt":
            _check_torch_zip(path)
        if size is not None and path.stat().st_size != size:
            raise CheckpointError(f"{path} has {path.stat().st_size} bytes, {size} were written "
                                  f"(truncated or overwritten)")
    if meta["format"] == 2:  # the exported pipeline each checkpoint carried
        _check_exported(ckpt)
    return meta


def _check_exported(ckpt: Path) -> None:
    transformer = ckpt / "transformer"
    for weights in transformer.glob("*") if transformer.is_dir() else []:
        if weights.suffix in (".bin", ".pt"):
            raise CheckpointError(f"{weights} is not safetensors; refusing to unpickle it")
    if not any(transformer.glob("*.safetensors")):
        raise CheckpointError(f"checkpoint {ckpt} has no transformer/*.safetensors")


def _check_safetensors(path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path} is not a valid safetensors file ({err})") from err


def _check_torch_zip(path: Path) -> None:
    """torch.save's zip container (DeepSpeed's format): a readable central directory with a data.pkl."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"{path} is not a valid torch checkpoint (zip) file ({err})") from err
    if not any(name.endswith("data.pkl") for name in names):
        raise CheckpointError(f"{path} is not a valid torch checkpoint (zip) file (no data.pkl)")


def load_rank_state(ckpt: Path, rank: int) -> dict[str, torch.Tensor]:
    path = rank_file(ckpt, rank)
    _check_safetensors(path)
    return load_file(str(path))
