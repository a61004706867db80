"""Clip datasets stored as Parquet shards.

A dataset is a folder holding ``shard-00000.parquet``, ``shard-00001.parquet``, ... and a
``manifest.json``. Each shard is a Parquet table with one row per clip and exactly these
columns:

===================  ===============  ======================================================
column               Arrow type       meaning
===================  ===============  ======================================================
``video``            list<float32>    the clip, flattened in C order; pixels in [-1, 1] for
                                      raw videos, or a latent for real models
``video_shape``      list<int32>      shape of ``video``, e.g. ``[C, F, H, W]``; the channel
                                      count is not assumed to be 3
``prompt``           string           the text prompt
``prompt_embedding`` list<float32>    the prompt's text-encoder output, flattened in C order
``embedding_shape``  list<int32>      ``[L, D]`` (tokens, embedding width)
``seed``             int64            the seed the clip was made with
===================  ===============  ======================================================

Every row of a dataset has the same ``video_shape`` and ``embedding_shape``, the same
number of values as the product of its shape, and only finite values.

``manifest.json`` records ``num_rows``, ``shards`` (file names in order), ``video_shape``
and ``embedding_shape``. Files are written under a temporary name and renamed, so a reader
never sees half a shard. Readers check every row and raise :class:`ShardError` naming the
shard file, the row index within it and the column when something is off.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

SHARD_SCHEMA = pa.schema(
    [
        pa.field("video", pa.list_(pa.float32())),
        pa.field("video_shape", pa.list_(pa.int32())),
        pa.field("prompt", pa.string()),
        pa.field("prompt_embedding", pa.list_(pa.float32())),
        pa.field("embedding_shape", pa.list_(pa.int32())),
        pa.field("seed", pa.int64()),
    ]
)
# Flattened array column -> the column holding its shape.
ARRAY_COLUMNS = {"video": "video_shape", "prompt_embedding": "embedding_shape"}
SHAPE_RANKS = {"embedding_shape": 2}  # shape columns whose length is fixed
MANIFEST_NAME = "manifest.json"
SHARD_GLOB = "shard-*.parquet"


class ShardError(ValueError):
    """A shard does not follow the schema; the message names file, row and column."""


@dataclass
class ClipBatch:
    """All clips of a dataset, stacked."""

    videos: torch.Tensor  # (N, C, F, H, W) float32 (any video_shape, stacked on dim 0)
    embeddings: torch.Tensor  # (N, L, D) float32
    prompts: list[str]
    seeds: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.prompts)


def shard_name(index: int) -> str:
    """File name of shard number ``index``."""
    return f"shard-{index:05d}.parquet"


# ----------------------------------------------------------------------------- writing


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


def _write_atomically(path: Path, write: Any) -> None:
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
) -> list[Path]:
    """Write N clips as Parquet shards of ``shard_size`` rows plus ``manifest.json``.

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
        _write_atomically(path, lambda temp, table=table: pq.write_table(table, temp))
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
    _write_atomically(root / MANIFEST_NAME, lambda temp: temp.write_text(manifest_text))
    return paths


# ----------------------------------------------------------------------------- reading


def _check_schema(table: pa.Table, shard: str) -> None:
    """The table has exactly the schema's columns, with the schema's types."""
    missing = [name for name in SHARD_SCHEMA.names if name not in table.column_names]
    extra = [name for name in table.column_names if name not in SHARD_SCHEMA.names]
    for problem, columns in (("missing", missing), ("unexpected", extra)):
        if columns:
            raise ShardError(f"{shard}: {problem} columns {columns}; schema: {SHARD_SCHEMA.names}")
    for field in SHARD_SCHEMA:
        actual, expected = table.schema.field(field.name).type, field.type
        # List types may differ in the name of their item field only.
        same_list = pa.types.is_list(actual) and pa.types.is_list(expected)
        if not (actual == expected or same_list and actual.value_type == expected.value_type):
            message = f"column '{field.name}' has type {actual}, expected {expected}"
            raise ShardError(f"{shard}: {message}")


def _first_null_row(column: pa.ChunkedArray) -> int | None:
    """Index of the first null row of a column, or None."""
    nulls = np.asarray(column.is_null().to_numpy(zero_copy_only=False))
    return int(np.argmax(nulls)) if nulls.any() else None


def _row_shapes(
    table: pa.Table, shard: str, column: str, expected: tuple[int, ...] | None
) -> tuple[int, ...]:
    """The one shape every row of ``column`` has; ShardError naming the first odd row."""
    shapes = table.column(column).to_pylist()
    reference = expected if expected is not None else tuple(shapes[0])
    if len(reference) != SHAPE_RANKS.get(column, len(reference)) or not all(
        isinstance(size, int) and size > 0 for size in reference
    ):
        raise ShardError(f"{shard}: row 0: column '{column}' holds an invalid shape {shapes[0]}")
    for row, shape in enumerate(shapes):
        if tuple(shape) != reference:
            message = f"column '{column}' is {shape}, other rows have {list(reference)}"
            raise ShardError(f"{shard}: row {row}: {message}")
    return reference


def _flat_values(table: pa.Table, shard: str, column: str, shape: tuple[int, ...]) -> np.ndarray:
    """(rows, prod(shape)) float32 values of a flattened column, every row checked."""
    values = table.column(column).combine_chunks()
    lengths = pc.list_value_length(values).to_numpy(zero_copy_only=False)
    expected_length = math.prod(shape)
    wrong = np.nonzero(lengths != expected_length)[0]
    if len(wrong):
        row = int(wrong[0])
        raise ShardError(
            f"{shard}: row {row}: column '{column}' has {lengths[row]} values, "
            f"expected {expected_length} = prod({list(shape)})"
        )
    flat = values.flatten()
    if flat.null_count:
        row = int(np.argmax(np.asarray(flat.is_null())) // expected_length)
        raise ShardError(f"{shard}: row {row}: column '{column}' has null values")
    array = flat.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    array = array.reshape(len(values), expected_length)
    finite_rows = np.isfinite(array).all(axis=1)
    if not finite_rows.all():
        row = int(np.argmin(finite_rows))
        raise ShardError(f"{shard}: row {row}: column '{column}' has NaN or infinite values")
    return array


@dataclass
class _ShardContents:
    """Checked contents of one shard."""

    videos: np.ndarray  # (rows, prod(video_shape))
    embeddings: np.ndarray  # (rows, prod(embedding_shape))
    prompts: list[str]
    seeds: np.ndarray  # (rows,) int64
    video_shape: tuple[int, ...]
    embedding_shape: tuple[int, ...]


def _read_shard(path: Path, shapes: dict[str, tuple[int, ...] | None]) -> _ShardContents:
    """Read and check one shard; ``shapes`` maps shape columns to the shape seen so far."""
    shard = str(path)
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        raise ShardError(f"{shard}: not a readable Parquet file ({error})") from error
    _check_schema(table, shard)
    for column in SHARD_SCHEMA.names:
        null_row = _first_null_row(table.column(column))
        if null_row is not None:
            raise ShardError(f"{shard}: row {null_row}: column '{column}' is null")
    if table.num_rows == 0:
        raise ShardError(f"{shard}: has no rows")
    found = {
        shape_column: _row_shapes(table, shard, shape_column, shapes[shape_column])
        for shape_column in ARRAY_COLUMNS.values()
    }
    return _ShardContents(
        videos=_flat_values(table, shard, "video", found["video_shape"]),
        embeddings=_flat_values(table, shard, "prompt_embedding", found["embedding_shape"]),
        prompts=table.column("prompt").to_pylist(),
        seeds=table.column("seed").to_numpy().astype(np.int64),
        video_shape=found["video_shape"],
        embedding_shape=found["embedding_shape"],
    )


def shard_paths(root: str | os.PathLike) -> list[Path]:
    """The shard files of a dataset folder in name order; FileNotFoundError when none."""
    folder = Path(root)
    hint = "run the data command (`anyflow-ray data`) to create the dataset first"
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset folder {folder} does not exist: {hint}")
    paths = sorted(folder.glob(SHARD_GLOB))
    if not paths:
        raise FileNotFoundError(f"dataset folder {folder} holds no {SHARD_GLOB} files: {hint}")
    return paths


def read_shards(root: str | os.PathLike) -> ClipBatch:
    """Read every shard of the dataset at ``root`` (in name order) into one batch.

    Raises FileNotFoundError when the folder is missing or empty and ShardError (a
    ValueError) naming the shard file, row and column when a row breaks the schema.
    """
    shapes: dict[str, tuple[int, ...] | None] = dict.fromkeys(ARRAY_COLUMNS.values())
    contents = []
    for path in shard_paths(root):
        shard = _read_shard(path, shapes)
        shapes = {"video_shape": shard.video_shape, "embedding_shape": shard.embedding_shape}
        contents.append(shard)
    _check_manifest(Path(root), sum(len(shard.prompts) for shard in contents))
    videos = np.concatenate([shard.videos for shard in contents])
    embeddings = np.concatenate([shard.embeddings for shard in contents])
    return ClipBatch(
        videos=torch.from_numpy(videos).reshape(-1, *shapes["video_shape"]),
        embeddings=torch.from_numpy(embeddings).reshape(-1, *shapes["embedding_shape"]),
        prompts=[prompt for shard in contents for prompt in shard.prompts],
        seeds=torch.from_numpy(np.concatenate([shard.seeds for shard in contents])),
    )


def _check_manifest(root: Path, num_rows: int) -> None:
    """When a manifest exists, its row count must match what the shards hold."""
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.exists():
        return
    try:
        expected = json.loads(manifest_path.read_text())["num_rows"]
    except (ValueError, KeyError) as error:
        raise ShardError(f"{manifest_path}: unreadable ({error})") from error
    if expected != num_rows:
        raise ShardError(
            f"{manifest_path}: says {expected} rows but the shards hold {num_rows}; "
            "a shard is missing or extra"
        )
