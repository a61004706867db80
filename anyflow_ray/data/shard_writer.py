"""Writing clip datasets: ``write_shards`` (rows held in memory: the synthetic generator), and for a writer
that produces shards elsewhere (``anyflow-ray prepare`` through Ray Data) ``prepared_table`` (one
batch's rows) and ``write_manifest`` (once its shards are complete). The columns are in ``shards.py``,
the formats in ``shard_format.py``: format 2 (bf16, trimmed embeddings) unless ``format_version=1``."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 (pa.compute)
import pyarrow.parquet as pq
import torch

from anyflow_ray.data.shard_format import FORMAT_KEY, FORMAT_VERSION, SCHEMAS, to_bf16_bits, token_lengths
from anyflow_ray.data.shards import (MANIFEST_NAME, OPTIONAL_FIELDS, SHARD_GLOB, fs_and_path, list_shard_files,
                                     shard_name)


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
    videos: Any, prompts: Sequence[str], embeddings: Any, seeds: Sequence[int], shard_size: int,
    format_version: int = FORMAT_VERSION,
) -> tuple[np.ndarray, np.ndarray, list[str], list[int]]:
    """Check everything ``write_shards`` gets before anything is written."""
    if format_version not in SCHEMAS:
        raise ValueError(f"shard format {format_version} is not one of {sorted(SCHEMAS)}")
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
    if format_version == 2:
        _check_bf16_range(video_array, "videos")
        _check_bf16_range(embedding_array, "embeddings")
    if not all(isinstance(prompt, str) for prompt in prompts):
        raise ValueError("prompts must all be strings")
    if not all(isinstance(seed, (int, np.integer)) and -(2**63) <= seed < 2**63 for seed in seeds):
        raise ValueError("seeds must all be integers that fit in int64")
    return video_array, embedding_array, list(prompts), [int(seed) for seed in seeds]


# The smallest float32 magnitude that rounds to infinity in bf16 (halfway between bf16's largest and inf).
BF16_OVERFLOW = float(np.array([0x7F7F8000], dtype=np.uint32).view(np.float32)[0])


def _check_bf16_range(array: np.ndarray, name: str) -> None:
    """ValueError naming the first value of ``array`` that bf16 cannot hold (it would round to infinity)."""
    overflow = np.abs(array) >= BF16_OVERFLOW
    if overflow.any():
        first = tuple(int(i) for i in np.argwhere(overflow)[0])
        raise ValueError(f"{name}: {array[first]:.4g} at {first} is beyond bf16's range (about 3.39e38); "
                         "write shard format 1 (data.shard_format=1, fp32)")


def _shard_table(videos: np.ndarray, embeddings: np.ndarray, prompts: list[str], seeds: list[int],
                 format_version: int = FORMAT_VERSION) -> pa.Table:
    """One shard's rows as an Arrow table in shard format ``format_version`` (2: bf16, embeddings trimmed
    to their tokens; 1: float32, padded)."""
    if format_version not in SCHEMAS:
        raise ValueError(f"shard format {format_version} is not one of {sorted(SCHEMAS)}")
    rows, (tokens, width) = len(videos), embeddings.shape[1:]

    def flat_list(flat: np.ndarray, lengths: np.ndarray) -> pa.ListArray:
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))

    def shape_list(shape: tuple[int, ...]) -> pa.Array:
        return pa.array([list(shape)] * rows, type=pa.list_(pa.int32()))

    video_values = math.prod(videos.shape[1:])
    if format_version == 1:
        video_column = flat_list(videos.reshape(-1), np.full(rows, video_values))
        embedding_column = flat_list(embeddings.reshape(-1), np.full(rows, tokens * width))
        extra = []
    else:
        lengths = token_lengths(embeddings)
        kept = np.arange(tokens)[None, :] < lengths[:, None]  # (rows, L): the token states kept
        video_column = flat_list(to_bf16_bits(videos).reshape(-1), np.full(rows, video_values))
        embedding_column = flat_list(to_bf16_bits(embeddings[kept]).reshape(-1), lengths * width)
        extra = [pa.array(lengths, type=pa.int32())]
    columns = [video_column, shape_list(videos.shape[1:]), pa.array(prompts, type=pa.string()), embedding_column,
               shape_list(embeddings.shape[1:]), *extra, pa.array(seeds, type=pa.int64())]
    return pa.Table.from_arrays(columns, schema=SCHEMAS[format_version])


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
    format_version: int = FORMAT_VERSION,
) -> list[Path]:
    """Write N clips as Parquet shards of ``shard_size`` rows (row groups of ``row_group_size`` rows,
    the unit a data stream reads; default one per shard) plus ``manifest.json``.

    ``videos`` is (N, ...) (usually (N, C, F, H, W)), ``embeddings`` (N, L, D). All inputs
    are validated first; on bad input a ValueError names the problem and nothing is
    written. Shards left in ``out_dir`` by an earlier, larger write are removed. Returns
    the shard paths in order. ``format_version``: 2 (bf16, trimmed embeddings) or 1 (fp32).
    """
    video_array, embedding_array, prompt_list, seed_list = _validated_inputs(
        videos, prompts, embeddings, seeds, shard_size, format_version
    )
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, start in enumerate(range(0, len(video_array), shard_size)):
        rows = slice(start, start + shard_size)
        table = _shard_table(video_array[rows], embedding_array[rows], prompt_list[rows], seed_list[rows],
                             format_version)
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
        "format": format_version,
        "max_embedding_length": int(token_lengths(embedding_array).max()) if format_version == 2
        else int(embedding_array.shape[1]),
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
    formats, longest = set(), 0  # shard formats present (a folder may hold both), longest embedding kept
    for path in paths:
        if "embedding_length" in pq.read_schema(path, filesystem=fs).names:
            lengths = pq.read_table(path, columns=["embedding_length"], filesystem=fs).column(0)
            formats.add(2)
            longest = max(longest, int(pa.compute.max(lengths).as_py() or 0))
        else:
            formats.add(1)
            longest = max(longest, shapes.column("embedding_shape")[0].as_py()[0])  # padded: all of L
    manifest = {
        "num_rows": sum(pq.read_metadata(path, filesystem=fs).num_rows for path in paths),
        "shards": [path.rsplit("/", 1)[1] for path in paths],
        "video_shape": shapes.column("video_shape")[0].as_py(),
        "embedding_shape": shapes.column("embedding_shape")[0].as_py(),
        "columns": schema.names,
        "format": formats.pop() if len(formats) == 1 else sorted(formats),
        "max_embedding_length": longest,
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
    format_version: int = FORMAT_VERSION,
) -> pa.Table:
    """Rows of prepared real clips: the shard schema (format ``format_version``) plus the optional source
    columns."""
    video_array, embedding_array, prompt_list, seed_list = _validated_inputs(
        latents, prompts, embeddings, seeds, shard_size=max(1, len(prompts)), format_version=format_version
    )
    table = _shard_table(video_array, embedding_array, prompt_list, seed_list, format_version)
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
    return table.replace_schema_metadata({FORMAT_KEY: str(format_version).encode()})
