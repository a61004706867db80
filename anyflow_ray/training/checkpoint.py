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
(your own run's output).

Integrity: meta.json's ``files`` holds every file's size and SHA-256 (each rank hashes and fsyncs the files
it wrote, ``writer_rank``), and ``latest`` moves only after meta.json and the folder are fsynced. A resume
verifies them (``damage``, each rank its own files) and, when the checkpoint ``latest`` names is damaged
or gone, falls back to the newest intact one (``resume_candidates``), moving the damaged folder aside to
``step-XXXXXX.damaged`` and naming both in a warning; a missing ``latest`` resumes from the newest intact
step folder the same way, never silently from step 0. Checkpoints without hashes (older format 3) are
checked by size.
"""

from __future__ import annotations

import hashlib
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


def sha256_of(path: Path, chunk: int = 8 << 20) -> str:
    """The SHA-256 of a file, read in 8 MiB chunks (OpenSSL's, about 1-2 GB/s per core with SHA-NI)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fsync_path(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to the device; a no-op where the OS refuses it on folders."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_record(path: Path) -> dict:
    """``{"bytes", "sha256"}`` of a file, fsynced first: what a manifest holds of it."""
    fsync_path(path)
    return {"bytes": path.stat().st_size, "sha256": sha256_of(path)}


def manifest(ckpt: Path, rank: int | None = None) -> dict[str, dict]:
    """Every file under ``training_state/`` but meta.json (only those ``rank`` writes, ``writer_rank``,
    when given): its size and SHA-256, checked on resume. Each file is fsynced before it is hashed."""
    root = state_dir(ckpt)
    return {str(p.relative_to(root)): file_record(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "meta.json" and p.suffix != ".tmp"
            and (rank is None or writer_rank(p.name) == rank)}


def save_meta(ckpt: Path, meta: dict) -> None:
    path = state_dir(ckpt) / "meta.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    fsync_path(tmp)
    os.replace(tmp, path)
    for folder in {p.parent for p in state_dir(ckpt).rglob("*")} | {ckpt}:  # the files' names are durable too
        fsync_path(folder)


def write_latest(root: str | Path, ckpt: Path) -> None:
    """Point ``latest`` at ``ckpt`` atomically; call only once every rank's files and meta.json are on
    disk (``save_meta`` fsyncs them), so ``latest`` never names a checkpoint a power cut could tear."""
    marker = Path(root) / "checkpoints" / LATEST
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(ckpt.name + "\n")
    fsync_path(tmp)
    os.replace(tmp, marker)
    fsync_path(marker.parent)


def find_latest(root: str | Path) -> Path | None:
    marker = Path(root) / "checkpoints" / LATEST
    if not marker.is_file():
        return None
    ckpt = marker.parent / marker.read_text().strip()
    if not ckpt.is_dir():
        raise CheckpointError(f"{marker} points at {ckpt}, which does not exist")
    return ckpt


def step_folders(root: str | Path) -> list[Path]:
    """The ``step-XXXXXX`` folders of a run, newest first."""
    folder = Path(root) / "checkpoints"
    found = [(s, p) for p in folder.iterdir() if (s := _step_of(p)) is not None] if folder.is_dir() else []
    return [p for _, p in sorted(found, reverse=True)]


def resume_candidates(root: str | Path, listed: list[str] | None = None) -> tuple[list[Path], str | None]:
    """The checkpoints a resume tries, in order, and why the first is not the one ``latest`` names (None
    when it is): the one ``latest`` names, then older step folders, newest first. Folders newer than
    ``latest`` are a killed save's leftovers and never tried. Without ``latest``: every step folder, newest
    first. ``listed``: the step folders' names where this node does not hold them (``run.storage``); a
    local folder without meta.json (a killed save) is left out."""
    checkpoints = Path(root) / "checkpoints"
    marker = checkpoints / LATEST
    named = marker.read_text().strip() if marker.is_file() else None
    if listed is None:
        folders = [p for p in step_folders(root) if (state_dir(p) / "meta.json").is_file() or p.name == named]
    else:
        folders = sorted((checkpoints / n for n in listed if _step_of_name(n) is not None), key=_step_key, reverse=True)
    if named is None:
        return folders, (f"{marker} is missing" if folders else None)
    newest = _step_of_name(named)
    if named not in {p.name for p in folders}:
        older = [p for p in folders if newest is None or _step_key(p) < newest]
        return older, (f"{marker} names {named}, which does not exist" if older else None)
    return [p for p in folders if _step_key(p) <= newest], None


def choose_resume(root: str | Path, world_size: int | None, rank: int | None = None, agree=None,
                  fetch=None, listed: list[str] | None = None) -> tuple[Path | None, dict | None, list[Path], str | None]:
    """The newest intact checkpoint of ``root``: (its folder, its meta.json, the damaged ones newer than it,
    a warning naming what was skipped and what is resumed; None when ``latest`` was intact). (None, None,
    [], None): nothing to resume. Every rank checks the files it wrote (``rank``; all files when None) and
    ``agree`` (an all-gather of each rank's problem or None, the same calls on every rank) makes the ranks
    choose alike. ``fetch(ckpt)`` brings a candidate to this node first (``run.storage``). A checkpoint
    this run cannot resume however intact (format, ranks) is refused, not skipped; so is a run whose every
    checkpoint is damaged."""
    agree = agree or (lambda problem: [problem])
    candidates, why = resume_candidates(root, listed)
    skipped: list[tuple[Path, str]] = []
    for ckpt in candidates:
        meta, problem = None, None
        try:
            if fetch is not None:
                fetch(ckpt)
            meta = read_meta(ckpt)
            problem = damage(ckpt, meta, rank)
        except (CheckpointError, OSError) as err:
            problem = str(err)
        problems = [p for p in agree(problem) if p]
        if problems:
            skipped.append((ckpt, problems[0]))
            continue
        check_compatible(ckpt, meta, world_size)
        if not skipped and why is None:
            return ckpt, meta, [], None
        what = "; ".join([*([why] if why else []), *(f"{c.name} is damaged ({p})" for c, p in skipped)])
        return ckpt, meta, [c for c, _ in skipped], (f"{what}: resuming from {ckpt.name}, the newest intact "
                                                     f"checkpoint" + (" (damaged folders are kept as "
                                                                      "<name>.damaged)" if skipped else ""))
    if skipped:
        raise CheckpointError(f"no intact checkpoint in {Path(root) / 'checkpoints'}: "
                              + "; ".join(f"{c.name}: {p}" for c, p in skipped)
                              + ". Restore those files, or move the folder aside to train from step 0")
    return None, None, [], None


def settle_resume(root: str | Path, chosen: Path, damaged: list[Path]) -> list[Path]:
    """After ``choose_resume`` fell back (one process, rank 0): the damaged folders set aside and ``latest``
    naming the checkpoint resumed, so the steps after it are saved into clean folders. Returns where the
    damaged ones went."""
    moved = [set_aside(ckpt) for ckpt in damaged if ckpt.is_dir()]
    write_latest(root, chosen)
    return moved


def set_aside(ckpt: Path) -> Path:
    """Move a damaged checkpoint out of the way (kept for inspection, never resumed or rotated): the
    step is trained and saved again into a clean folder."""
    target = ckpt.with_name(f"{ckpt.name}.damaged")
    n = 1
    while target.exists():
        n += 1
        target = ckpt.with_name(f"{ckpt.name}.damaged-{n}")
    ckpt.rename(target)
    return target


def _step_of(path: Path) -> int | None:
    return _step_of_name(path.name) if path.is_dir() else None


def _step_of_name(name: str) -> int | None:
    return int(name[5:]) if name.startswith("step-") and name[5:].isdigit() else None


def _step_key(path: Path) -> int:
    return _step_of_name(path.name)


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


def check_compatible(ckpt: Path, meta: dict, world_size: int | None) -> None:
    """Refuse a checkpoint this run cannot resume however intact it is (format; number of ranks unless None)."""
    if meta.get("format") not in RESUMED_FORMATS:
        raise CheckpointError(f"checkpoint {ckpt} has format {meta.get('format', 1)}; this version resumes "
                              f"formats {RESUMED_FORMATS} (DeepSpeed engine checkpoints) only: start a new run "
                              f"from its exported model instead")
    if world_size is not None and meta.get("world_size") != world_size:
        raise CheckpointError(f"checkpoint {ckpt} was written by {meta.get('world_size')} ranks; this run has "
                              f"{world_size} (resume with learner.num_ranks={meta.get('world_size')}, "
                              f"or distill.num_ranks for Stage 2)")


def damage(ckpt: Path, meta: dict, rank: int | None = None) -> str | None:
    """What is wrong with the files of ``ckpt`` (those ``rank`` wrote, when given; all otherwise): the first
    missing, truncated, overwritten (SHA-256) or malformed file, as a message naming it; None when intact."""
    files = dict(meta.get("files", {}))
    for r in range(int(meta.get("world_size", 1))):
        files.setdefault(str(rank_file(ckpt, r).relative_to(state_dir(ckpt))), None)
    for rel, record in sorted(files.items()):
        if rank is not None and writer_rank(Path(rel).name) != rank:
            continue
        path = state_dir(ckpt) / rel
        size, digest = (record.get("bytes"), record.get("sha256")) if isinstance(record, dict) else (record, None)
        try:
            if not path.is_file():
                raise CheckpointError(f"checkpoint file missing: {path}")
            if path.suffix == ".safetensors":
                _check_safetensors(path)
            elif path.suffix == ".pt":
                _check_torch_zip(path)
            if size is not None and path.stat().st_size != size:
                raise CheckpointError(f"{path} has {path.stat().st_size} bytes, {size} were written "
                                      f"(truncated or overwritten)")
            if digest is not None and sha256_of(path) != digest:
                raise CheckpointError(f"{path} does not match the SHA-256 its manifest recorded (overwritten "
                                      f"or bit-rotted since it was saved)")
        except CheckpointError as err:
            return str(err)
    if meta.get("format") == 2 and rank in (None, 0):  # the exported pipeline each checkpoint carried
        try:
            _check_exported(ckpt)
        except CheckpointError as err:
            return str(err)
    return None


def validate_checkpoint(ckpt: Path, world_size: int) -> dict:
    """Check every file a resume needs (sizes, SHA-256, formats); returns meta.json. Names the first bad file."""
    meta = read_meta(ckpt)
    check_compatible(ckpt, meta, world_size)
    problem = damage(ckpt, meta)
    if problem:
        raise CheckpointError(problem)
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
