"""Clip datasets stored as Parquet shards: listing, a rank's part, reading it whole (``read_shards``).

Writing is in ``shard_writer.py``, the on-disk formats and the row checks in ``shard_format.py``, the
streaming reader in ``stream.py``. A dataset is a folder holding ``shard-00000.parquet``, ... and a
``manifest.json``. Each shard is a Parquet table with one row per clip and these columns (format 2, what
is written; format 1 stored both arrays as ``list<float32>``, the embedding padded, and is still read):

======================  ===============  ======================================================
column                  Arrow type       meaning
======================  ===============  ======================================================
``video``               list<uint16>     the clip as bf16 bit patterns, flattened in C order; pixels
                                         in [-1, 1] for raw videos, or a latent for real models
``video_shape``         list<int32>      shape of ``video``, e.g. ``[C, F, H, W]``; the channel
                                         count is not assumed to be 3
``prompt``              string           the text prompt
``prompt_embedding``    list<uint16>     the prompt's text-encoder states, bf16, its first
                                         ``embedding_length`` tokens only, flattened in C order
``embedding_shape``     list<int32>      ``[L, D]`` (padded tokens, embedding width) handed out
``embedding_length``    int32            tokens kept; readers pad with zeros up to ``L``
``seed``                int64            the seed the clip was made with
======================  ===============  ======================================================

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
``key``. Their file names are ``shard-<run>-<write uuid>-<task>.parquet`` (one name per ``prepare`` run
and write task, so a later run adds files without touching the earlier ones).

Every row of a dataset has the same ``video_shape`` and ``embedding_shape``, the number of values its
shape (and ``embedding_length``) says, and only finite values.

``manifest.json`` records ``num_rows``, ``shards`` (file names in order), ``video_shape``,
``embedding_shape`` and ``format`` (the shard format). Files are written under a temporary name and
renamed, so a reader never sees half a shard. Readers check every row and raise :class:`ShardError`
naming the shard file, the row index within it and the column when something is off.

``read_shards`` holds what it reads, as float32 (``rank, world_size``: one rank's part; ``columns=``:
e.g. the embeddings only); training at scale streams its rows in bounded memory instead (``stream.py``).
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
import pyarrow.parquet as pq
import torch

from anyflow_ray.data.shard_format import (ALWAYS_READ, ARRAY_COLUMNS, COLUMNS, FORMAT_VERSION,  # noqa: F401
                                           OPTIONAL_FIELDS, SCHEMAS, SHARD_SCHEMA_V1, SHARD_SCHEMA_V2, RowBlock,
                                           ShardContents, ShardError, check_schema, checked_block, table_columns)

SHARD_SCHEMA = SCHEMAS[FORMAT_VERSION]  # the schema writers write
MANIFEST_NAME = "manifest.json"
SHARD_GLOB = "shard-*.parquet"


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


def read_columns(columns: Sequence[str] | None) -> list[str]:
    """The schema columns a read needs for ``columns`` (None: all of them), in schema order."""
    if columns is None:
        return list(COLUMNS)
    unknown = sorted(set(columns) - set(COLUMNS))
    if unknown:
        raise ValueError(f"columns {unknown} are not in the shard schema {list(COLUMNS)}")
    wanted = set(columns) | set(ALWAYS_READ)
    return [name for name in COLUMNS if name in wanted]


def read_block(path: Path, shapes: dict[str, tuple[int, ...] | None], columns: list[str] | None = None,
               rows: np.ndarray | None = None) -> RowBlock:
    """Read and check one shard (either format), its rows as stored; ``shapes`` maps shape columns to the
    shape seen so far. ``columns``: the logical columns to read (default all); ``rows``: the rows to keep."""
    shard = str(path)
    columns = columns or list(COLUMNS)
    try:
        file = pq.ParquetFile(path)
        version = check_schema(file.schema_arrow, shard, required=columns)
        table = file.read(columns=table_columns(version, columns))
    except (pa.ArrowException, OSError) as error:
        raise ShardError(f"{shard}: not a readable Parquet file ({error})") from error
    return checked_block(table, shard, shapes, columns, version, rows)


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
    blocks = []
    paths = shard_paths(root)
    for path, rows in rank_part(paths, rank, world_size):
        block = read_block(path, shapes, read, rows)
        shapes = {"video_shape": block.video_shape, "embedding_shape": block.embedding_shape}
        blocks.append(block)
    rows = sum(len(block) for block in blocks)
    if world_size == 1:
        _check_manifest(Path(root), rows)
    else:
        _check_manifest_names(Path(root), [path.name for path in paths])
    video_shape = shapes["video_shape"] if "video" in read else (0,)
    embedding_shape = shapes["embedding_shape"] if "prompt_embedding" in read else (0, 0)
    # float32 out, filled shard by shard (no second copy of the whole part at once, as a concatenate makes)
    videos = np.empty((rows, math.prod(video_shape)), dtype=np.float32)
    embeddings = np.empty((rows, math.prod(embedding_shape)), dtype=np.float32)
    start = 0
    for block in blocks:
        block.dense_into(videos[start:start + len(block)], embeddings[start:start + len(block)])
        start += len(block)
    prompts = [prompt for block in blocks for prompt in block.prompts]
    seeds = np.concatenate([block.seeds for block in blocks])
    del blocks
    return ClipBatch(
        videos=torch.from_numpy(videos).reshape(rows, *video_shape),
        embeddings=torch.from_numpy(embeddings).reshape(rows, *embedding_shape),
        prompts=prompts,
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
