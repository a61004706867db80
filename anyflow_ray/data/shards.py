"""Clip datasets stored as Parquet shards.

Writing is in ``shard_writer.py``. A dataset is a folder holding ``shard-00000.parquet``, ``shard-00001.parquet``, ... and a
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

Shards made from real videos by ``anyflow-ray prepare`` also hold these columns (optional:
readers accept them and the synthetic data set leaves them out):

===================  ===============  ======================================================
``key``              string           the clip's key in its source (file stem, tar member)
``source``           string           the file (or ``shard.tar#key``) the clip came from
``frames``           int32            pixel frames encoded (``data.frames``)
``fps``              float32          frame rate they were sampled at (``data.fps``)
``height``/``width`` int32            pixel size after resize and centre crop
===================  ===============  ======================================================

Their ``video`` holds normalised Wan latents ``(C, F', H', W')`` and ``seed`` a stable hash of
``key``. Their file names are ``shard-<run>-<task>.parquet`` (one name per ``prepare`` run and
write task, so a later run adds files without touching the earlier ones).

Every row of a dataset has the same ``video_shape`` and ``embedding_shape``, the same
number of values as the product of its shape, and only finite values.

``manifest.json`` records ``num_rows``, ``shards`` (file names in order), ``video_shape``
and ``embedding_shape``. Files are written under a temporary name and renamed, so a reader
never sees half a shard. Readers check every row and raise :class:`ShardError` naming the
shard file, the row index within it and the column when something is off.

``read_shards`` holds what it reads (``rank, world_size``: one rank's part; ``columns=``: e.g. the
embeddings only); training at scale streams its rows in bounded memory instead (``stream.py``).
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
# Columns that prepared (real-video) shards add; readers accept them when present.
OPTIONAL_FIELDS = pa.schema(
    [
        pa.field("key", pa.string()),
        pa.field("source", pa.string()),
        pa.field("frames", pa.int32()),
        pa.field("fps", pa.float32()),
        pa.field("height", pa.int32()),
        pa.field("width", pa.int32()),
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
    """The clips of a dataset (or of one rank's part of it), stacked."""

    videos: torch.Tensor  # (N, C, F, H, W) float32; (N, 0) when the video column was not read
    embeddings: torch.Tensor  # (N, L, D) float32
    prompts: list[str]
    seeds: torch.Tensor  # (N,) int64
    video_shape: tuple[int, ...] = ()  # one clip's shape, known even when videos were not read
    part: tuple[int, int] = (0, 1)  # (rank, world_size): which part of the dataset this is

    def __post_init__(self) -> None:
        if not self.video_shape and self.videos.ndim > 1:
            self.video_shape = tuple(self.videos.shape[1:])

    def __len__(self) -> int:
        return len(self.prompts)


def shard_name(index: int) -> str:
    """File name of shard number ``index``."""
    return f"shard-{index:05d}.parquet"


# ----------------------------------------------------------------------------- reading


def check_schema(schema: pa.Schema, shard: str, required: Sequence[str] | None = None) -> None:
    """A shard's schema has the ``required`` schema columns (default all), no others but the
    optional ones, with the schema's types."""
    required = SHARD_SCHEMA.names if required is None else list(required)
    missing = [name for name in required if name not in schema.names]
    known = SHARD_SCHEMA.names + OPTIONAL_FIELDS.names
    extra = [name for name in schema.names if name not in known]
    for problem, columns in (("missing", missing), ("unexpected", extra)):
        if columns:
            raise ShardError(f"{shard}: {problem} columns {columns}; schema: {SHARD_SCHEMA.names} "
                             f"(optional: {OPTIONAL_FIELDS.names})")
    optional = [field for field in OPTIONAL_FIELDS if field.name in schema.names]
    for field in [*(SHARD_SCHEMA.field(name) for name in required), *optional]:
        actual, expected = schema.field(field.name).type, field.type
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
class ShardContents:
    """Checked contents of one shard."""

    videos: np.ndarray  # (rows, prod(video_shape))
    embeddings: np.ndarray  # (rows, prod(embedding_shape))
    prompts: list[str]
    seeds: np.ndarray  # (rows,) int64
    video_shape: tuple[int, ...]
    embedding_shape: tuple[int, ...]


# Columns every read includes: small, and what the shapes and the row checks need.
_ALWAYS_READ = ("video_shape", "prompt", "embedding_shape", "seed")


def read_columns(columns: Sequence[str] | None) -> list[str]:
    """The schema columns a read needs for ``columns`` (None: all of them), in schema order."""
    if columns is None:
        return list(SHARD_SCHEMA.names)
    unknown = sorted(set(columns) - set(SHARD_SCHEMA.names))
    if unknown:
        raise ValueError(f"columns {unknown} are not in the shard schema {SHARD_SCHEMA.names}")
    wanted = set(columns) | set(_ALWAYS_READ)
    return [name for name in SHARD_SCHEMA.names if name in wanted]


def _read_shard(
    path: Path,
    shapes: dict[str, tuple[int, ...] | None],
    columns: list[str] | None = None,
    rows: np.ndarray | None = None,
) -> ShardContents:
    """Read and check one shard; ``shapes`` maps shape columns to the shape seen so far.

    ``columns``: the schema columns to read (default all); a column left out comes back empty
    (zero values per row). ``rows``: indices of the rows to keep (default all).
    """
    shard = str(path)
    columns = columns or list(SHARD_SCHEMA.names)
    try:
        file = pq.ParquetFile(path)
        check_schema(file.schema_arrow, shard, required=columns)
        table = file.read(columns=columns)
    except (pa.ArrowException, OSError) as error:
        raise ShardError(f"{shard}: not a readable Parquet file ({error})") from error
    return checked_contents(table, shard, shapes, columns, rows)


def checked_contents(
    table: pa.Table,
    shard: str,
    shapes: dict[str, tuple[int, ...] | None],
    columns: list[str],
    rows: np.ndarray | None = None,
) -> ShardContents:
    """The checked contents of ``table`` (a shard, or a row group of one, named ``shard`` in errors)."""
    if table.num_rows == 0:
        raise ShardError(f"{shard}: has no rows")
    for column in columns:
        null_row = _first_null_row(table.column(column))
        if null_row is not None:
            raise ShardError(f"{shard}: row {null_row}: column '{column}' is null")
    found = {
        shape_column: _row_shapes(table, shard, shape_column, shapes[shape_column])
        for shape_column in ARRAY_COLUMNS.values()
    }
    if rows is not None:
        table = table.take(pa.array(rows, type=pa.int64()))

    def values(column: str) -> np.ndarray:
        if column not in columns:
            return np.zeros((table.num_rows, 0), dtype=np.float32)
        return _flat_values(table, shard, column, found[ARRAY_COLUMNS[column]])

    return ShardContents(
        videos=values("video"),
        embeddings=values("prompt_embedding"),
        prompts=table.column("prompt").to_pylist(),
        seeds=table.column("seed").to_numpy().astype(np.int64),
        video_shape=found["video_shape"],
        embedding_shape=found["embedding_shape"],
    )


def shard_paths(root: str | os.PathLike) -> list[Path]:
    """The shard files of a dataset folder in name order; FileNotFoundError when none."""
    folder = Path(root)
    hint = "run the data command (`anyflow-ray data`, or `anyflow-ray prepare` for videos) to create the dataset first"
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset folder {folder} does not exist: {hint}")
    paths = sorted(folder.glob(SHARD_GLOB))
    if not paths:
        raise FileNotFoundError(f"dataset folder {folder} holds no {SHARD_GLOB} files: {hint}")
    return paths


def rank_part(paths: list[Path], rank: int, world_size: int) -> list[tuple[Path, np.ndarray | None]]:
    """The (shard, rows or None for all) that rank ``rank`` of ``world_size`` reads.

    Whole shards ``i % world_size == rank`` when there are at least as many shards as ranks (each
    rank opens only its own files); otherwise every rank opens the few shards there are and keeps
    the rows ``j % world_size == rank`` of their concatenation. The parts are disjoint and their
    union is the dataset; their sizes differ by up to one shard (or one row).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a group of {world_size}")
    if len(paths) >= world_size:
        return [(path, None) for path in paths[rank::world_size]]
    counts = [pq.read_metadata(path).num_rows for path in paths]
    if sum(counts) < world_size:
        raise ShardError(f"{paths[0].parent}: {sum(counts)} rows cannot be split over {world_size} ranks")
    offsets = np.cumsum([0, *counts])
    part = []
    for path, start, count in zip(paths, offsets, counts):
        local = np.arange(count)
        part.append((path, local[(start + local) % world_size == rank]))
    return [(path, rows) for path, rows in part if len(rows)]


def read_shards(
    root: str | os.PathLike,
    rank: int = 0,
    world_size: int = 1,
    columns: Sequence[str] | None = None,
) -> ClipBatch:
    """Read the dataset at ``root`` (in shard name order) into one batch; with ``world_size > 1``
    only rank ``rank``'s part of it (``rank_part``), and with ``columns`` only those array columns
    (e.g. ``["prompt_embedding"]``: ``videos`` is then (N, 0) and ``video_shape`` still set).

    Raises FileNotFoundError when the folder is missing or empty and ShardError (a
    ValueError) naming the shard file, row and column when a row breaks the schema.
    """
    read = read_columns(columns)
    shapes: dict[str, tuple[int, ...] | None] = dict.fromkeys(ARRAY_COLUMNS.values())
    contents = []
    paths = shard_paths(root)
    for path, rows in rank_part(paths, rank, world_size):
        shard = _read_shard(path, shapes, read, rows)
        shapes = {"video_shape": shard.video_shape, "embedding_shape": shard.embedding_shape}
        contents.append(shard)
    if world_size == 1:
        _check_manifest(Path(root), sum(len(shard.prompts) for shard in contents))
    else:
        _check_manifest_names(Path(root), [path.name for path in paths])
    videos = np.concatenate([shard.videos for shard in contents])
    embeddings = np.concatenate([shard.embeddings for shard in contents])
    video_shape = shapes["video_shape"] if "video" in read else (0,)
    embedding_shape = shapes["embedding_shape"] if "prompt_embedding" in read else (0, 0)
    rows = len(seeds := np.concatenate([shard.seeds for shard in contents]))
    return ClipBatch(
        videos=torch.from_numpy(videos).reshape(rows, *video_shape),
        embeddings=torch.from_numpy(embeddings).reshape(rows, *embedding_shape),
        prompts=[prompt for shard in contents for prompt in shard.prompts],
        seeds=torch.from_numpy(seeds),
        video_shape=tuple(shapes["video_shape"]),
        part=(rank, world_size),
    )


def _manifest(root: Path) -> dict | None:
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.exists():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        manifest["num_rows"]
    except (ValueError, KeyError) as error:
        raise ShardError(f"{manifest_path}: unreadable ({error})") from error
    return manifest


def _check_manifest(root: Path, num_rows: int) -> None:
    """When a manifest exists, its row count must match what the shards hold."""
    manifest = _manifest(root)
    if manifest is not None and manifest["num_rows"] != num_rows:
        raise ShardError(
            f"{root / MANIFEST_NAME}: says {manifest['num_rows']} rows but the shards hold {num_rows}; "
            "a shard is missing or extra"
        )


def _check_manifest_names(root: Path, names: list[str]) -> None:
    """A rank that reads part of the dataset checks the shard names (not the rows of all of them)."""
    manifest = _manifest(root)
    if manifest is not None and "shards" in manifest and sorted(manifest["shards"]) != names:
        missing = sorted(set(manifest["shards"]) - set(names))
        extra = sorted(set(names) - set(manifest["shards"]))
        raise ShardError(f"{root / MANIFEST_NAME}: lists other shards than the folder holds "
                         f"(missing {missing}, extra {extra})")


def fs_and_path(root: str | os.PathLike, filesystem: Any = None) -> tuple[Any, str]:
    import pyarrow.fs as pafs

    if filesystem is not None:
        return filesystem, str(root)
    return pafs.LocalFileSystem(), str(Path(root).absolute())


def list_shard_files(root: str | os.PathLike, filesystem: Any = None) -> list[str]:
    """Paths of the ``shard-*.parquet`` files in ``root`` (a local folder, or a path in ``filesystem``),
    in name order; [] when the folder does not exist."""
    import pyarrow.fs as pafs

    fs, base = fs_and_path(root, filesystem)
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=False))
    names = sorted(info.base_name for info in infos if info.type == pafs.FileType.File)
    return [f"{base}/{name}" for name in names if Path(name).match(SHARD_GLOB)]
