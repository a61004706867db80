"""The two on-disk formats of a clip shard, their codec and the checks every reader makes.

Format 1 (fp32, the first one; still read): ``video`` and ``prompt_embedding`` are ``list<float32>``, the
embedding zero-padded to the text encoder's max length ``L``.

Format 2 (written since): both arrays are bf16, stored as their ``uint16`` bit patterns (Parquet has no
bf16: ``list<uint16>``), and the embedding keeps only its first ``embedding_length`` token states (the
ones the text encoder produced for the prompt; the rest are zeros by construction, ``models/text.py``).
``embedding_shape`` still holds the padded ``[L, D]``: readers pad with zeros at read time and hand out the
same ``(L, D)`` float32 tensors as for format 1. A Wan row (latents 16x21x60x104, UMT5 512x4096) is
16.8 MB in format 1 and 4.2 MB + 8 KiB per prompt token in format 2 (8.4 MB at the full 512 tokens,
5.2 MB at 120). A file records its format in its Parquet schema metadata (``anyflow.shard_format``);
a shard without it is read by its columns (``embedding_length`` present: format 2).

``RowBlock`` is what a reader holds: a shard's (or row group's) rows as stored (bf16 bits, trimmed
embeddings), turned into float32 only for the rows handed out (``dense``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

FORMAT_VERSION = 2  # what the writers write
FORMAT_KEY = b"anyflow.shard_format"

SHARD_SCHEMA_V1 = pa.schema([
    pa.field("video", pa.list_(pa.float32())),
    pa.field("video_shape", pa.list_(pa.int32())),
    pa.field("prompt", pa.string()),
    pa.field("prompt_embedding", pa.list_(pa.float32())),
    pa.field("embedding_shape", pa.list_(pa.int32())),
    pa.field("seed", pa.int64()),
])
SHARD_SCHEMA_V2 = pa.schema([
    pa.field("video", pa.list_(pa.uint16())),  # bf16 bit patterns
    pa.field("video_shape", pa.list_(pa.int32())),
    pa.field("prompt", pa.string()),
    pa.field("prompt_embedding", pa.list_(pa.uint16())),  # bf16, embedding_length x D values
    pa.field("embedding_shape", pa.list_(pa.int32())),  # [L, D]: the padded shape readers hand out
    pa.field("embedding_length", pa.int32()),  # the prompt's token states kept (0..L)
    pa.field("seed", pa.int64()),
], metadata={FORMAT_KEY: b"2"})
SCHEMAS = {1: SHARD_SCHEMA_V1, 2: SHARD_SCHEMA_V2}
# Columns that prepared (real-video) shards add; readers accept them when present.
OPTIONAL_FIELDS = pa.schema([
    pa.field("key", pa.string()),
    pa.field("source", pa.string()),
    pa.field("frames", pa.int32()),
    pa.field("fps", pa.float32()),
    pa.field("height", pa.int32()),
    pa.field("width", pa.int32()),
])
# Flattened array column -> the column holding its shape.
ARRAY_COLUMNS = {"video": "video_shape", "prompt_embedding": "embedding_shape"}
SHAPE_RANKS = {"embedding_shape": 2}  # shape columns whose length is fixed
# The columns a reader asks for by name (both formats); format 2 adds embedding_length on its own.
COLUMNS = SHARD_SCHEMA_V1.names
# Columns every read includes: small, and what the shapes and the row checks need.
ALWAYS_READ = ("video_shape", "prompt", "embedding_shape", "seed")


class ShardError(ValueError):
    """A shard does not follow the schema; the message names file, row and column."""


# ----------------------------------------------------------------------------- bf16


def to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> the uint16 bit patterns of bf16, rounded to nearest even (as ``torch.bfloat16``)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def from_bf16_bits(bits: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint16 bf16 bit patterns -> float32 (exact), into ``out`` when given."""
    wide = bits.astype(np.uint32) << np.uint32(16)
    if out is None:
        return wide.view(np.float32)
    out[...] = wide.view(np.float32)
    return out


def bf16_finite(bits: np.ndarray) -> np.ndarray:
    """Per row (last axis reduced): no NaN or infinity among the bf16 values (exponent bits not all ones)."""
    return ~((bits & np.uint16(0x7F80)) == np.uint16(0x7F80)).any(axis=-1)


def token_lengths(embeddings: np.ndarray) -> np.ndarray:
    """(N,) int32: token states up to the last one that is not all zeros, of (N, L, D) embeddings. Trimming
    the rest and padding it back with zeros gives the same array."""
    nonzero = (embeddings != 0).any(axis=-1)  # (N, L)
    last = embeddings.shape[1] - np.argmax(nonzero[:, ::-1], axis=1)
    return np.where(nonzero.any(axis=1), last, 0).astype(np.int32)


# ----------------------------------------------------------------------------- schema


def shard_version(schema: pa.Schema, shard: str) -> int:
    """The format of a shard from its schema: its metadata's ``anyflow.shard_format``, else its columns."""
    recorded = (schema.metadata or {}).get(FORMAT_KEY)
    by_columns = 2 if "embedding_length" in schema.names else 1
    if recorded is None:
        return by_columns
    try:
        version = int(recorded)
    except ValueError:
        version = -1
    if version not in SCHEMAS:
        raise ShardError(f"{shard}: shard format {recorded.decode(errors='replace')!r} is not one this version "
                         f"reads ({sorted(SCHEMAS)}); upgrade anyflow-ray")
    if version != by_columns:
        raise ShardError(f"{shard}: says shard format {version} but its columns are format {by_columns}'s")
    return version


def check_schema(schema: pa.Schema, shard: str, required: Sequence[str] | None = None) -> int:
    """A shard's schema has the ``required`` columns of its format (default all), no others but the
    optional ones, with the format's types; returns the format."""
    version = shard_version(schema, shard)
    expected_schema = SCHEMAS[version]
    required = list(expected_schema.names) if required is None else list(required)
    if version == 2 and "embedding_length" not in required:
        required.append("embedding_length")
    missing = [name for name in required if name not in schema.names]
    known = expected_schema.names + OPTIONAL_FIELDS.names
    extra = [name for name in schema.names if name not in known]
    for problem, columns in (("missing", missing), ("unexpected", extra)):
        if columns:
            raise ShardError(f"{shard}: {problem} columns {columns}; format {version} schema: "
                             f"{expected_schema.names} (optional: {OPTIONAL_FIELDS.names})")
    optional = [field for field in OPTIONAL_FIELDS if field.name in schema.names]
    for field in [*(expected_schema.field(name) for name in required), *optional]:
        actual, expected = schema.field(field.name).type, field.type
        # List types may differ in the name of their item field only.
        same_list = pa.types.is_list(actual) and pa.types.is_list(expected)
        if not (actual == expected or same_list and actual.value_type == expected.value_type):
            raise ShardError(f"{shard}: column '{field.name}' has type {actual}, expected {expected} "
                             f"(shard format {version})")
    return version


def table_columns(version: int, columns: Sequence[str]) -> list[str]:
    """The file columns to read for the logical ``columns`` of a shard of format ``version``."""
    return [*columns, "embedding_length"] if version == 2 else list(columns)


# ----------------------------------------------------------------------------- rows held by a reader


@dataclass
class ShardContents:
    """Rows as handed out: float32 arrays (the format they were stored in does not show)."""

    videos: np.ndarray  # (rows, prod(video_shape)) float32; (rows, 0) when the column was not read
    embeddings: np.ndarray  # (rows, prod(embedding_shape)) float32, zero-padded to L tokens
    prompts: list[str]
    seeds: np.ndarray  # (rows,) int64
    video_shape: tuple[int, ...]
    embedding_shape: tuple[int, ...]


@dataclass
class RowBlock:
    """Rows as stored (format 2: bf16 bits and trimmed embeddings; format 1: float32), held by a reader."""

    videos: np.ndarray  # (rows, prod(video_shape)), float32 or uint16 (bf16 bits); (rows, 0) if not read
    embeddings: list[np.ndarray]  # per row (lengths[i] * D,), float32 or uint16
    lengths: np.ndarray  # (rows,) int32 token states kept per row
    prompts: list[str]
    seeds: np.ndarray
    video_shape: tuple[int, ...]
    embedding_shape: tuple[int, ...]
    read_embeddings: bool = True

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def nbytes(self) -> int:
        return self.videos.nbytes + sum(e.nbytes for e in self.embeddings)

    def slice(self, lo: int, hi: int) -> "RowBlock":
        return RowBlock(self.videos[lo:hi], self.embeddings[lo:hi], self.lengths[lo:hi], self.prompts[lo:hi],
                        self.seeds[lo:hi], self.video_shape, self.embedding_shape, self.read_embeddings)

    def take(self, order: np.ndarray) -> "RowBlock":
        return RowBlock(self.videos[order], [self.embeddings[i] for i in order], self.lengths[order],
                        [self.prompts[i] for i in order], self.seeds[order], self.video_shape, self.embedding_shape,
                        self.read_embeddings)

    @staticmethod
    def concat(parts: list["RowBlock"]) -> "RowBlock":
        if len({p.videos.dtype for p in parts}) > 1:  # format 1 and format 2 shards in one folder
            parts = [p if p.videos.dtype == np.float32 else p.with_float_videos() for p in parts]
        first = parts[0]
        return RowBlock(np.concatenate([p.videos for p in parts]), [e for p in parts for e in p.embeddings],
                        np.concatenate([p.lengths for p in parts]), [s for p in parts for s in p.prompts],
                        np.concatenate([p.seeds for p in parts]), first.video_shape, first.embedding_shape,
                        first.read_embeddings)

    def with_float_videos(self) -> "RowBlock":
        videos = from_bf16_bits(self.videos) if self.videos.dtype == np.uint16 else self.videos
        return RowBlock(videos, self.embeddings, self.lengths, self.prompts, self.seeds, self.video_shape,
                        self.embedding_shape, self.read_embeddings)

    def dense_into(self, videos: np.ndarray, embeddings: np.ndarray) -> None:
        """Write the rows as float32 into ``videos`` (rows, V) and ``embeddings`` (rows, L * D), padding."""
        if self.videos.dtype == np.uint16:
            from_bf16_bits(self.videos, out=videos)
        else:
            videos[...] = self.videos
        if not self.read_embeddings:
            return
        embeddings[...] = 0
        for row, values in enumerate(self.embeddings):
            target = embeddings[row, :values.size]
            if values.dtype == np.uint16:
                from_bf16_bits(values, out=target)
            else:
                target[...] = values

    def dense(self) -> ShardContents:
        rows = len(self)
        width = math.prod(self.embedding_shape) if self.read_embeddings else 0
        videos = np.empty((rows, self.videos.shape[1]), dtype=np.float32)
        embeddings = np.empty((rows, width), dtype=np.float32)
        self.dense_into(videos, embeddings)
        return ShardContents(videos, embeddings, list(self.prompts), self.seeds.copy(), self.video_shape,
                             self.embedding_shape)


# ----------------------------------------------------------------------------- checked reading


def _first_null_row(column: pa.ChunkedArray) -> int | None:
    nulls = np.asarray(column.is_null().to_numpy(zero_copy_only=False))
    return int(np.argmax(nulls)) if nulls.any() else None


def _row_shapes(table: pa.Table, shard: str, column: str, expected: tuple[int, ...] | None) -> tuple[int, ...]:
    """The one shape every row of ``column`` has; ShardError naming the first odd row."""
    shapes = table.column(column).to_pylist()
    reference = expected if expected is not None else tuple(shapes[0])
    if len(reference) != SHAPE_RANKS.get(column, len(reference)) or not all(
            isinstance(size, int) and size > 0 for size in reference):
        raise ShardError(f"{shard}: row 0: column '{column}' holds an invalid shape {shapes[0]}")
    for row, shape in enumerate(shapes):
        if tuple(shape) != reference:
            raise ShardError(f"{shard}: row {row}: column '{column}' is {shape}, other rows have {list(reference)}")
    return reference


def _list_values(table: pa.Table, shard: str, column: str, expected: np.ndarray, what: str
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(flat values, row offsets) of a list column whose row i must hold ``expected[i]`` values, checked
    for length, nulls and finiteness."""
    values = table.column(column).combine_chunks()
    lengths = pc.list_value_length(values).to_numpy(zero_copy_only=False)
    wrong = np.nonzero(lengths != expected)[0]
    if len(wrong):
        row = int(wrong[0])
        raise ShardError(f"{shard}: row {row}: column '{column}' has {lengths[row]} values, expected "
                         f"{expected[row]} = {what}")
    flat = values.flatten()
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    if flat.null_count:
        position = int(np.argmax(np.asarray(flat.is_null())))
        row = int(np.searchsorted(offsets, position, side="right") - 1)
        raise ShardError(f"{shard}: row {row}: column '{column}' has null values")
    array = flat.to_numpy(zero_copy_only=False)
    bad = ~np.isfinite(array) if array.dtype == np.float32 else (array & np.uint16(0x7F80)) == np.uint16(0x7F80)
    if bad.any():
        row = int(np.searchsorted(offsets, int(np.argmax(bad)), side="right") - 1)
        raise ShardError(f"{shard}: row {row}: column '{column}' has NaN or infinite values")
    return array, offsets


def checked_block(table: pa.Table, shard: str, shapes: dict[str, tuple[int, ...] | None], columns: list[str],
                  version: int, rows: np.ndarray | None = None) -> RowBlock:
    """The checked rows of ``table`` (a shard, or a row group of one, named ``shard`` in errors) as stored.
    ``columns``: the logical columns read (a left-out array column comes back empty); ``rows``: the row
    indices to keep (default all); ``shapes``: shape columns -> the shape seen so far (or None)."""
    if table.num_rows == 0:
        raise ShardError(f"{shard}: has no rows")
    for column in table_columns(version, columns):
        null_row = _first_null_row(table.column(column))
        if null_row is not None:
            raise ShardError(f"{shard}: row {null_row}: column '{column}' is null")
    found = {shape_column: _row_shapes(table, shard, shape_column, shapes[shape_column])
             for shape_column in ARRAY_COLUMNS.values()}
    if rows is not None:
        table = table.take(pa.array(rows, type=pa.int64()))
    n = table.num_rows
    video_size, (tokens, width) = math.prod(found["video_shape"]), found["embedding_shape"]
    if version == 2:
        lengths = table.column("embedding_length").to_numpy().astype(np.int32)
        if ((lengths < 0) | (lengths > tokens)).any():
            row = int(np.argmax((lengths < 0) | (lengths > tokens)))
            raise ShardError(f"{shard}: row {row}: column 'embedding_length' is {lengths[row]}, outside "
                             f"[0, {tokens}] (embedding_shape {list(found['embedding_shape'])})")
    else:
        lengths = np.full(n, tokens, dtype=np.int32)
    videos = np.zeros((n, 0), dtype=np.float32 if version == 1 else np.uint16)
    if "video" in columns:
        flat, _ = _list_values(table, shard, "video", np.full(n, video_size), f"prod({list(found['video_shape'])})")
        videos = flat.reshape(n, video_size)
    embeddings: list[np.ndarray] = []
    read_embeddings = "prompt_embedding" in columns
    if read_embeddings:
        what = (f"embedding_length x {width}" if version == 2 else f"prod({list(found['embedding_shape'])})")
        flat, offsets = _list_values(table, shard, "prompt_embedding", lengths.astype(np.int64) * width, what)
        embeddings = [flat[offsets[i]:offsets[i + 1]] for i in range(n)]
    else:
        embeddings = [np.zeros(0, dtype=np.float32)] * n
    return RowBlock(videos, embeddings, lengths, table.column("prompt").to_pylist(),
                    table.column("seed").to_numpy().astype(np.int64), found["video_shape"], found["embedding_shape"],
                    read_embeddings)
