"""Writing clip datasets: ``write_shards`` (rows held in memory: the synthetic generator), and for a writer
that produces shards elsewhere (``anyflow-ray prepare`` through Ray Data) ``prepared_table`` (one
batch's rows) and ``write_manifest`` (once its shards are complete). The format is in ``shards.py``."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from anyflow_ray.data.shards import (MANIFEST_NAME, OPTIONAL_FIELDS, SHARD_GLOB, SHARD_SCHEMA, fs_and_path,
                                     list_shard_files, shard_name)



def _float_array(values: Any, name: str) -> np.ndarray:
    """A float32 numpy copy of a float array or tensor; ValueError naming ``name`` otherwise."""
    if isinstance(values, torch.Tensor):
        if not values.is_floating_point():
            raise ValueError(f"{name} must be a float tensor, got dtype {values.dtype}")
        values = values.detach().cpu().float().numpy()
    array = np.asarray(values)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{name} must hold floats, got dtype {array.dtype}")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        first_bad = tuple(int(i) for i in np.argwhere(~np.isfinite(array))[0])
        raise ValueError(f"{name} has NaN or infinite values (as float32), first at {first_bad}")
    return array


def _validated_inputs(
    videos: Any, prompts: Sequence[str], embeddings: Any, seeds: Sequence[int], shard_size: int
) -> tuple[np.ndarray, np.ndarray, list[str], list[int]]:
    """Check everything ``write_shards`` gets before anything is written."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    video_array = _float_array(videos, "videos")
    embedding_array = _float_array(embeddings, "embeddings")
    if video_array.ndim < 2:
        raise ValueError(f"videos must be (N, ...) with N clips, got shape {video_array.shape}")
    if embedding_array.ndim != 3:
        raise ValueError(f"embeddings must be (N, L, D), got shape {embedding_array.shape}")
    lengths = dict(videos=len(video_array), prompts=len(prompts))
    lengths.update(embeddings=len(embedding_array), seeds=len(seeds))
    if len(set(lengths.values())) != 1:
        raise ValueError(f"inputs have different lengths: {lengths}")
    if lengths["videos"] == 0:
        raise ValueError("nothing to write: videos is empty")
    for name, array in (("videos", video_array), ("embeddings", embedding_array)):
        values_per_shard = min(shard_size, len(array)) * math.prod(array.shape[1:])
        if values_per_shard >= 2**31:
            raise ValueError(
                f"{name}: {values_per_shard} values per shard of {shard_size} rows is more than "
                "a list<float32> column holds (2**31 - 1); use a smaller shard_size"
            )
    if not all(isinstance(prompt, str) for prompt in prompts):
        raise ValueError("prompts must all be strings")
    if not all(isinstance(seed, (int, np.integer)) and -(2**63) <= seed < 2**63 for seed in seeds):
        raise ValueError("seeds must all be integers that fit in int64")
    return video_array, embedding_array, list(prompts), [int(seed) for seed in seeds]


def _shard_table(
    videos: np.ndarray, embeddings: np.ndarray, prompts: list[str], seeds: list[int]
) -> pa.Table:
    """One shard's rows as an Arrow table with ``SHARD_SCHEMA``."""
    rows = len(videos)

    def flat_list(array: np.ndarray) -> pa.ListArray:
        offsets = (np.arange(rows + 1) * math.prod(array.shape[1:])).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(array.reshape(-1)))

    def shape_list(shape: tuple[int, ...]) -> pa.Array:
        return pa.array([list(shape)] * rows, type=pa.list_(pa.int32()))

    columns = [
        flat_list(videos),
        shape_list(videos.shape[1:]),
        pa.array(prompts, type=pa.string()),
        flat_list(embeddings),
        shape_list(embeddings.shape[1:]),
        pa.array(seeds, type=pa.int64()),
    ]
    return pa.Table.from_arrays(columns, schema=SHARD_SCHEMA)


def write_atomically(path: Path, write: Any) -> None:
    """Call ``write(temp_path)`` and rename the result to ``path``; no partial file remains."""
    temp_path = path.with_name(f".{path.name}.tmp")
    try:
        write(temp_path)
        os.replace(temp_path, path)
    finally:
        temp_path.unlink(missing_ok=True)


def write_shards(
    out_dir: str | os.PathLike,
    videos: np.ndarray | torch.Tensor,
    prompts: list[str],
    embeddings: np.ndarray | torch.Tensor,
    seeds: list[int],
    shard_size: int = 256,
    row_group_size: int | None = None,
) -> list[Path]:
    """Write N clips as Parquet shards of ``shard_size`` rows (row groups of ``row_group_size`` rows,
    the unit a data stream reads; default one per shard) plus ``manifest.json``.

    ``videos`` is (N, ...) (usually (N, C, F, H, W)), ``embeddings`` (N, L, D). All inputs
    are validated first; on bad input a ValueError names the problem and nothing is
    written. Shards left in ``out_dir`` by an earlier, larger write are removed. Returns
    the shard paths in order.
    """
    video_array, embedding_array, prompt_list, seed_list = _validated_inputs(
        videos, prompts, embeddings, seeds, shard_size
    )
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, start in enumerate(range(0, len(video_array), shard_size)):
        rows = slice(start, start + shard_size)
        table = _shard_table(
            video_array[rows], embedding_array[rows], prompt_list[rows], seed_list[rows]
        )
        path = root / shard_name(index)
        write_atomically(path, lambda temp, table=table: pq.write_table(table, temp, row_group_size=row_group_size))
        paths.append(path)
    for stale in sorted(set(root.glob(SHARD_GLOB)) - set(paths)):
        stale.unlink()
    manifest = {
        "num_rows": len(video_array),
        "shards": [path.name for path in paths],
        "video_shape": list(video_array.shape[1:]),
        "embedding_shape": list(embedding_array.shape[1:]),
    }
    manifest_text = json.dumps(manifest, indent=2)
    write_atomically(root / MANIFEST_NAME, lambda temp: temp.write_text(manifest_text))
    return paths


def write_manifest(root: str | os.PathLike, filesystem: Any = None) -> dict:
    """(Re)write ``manifest.json`` from the shard files' metadata (no row is read): what a writer that
    does not hold the rows itself (``anyflow-ray prepare``) calls once its shards are complete.
    ``root`` is a local folder, or a path in the ``pyarrow.fs`` ``filesystem``."""
    fs, base = fs_and_path(root, filesystem)
    paths = list_shard_files(base, fs)
    if not paths:
        raise FileNotFoundError(f"{base}: no {SHARD_GLOB} files to list in a manifest")
    schema = pq.read_schema(paths[0], filesystem=fs)
    shapes = pq.read_table(paths[0], columns=["video_shape", "embedding_shape"], filesystem=fs)
    manifest = {
        "num_rows": sum(pq.read_metadata(path, filesystem=fs).num_rows for path in paths),
        "shards": [path.rsplit("/", 1)[1] for path in paths],
        "video_shape": shapes.column("video_shape")[0].as_py(),
        "embedding_shape": shapes.column("embedding_shape")[0].as_py(),
        "columns": schema.names,
    }
    temp = f"{base}/.{MANIFEST_NAME}.tmp"
    with fs.open_output_stream(temp) as stream:
        stream.write(json.dumps(manifest, indent=2).encode())
    fs.move(temp, f"{base}/{MANIFEST_NAME}")
    return manifest


def prepared_table(
    latents: np.ndarray,
    embeddings: np.ndarray,
    prompts: list[str],
    keys: list[str],
    sources: list[str],
    seeds: list[int],
    frames: int,
    fps: float,
    height: int,
    width: int,
) -> pa.Table:
    """Rows of prepared real clips: the shard schema plus the optional source columns."""
    video_array, embedding_array, prompt_list, seed_list = _validated_inputs(
        latents, prompts, embeddings, seeds, shard_size=max(1, len(prompts))
    )
    table = _shard_table(video_array, embedding_array, prompt_list, seed_list)
    rows = len(prompt_list)
    extra = {
        "key": pa.array(keys, type=pa.string()),
        "source": pa.array(sources, type=pa.string()),
        "frames": pa.array([frames] * rows, type=pa.int32()),
        "fps": pa.array([fps] * rows, type=pa.float32()),
        "height": pa.array([height] * rows, type=pa.int32()),
        "width": pa.array([width] * rows, type=pa.int32()),
    }
    for field in OPTIONAL_FIELDS:
        table = table.append_column(field, extra[field.name])
    return table
