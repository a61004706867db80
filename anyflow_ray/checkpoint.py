"""Training checkpoints: safetensors only (never pickles), a ``latest`` marker written last.

    <root>/checkpoints/step-000500/
        model_index.json, transformer/, ...   the EMA model as an AnyFlowPipeline folder
        training_state/rank-00000.safetensors  raw trainable weights, optimizer moments, EMA, RNG
        training_state/meta.json               step, scheduler step, world size, versions
    <root>/checkpoints/latest                   "step-000500", written after every rank has saved

A checkpoint with missing files or a file that is not safetensors is refused with a message naming it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

LATEST = "latest"


class CheckpointError(RuntimeError):
    pass


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / "checkpoints" / f"step-{step:06d}"


def rank_file(ckpt: Path, rank: int) -> Path:
    return ckpt / "training_state" / f"rank-{rank:05d}.safetensors"


def save_rank_state(ckpt: Path, rank: int, tensors: dict[str, torch.Tensor]) -> Path:
    path = rank_file(ckpt, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)
    return path


def save_meta(ckpt: Path, meta: dict) -> None:
    path = ckpt / "training_state" / "meta.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(meta, indent=2))


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


def validate_checkpoint(ckpt: Path, world_size: int) -> dict:
    """Check every file a resume needs; returns meta.json. Names the first bad file."""
    meta_path = ckpt / "training_state" / "meta.json"
    if not meta_path.is_file():
        raise CheckpointError(f"checkpoint {ckpt} is missing {meta_path.relative_to(ckpt)}")
    meta = json.loads(meta_path.read_text())
    if not meta.get("resumable", True):
        raise CheckpointError(f"checkpoint {ckpt} holds the EMA model only (written with ZeRO "
                              f"{meta.get('zero_stage')} or bf16, whose optimizer state is not saved yet); "
                              f"start a new run from it instead of resuming")
    if meta.get("world_size") != world_size:
        raise CheckpointError(f"checkpoint {ckpt} was written by {meta.get('world_size')} ranks; this run has "
                              f"{world_size} (resume with learner.num_ranks={meta.get('world_size')}, "
                              f"or distill.num_ranks for Stage 2)")
    for rank in range(world_size):
        _check_safetensors(rank_file(ckpt, rank))
    for weights in (ckpt / "transformer").glob("*") if (ckpt / "transformer").is_dir() else []:
        if weights.suffix == ".bin" or weights.suffix == ".pt":
            raise CheckpointError(f"{weights} is not safetensors; refusing to unpickle it")
    if not any((ckpt / "transformer").glob("*.safetensors")):
        raise CheckpointError(f"checkpoint {ckpt} has no transformer/*.safetensors")
    return meta


def _check_safetensors(path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path} is not a valid safetensors file ({err})") from err


def load_rank_state(ckpt: Path, rank: int) -> dict[str, torch.Tensor]:
    path = rank_file(ckpt, rank)
    _check_safetensors(path)
    return load_file(str(path))


def optimizer_tensors(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """A torch optimizer's per-parameter state as flat tensors ``opt.<i>.<key>``."""
    out = {}
    for i, p in enumerate(params):
        for key, value in optimizer.state.get(p, {}).items():
            out[f"opt.{i}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return out


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
                           tensors: dict[str, torch.Tensor]) -> None:
    for i, p in enumerate(params):
        prefix = f"opt.{i}."
        state = {k[len(prefix):]: v.to(p.device) for k, v in tensors.items() if k.startswith(prefix)}
        if state:
            optimizer.state[p] = state
