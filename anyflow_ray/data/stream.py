"""A rank's rows of a shard folder, epoch after epoch, in bounded memory: the data path at scale.

``read_shards`` holds a rank's whole part of the data set (16.8 MB per Wan clip in fp32: 839 GB per
8-rank node at 50k clips). ``RowStream`` holds at most ``window`` Parquet row groups of it at a time,
whatever the size of the data set, and opens only the row groups it reads, through ``pyarrow.fs``
(a local folder, ``file://``, ``s3://``, ``gs://``): no rank fetches the folder.

The order of an epoch is a permutation of the data set's row groups drawn from (seed, epoch), dealt
round-robin to the ranks (rank r takes every W-th), then read ``window`` row groups at a time with the
window's rows shuffled by (seed, epoch, rank, window). Every row is read exactly once per epoch by
exactly one rank, and the rows of a batch come from up to ``window`` row groups of any shards (prepare
writes shards in input order; this undoes that). Position p of rank r's stream is a function of
(seed, r, W, p) alone, so a resumed run reads the same rows an uninterrupted one would, without storing
a data position: step s of a learner rank is rows [s * local, (s + 1) * local).

What depends on the number of ranks W: which rows rank r reads, and so which rows form step s's
global batch (the noise and times of each batch position do not, ``training/objectives.py``); and the
length of a rank's epoch (ranks hold different row groups: a rank moves to its next epoch within a few
row groups of the others).

A window holds its rows as stored (shard format 2: bf16 and embeddings trimmed to their tokens, about a
third of the float32 size of a Wan row; ``shard_format.py``); only the rows handed out by ``rows`` and
``batch`` are turned into float32 (L, D) embeddings.

Why row groups through ``pyarrow`` and not Ray Data's ``streaming_split``: the readers are DeepSpeed
ranks and rollout actors that already exist, each of which needs its own deterministic order (resume
needs position -> row as a function, not a live iterator), and the core package imports no Ray. A row
group is the unit Parquet reads anyway; ``data.row_group_size`` sets it when shards are written.
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from anyflow_ray.data.shard_format import RowBlock, checked_block, table_columns
from anyflow_ray.data.shards import (ARRAY_COLUMNS, MANIFEST_NAME, ShardContents, ShardError, check_schema,
                                     list_shard_files, read_columns)
from anyflow_ray.training.seeds import epoch_seed


@dataclass(frozen=True)
class RowGroup:
    path: str
    index: int  # row group within the file
    rows: int


def filesystem_of(root: str, filesystem: Any = None) -> tuple[Any, str]:
    """(pyarrow filesystem, path in it) of a local folder or a URI."""
    import pyarrow.fs as pafs
    from pathlib import Path

    if filesystem is not None:
        return filesystem, str(root).rstrip("/")
    if "://" in str(root):
        fs, path = pafs.FileSystem.from_uri(str(root))
        return fs, path.rstrip("/")
    return pafs.LocalFileSystem(), str(Path(root).absolute())


class RowStream:
    """Rank ``rank`` of ``world_size``'s rows of the shard folder ``root``, epoch after epoch; ``window``
    row groups in memory (and, with ``prefetch``, the next ``window`` being read). ``columns`` as in
    ``read_shards`` (rollout actors: the embeddings)."""

    def __init__(self, root: str, rank: int = 0, world_size: int = 1, seed: int = 0, window: int = 4,
                 columns: Sequence[str] | None = None, filesystem: Any = None, prefetch: bool = True):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a group of {world_size}")
        if window < 1:
            raise ValueError(f"data.window_row_groups={window} must be >= 1")
        self.fs, self.base = filesystem_of(root, filesystem)
        self.root, self.rank, self.world_size, self.seed, self.window = str(root), rank, world_size, seed, window
        self.part = (rank, world_size)
        self.columns = read_columns(columns)
        files = list_shard_files(self.base, self.fs)
        if not files:
            raise FileNotFoundError(f"dataset folder {root} holds no shard-*.parquet files: run the data command "
                                    "(`anyflow-ray data`, or `anyflow-ray prepare` for videos) to create it first")
        self.groups: list[RowGroup] = []
        for path in files:  # footers only
            with self.fs.open_input_file(path) as f:
                meta = pq.ParquetFile(f).metadata
            self.groups += [RowGroup(path, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)
                            if meta.row_group(g).num_rows]
        self.num_rows = sum(g.rows for g in self.groups)
        self._check_manifest()
        if len(self.groups) < world_size:
            raise ShardError(f"{root}: {len(self.groups)} row group(s) cannot be dealt to {world_size} readers; "
                             f"write smaller row groups (data.row_group_size) or more shards")
        self.shapes: dict[str, tuple[int, ...] | None] = dict.fromkeys(ARRAY_COLUMNS.values())
        self.groups_read = 0  # row groups read so far (each once per epoch when read in order)
        first = self._read_group(self.groups[0], ["video_shape", "prompt", "embedding_shape", "seed"])
        self.video_shape, self.embedding_shape = first.video_shape, first.embedding_shape
        self.stored_bytes = first.videos.dtype.itemsize  # per value in a window: 2 (format 2, bf16) or 4
        self._epoch_cache: dict[int, tuple[list[int], np.ndarray]] = {}
        self._loaded: tuple[tuple[int, int], RowBlock] | None = None
        self.prefetch, self._pool, self._next = prefetch, None, None

    # -- the order ------------------------------------------------------------------------------------
    def epoch_groups(self, epoch: int) -> list[int]:
        """This rank's row groups of ``epoch``, in reading order."""
        return self._epoch(epoch)[0]

    def epoch_rows(self, epoch: int) -> int:
        return int(self._epoch(epoch)[1][-1])

    def _epoch(self, epoch: int) -> tuple[list[int], np.ndarray]:
        """(this rank's row groups of ``epoch``, the first row of each window and the epoch's end)."""
        cached = self._epoch_cache.get(epoch)
        if cached is None:  # this epoch and its neighbours are kept (the read-ahead thread asks for the next)
            order = torch.randperm(len(self.groups), generator=torch.Generator().manual_seed(
                epoch_seed(self.seed, epoch)))
            groups = order[self.rank::self.world_size].tolist()
            sizes = [self.groups[g].rows for g in groups]
            bounds = np.cumsum([0, *(sum(sizes[w:w + self.window]) for w in range(0, len(groups), self.window))])
            cached = (groups, bounds)
            kept = {e: v for e, v in self._epoch_cache.items() if abs(e - epoch) == 1}
            self._epoch_cache = {**kept, epoch: cached}  # replaced whole: a reader on the other thread is safe
        return cached

    def locate(self, position: int) -> tuple[int, int]:
        """(epoch, offset in it) of position ``position`` of this rank's stream."""
        epoch = 0
        while position >= (rows := self.epoch_rows(epoch)):
            position, epoch = position - rows, epoch + 1
        return epoch, position

    # -- reading --------------------------------------------------------------------------------------
    def rows(self, start: int, count: int) -> ShardContents:
        """Rows [start, start + count) of this rank's stream (across windows and epochs), as float32."""
        if start < 0 or count < 1:
            raise ValueError(f"rows({start}, {count}): start must be >= 0 and count >= 1")
        epoch, offset = self.locate(start)
        parts, left = [], count
        while left:
            bounds = self._epoch(epoch)[1]
            w = int(np.searchsorted(bounds, offset, side="right")) - 1
            window = self._window(epoch, w)
            lo = offset - int(bounds[w])
            hi = min(len(window), lo + left)
            parts.append(window.slice(lo, hi))
            left -= hi - lo
            offset += hi - lo
            if offset >= bounds[-1]:
                epoch, offset = epoch + 1, 0
        return (RowBlock.concat(parts) if len(parts) > 1 else parts[0]).dense()

    def batch(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(videos (count, C, F, H, W), embeddings (count, L, D)) of ``rows(start, count)``."""
        got = self.rows(start, count)
        video_shape = self.video_shape if "video" in self.columns else (0,)
        return (torch.from_numpy(got.videos).reshape(count, *video_shape),
                torch.from_numpy(got.embeddings).reshape(count, *self.embedding_shape))

    def _window(self, epoch: int, w: int) -> RowBlock:
        """Window ``w`` of ``epoch``: its row groups read and its rows shuffled. One window is held and,
        with ``prefetch``, the next one is read meanwhile on a thread (Arrow reads outside the GIL)."""
        key = (epoch, w)
        if self._loaded is not None and self._loaded[0] == key:
            return self._loaded[1]
        self._loaded = None  # the previous window is freed before the next is read
        pa.default_memory_pool().release_unused()  # and its Arrow buffers handed back
        ahead, self._next = self._next, None
        if ahead is not None and ahead[0] == key:
            window = ahead[1].result()
        else:
            if ahead is not None:  # a jump (resume, a rollout's fresh place): the read ahead is not needed
                ahead[1].result()
            window = self._load(key)
        self._loaded = (key, window)
        if self.prefetch:
            bounds = self._epoch(epoch)[1]
            following = (epoch, w + 1) if w + 2 < len(bounds) else (epoch + 1, 0)
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="row-stream")
            self._next = (following, self._pool.submit(self._load, following))
        return window

    def _load(self, key: tuple[int, int]) -> RowBlock:
        epoch, w = key
        groups = self.epoch_groups(epoch)[w * self.window:(w + 1) * self.window]
        window = RowBlock.concat([self._read_group(self.groups[g], self.columns) for g in groups])
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, epoch, self.rank) * 1_000_003 + w)
        return window.take(torch.randperm(len(window), generator=gen).numpy())

    def _read_group(self, group: RowGroup, columns: list[str]) -> RowBlock:
        name = f"{group.path} (row group {group.index})"
        try:
            with self.fs.open_input_file(group.path) as f:
                file = pq.ParquetFile(f)
                version = check_schema(file.schema_arrow, group.path, required=columns)
                table = file.read_row_group(group.index, columns=table_columns(version, columns))
        except OSError as error:
            raise ShardError(f"{name}: not readable ({error})") from error
        contents = checked_block(table, name, self.shapes, columns, version)
        self.shapes = {"video_shape": contents.video_shape, "embedding_shape": contents.embedding_shape}
        self.groups_read += 1
        return contents

    def _check_manifest(self) -> None:
        path = f"{self.base}/{MANIFEST_NAME}"
        import pyarrow.fs as pafs

        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return
        with self.fs.open_input_stream(path) as f:
            manifest = json.loads(f.read().decode())
        if manifest.get("num_rows", self.num_rows) != self.num_rows:
            raise ShardError(f"{path}: says {manifest['num_rows']} rows but the shards hold {self.num_rows}; "
                             "a shard is missing or extra")

    def __len__(self) -> int:
        """Rows of this rank's first epoch (later epochs differ by up to a few row groups)."""
        return self.epoch_rows(0)

    def bytes_per_row(self) -> int:
        """Bytes one row takes in a window at most: as stored (bf16 for format 2, the embedding's full L
        tokens counted), or float32 for format 1."""
        return self.stored_bytes * (math.prod(self.video_shape) * ("video" in self.columns) + math.prod(self.embedding_shape))
