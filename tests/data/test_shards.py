"""Tests for the Parquet clip shards: round trip, ordering and every corruption caught."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from anyflow_ray.data.shards import (
    SHARD_SCHEMA_V1 as SHARD_SCHEMA,  # rows written by hand below are format 1 (float lists)
    ClipBatch,
    ShardError,
    read_shards,
)
from anyflow_ray.data.shard_writer import write_shards

VIDEO_SHAPE = (4, 3, 5, 6)  # a latent-like shape: 4 channels, not 3
EMBEDDING_SHAPE = (7, 8)


def make_clips(n: int, seed: int = 0) -> tuple[np.ndarray, list[str], np.ndarray, list[int]]:
    """Random videos, prompts, embeddings and seeds for ``n`` clips."""
    rng = np.random.default_rng(seed)
    videos = rng.uniform(-1, 1, (n, *VIDEO_SHAPE)).astype(np.float32)
    embeddings = rng.normal(size=(n, *EMBEDDING_SHAPE)).astype(np.float32)
    prompts = [f"clip number {i}" for i in range(n)]
    seeds = [int(s) for s in rng.integers(0, 2**62, size=n)]
    return videos, prompts, embeddings, seeds


def bf16(array: np.ndarray) -> np.ndarray:
    """What format 2 stores of float32 values: torch's bf16 rounding (nearest even)."""
    return torch.from_numpy(np.ascontiguousarray(array)).bfloat16().float().numpy()


def row(video_values: list, video_shape: list, index: int = 0) -> dict:
    """One valid-looking row dict with the given video column values."""
    return {
        "video": video_values,
        "video_shape": video_shape,
        "prompt": f"prompt {index}",
        "prompt_embedding": [0.5] * 6,
        "embedding_shape": [2, 3],
        "seed": index,
    }


def write_rows(path: Path, rows: list[dict], schema: pa.Schema = SHARD_SCHEMA) -> None:
    """Write ``rows`` straight to a Parquet file with pyarrow, bypassing write_shards."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def good_rows(n: int) -> list[dict]:
    return [row([0.1] * 12, [3, 1, 2, 2], index=i) for i in range(n)]


def test_round_trip_single_shard(tmp_path: Path) -> None:
    videos, prompts, embeddings, seeds = make_clips(5)
    paths = write_shards(tmp_path / "data", videos, prompts, embeddings, seeds)
    assert [p.name for p in paths] == ["shard-00000.parquet"]
    batch = read_shards(tmp_path / "data")
    assert isinstance(batch, ClipBatch) and len(batch) == 5
    assert batch.videos.dtype == torch.float32 and batch.videos.shape == (5, *VIDEO_SHAPE)
    assert batch.embeddings.shape == (5, *EMBEDDING_SHAPE)
    np.testing.assert_array_equal(batch.videos.numpy(), bf16(videos))
    np.testing.assert_array_equal(batch.embeddings.numpy(), bf16(embeddings))
    assert batch.prompts == prompts
    assert batch.seeds.dtype == torch.int64 and batch.seeds.tolist() == seeds


def test_round_trip_torch_inputs_and_manifest(tmp_path: Path) -> None:
    videos, prompts, embeddings, seeds = make_clips(3)
    write_shards(tmp_path, torch.from_numpy(videos), prompts, torch.from_numpy(embeddings), seeds)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest == {
        "num_rows": 3,
        "shards": ["shard-00000.parquet"],
        "video_shape": list(VIDEO_SHAPE),
        "embedding_shape": list(EMBEDDING_SHAPE),
        "format": 2,
        "max_embedding_length": EMBEDDING_SHAPE[0],
    }
    assert torch.equal(read_shards(tmp_path).videos, torch.from_numpy(videos).bfloat16().float())
    assert not list(tmp_path.glob(".*.tmp"))


def test_many_shards_keep_order(tmp_path: Path) -> None:
    videos, prompts, embeddings, seeds = make_clips(23)
    paths = write_shards(tmp_path, videos, prompts, embeddings, seeds, shard_size=5)
    assert [p.name for p in paths] == [f"shard-0000{i}.parquet" for i in range(5)]
    assert [pq.read_metadata(p).num_rows for p in paths] == [5, 5, 5, 5, 3]
    batch = read_shards(tmp_path)
    assert batch.prompts == prompts
    np.testing.assert_array_equal(batch.videos.numpy(), bf16(videos))
    assert batch.seeds.tolist() == seeds


def test_rewrite_removes_stale_shards(tmp_path: Path) -> None:
    write_shards(tmp_path, *make_clips(10), shard_size=2)
    videos, prompts, embeddings, seeds = make_clips(3, seed=1)
    write_shards(tmp_path, videos, prompts, embeddings, seeds, shard_size=2)
    assert sorted(p.name for p in tmp_path.glob("shard-*")) == [
        "shard-00000.parquet",
        "shard-00001.parquet",
    ]
    assert read_shards(tmp_path).prompts == prompts


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda c: (c[0][:3], *c[1:]), "different lengths"),
        (lambda c: (c[0], c[1][:2], *c[2:]), "different lengths"),
        (lambda c: (*c[:3], c[3][:1]), "different lengths"),
        (lambda c: (np.where(np.arange(c[0].size).reshape(c[0].shape) == 7, np.nan, c[0]), *c[1:]),
         "videos"),
        (lambda c: (c[0], c[1], np.full_like(c[2], np.inf), c[3]), "embeddings"),
        (lambda c: ((c[0] * 100).astype(np.int64), *c[1:]), "videos must hold floats"),
        (lambda c: (c[0], c[1], c[2][:, 0], c[3]), "embeddings must be"),
        (lambda c: (c[0], [1, 2, 3, 4], *c[2:]), "prompts"),
    ],
)
def test_write_rejects_bad_input_and_writes_nothing(tmp_path: Path, change, message) -> None:
    out_dir = tmp_path / "never"
    videos, prompts, embeddings, seeds = change(make_clips(4))
    with pytest.raises(ValueError, match=message):
        write_shards(out_dir, videos, prompts, embeddings, seeds)
    assert not out_dir.exists()


def test_missing_folder_names_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere") as error:
        read_shards(tmp_path / "nowhere")
    assert "data command" in str(error.value)


def test_empty_folder_names_it(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty") as error:
        read_shards(tmp_path / "empty")
    assert "data command" in str(error.value)


def assert_shard_error(root: Path, *fragments: str) -> None:
    """read_shards fails with a ShardError whose message holds every fragment."""
    with pytest.raises(ShardError) as error:
        read_shards(root)
    for fragment in fragments:
        assert fragment in str(error.value), (fragment, str(error.value))


def test_nan_in_one_row(tmp_path: Path) -> None:
    rows = good_rows(4)
    rows[2]["video"] = [0.1] * 5 + [float("nan")] + [0.1] * 6
    write_rows(tmp_path / "shard-00000.parquet", rows)
    assert_shard_error(tmp_path, "shard-00000.parquet", "row 2", "video")


def test_error_names_the_right_shard(tmp_path: Path) -> None:
    write_rows(tmp_path / "shard-00000.parquet", good_rows(3))
    rows = good_rows(3)
    rows[1]["prompt_embedding"] = [0.5] * 5 + [float("inf")]
    write_rows(tmp_path / "shard-00001.parquet", rows)
    assert_shard_error(tmp_path, "shard-00001.parquet", "row 1", "prompt_embedding")


def test_wrong_flattened_length(tmp_path: Path) -> None:
    rows = good_rows(3)
    rows[1]["video"] = [0.1] * 11
    write_rows(tmp_path / "shard-00000.parquet", rows)
    assert_shard_error(tmp_path, "shard-00000.parquet", "row 1", "video", "11")


def test_row_with_different_shape(tmp_path: Path) -> None:
    rows = good_rows(4)
    rows[3]["video_shape"] = [3, 1, 1, 4]  # same number of values, other shape
    write_rows(tmp_path / "shard-00000.parquet", rows)
    assert_shard_error(tmp_path, "shard-00000.parquet", "row 3", "video_shape")


def test_shape_differs_between_shards(tmp_path: Path) -> None:
    write_rows(tmp_path / "shard-00000.parquet", good_rows(2))
    rows = [row([0.1] * 12, [3, 2, 1, 2], index=i) for i in range(2)]
    write_rows(tmp_path / "shard-00001.parquet", rows)
    assert_shard_error(tmp_path, "shard-00001.parquet", "row 0", "video_shape")


def test_missing_column(tmp_path: Path) -> None:
    rows = [{k: v for k, v in r.items() if k != "seed"} for r in good_rows(2)]
    write_rows(tmp_path / "shard-00000.parquet", rows, SHARD_SCHEMA.remove(5))
    assert_shard_error(tmp_path, "shard-00000.parquet", "seed", "missing")


def test_wrong_column_type(tmp_path: Path) -> None:
    rows = good_rows(2)
    for r in rows:
        r["video"] = "not a list"
    schema = SHARD_SCHEMA.set(0, pa.field("video", pa.string()))
    write_rows(tmp_path / "shard-00000.parquet", rows, schema)
    assert_shard_error(tmp_path, "shard-00000.parquet", "video", "string")


def test_null_prompt(tmp_path: Path) -> None:
    rows = good_rows(3)
    rows[2]["prompt"] = None
    write_rows(tmp_path / "shard-00000.parquet", rows)
    assert_shard_error(tmp_path, "shard-00000.parquet", "row 2", "prompt")


def test_not_a_parquet_file(tmp_path: Path) -> None:
    (tmp_path / "shard-00000.parquet").write_text("garbage")
    assert_shard_error(tmp_path, "shard-00000.parquet")


def test_manifest_catches_missing_shard(tmp_path: Path) -> None:
    write_shards(tmp_path, *make_clips(6), shard_size=2)
    (tmp_path / "shard-00001.parquet").unlink()
    assert_shard_error(tmp_path, "manifest.json", "6")


# ----------------------------------------------------------------------------- reading at scale


@pytest.mark.parametrize("shard_size", [3, 23], ids=["shards-per-rank", "rows-per-rank"])
def test_two_ranks_see_disjoint_parts_whose_union_is_the_dataset(tmp_path: Path, shard_size: int) -> None:
    videos, prompts, embeddings, seeds = make_clips(23)
    write_shards(tmp_path, videos, prompts, embeddings, seeds, shard_size=shard_size)
    parts = [read_shards(tmp_path, rank=rank, world_size=2) for rank in (0, 1)]
    assert all(part.part == (rank, 2) and len(part) > 0 for rank, part in enumerate(parts))
    assert not set(parts[0].prompts) & set(parts[1].prompts)
    assert sorted(parts[0].prompts + parts[1].prompts) == sorted(prompts)
    for part in parts:  # every row is intact: video and embedding of the same clip as written
        index = [prompts.index(p) for p in part.prompts]
        np.testing.assert_array_equal(part.videos.numpy(), bf16(videos[index]))
        np.testing.assert_array_equal(part.embeddings.numpy(), bf16(embeddings[index]))
        assert part.seeds.tolist() == [seeds[i] for i in index]


def test_a_rank_part_with_too_few_rows_or_a_bad_rank_is_refused(tmp_path: Path) -> None:
    write_shards(tmp_path, *make_clips(3))
    with pytest.raises(ShardError, match="3 rows cannot be split over 4 ranks"):
        read_shards(tmp_path, rank=0, world_size=4)
    with pytest.raises(ValueError, match="rank 2 is not in a group of 2"):
        read_shards(tmp_path, rank=2, world_size=2)


def test_embeddings_only_leave_the_videos_out(tmp_path: Path) -> None:
    videos, prompts, embeddings, seeds = make_clips(5)
    write_shards(tmp_path, videos, prompts, embeddings, seeds, shard_size=2)
    batch = read_shards(tmp_path, columns=["prompt_embedding"])
    assert batch.videos.shape == (5, 0) and batch.video_shape == VIDEO_SHAPE
    np.testing.assert_array_equal(batch.embeddings.numpy(), bf16(embeddings))
    assert batch.prompts == prompts
    with pytest.raises(ValueError, match="not in the shard schema"):
        read_shards(tmp_path, columns=["pixels"])


def test_prepared_rows_with_source_columns_are_read_and_listed_in_the_manifest(tmp_path: Path) -> None:
    from anyflow_ray.data.shard_writer import prepared_table, write_manifest

    videos, prompts, embeddings, seeds = make_clips(4)
    table = prepared_table(videos, embeddings, prompts, [f"k{i}" for i in range(4)], ["a.mp4"] * 4, seeds,
                           frames=5, fps=8.0, height=16, width=16)
    pq.write_table(table.slice(0, 2), tmp_path / "shard-run1-0.parquet")
    pq.write_table(table.slice(2), tmp_path / "shard-run2-0.parquet")
    manifest = write_manifest(tmp_path)
    assert manifest["num_rows"] == 4 and manifest["video_shape"] == list(VIDEO_SHAPE)
    assert manifest["shards"] == ["shard-run1-0.parquet", "shard-run2-0.parquet"] and "key" in manifest["columns"]
    batch = read_shards(tmp_path)
    np.testing.assert_array_equal(batch.videos.numpy(), bf16(videos))
    assert batch.prompts == prompts


def test_a_rank_draws_only_from_its_own_stream(tmp_path: Path) -> None:
    from anyflow_ray.data.stream import RowStream
    from anyflow_ray.training.objectives import TrainData

    write_shards(tmp_path, *make_clips(16), shard_size=4)
    parts = [TrainData(RowStream(tmp_path, rank, 2, seed=3), torch.zeros(1, *EMBEDDING_SHAPE)) for rank in (0, 1)]
    whole = read_shards(tmp_path)
    row_of = {int(seed): i for i, seed in enumerate(whole.seeds)}
    for rank, data in enumerate(parts):
        own = whole.videos[[row_of[int(seed)] for seed in data.clips.rows(0, len(data.clips)).seeds]]
        for step in range(2):  # this rank's epoch (8 clips, 4 per step)
            x0, _, positions = data.local_batch(step, 8, 0, rank, 2, "cpu", torch.float32)
            assert positions.tolist() == list(range(rank * 4, rank * 4 + 4))
            assert all(any(torch.equal(clip, mine) for mine in own) for clip in x0)
    with pytest.raises(ValueError, match="part"):
        parts[0].local_batch(0, 8, 0, 1, 2, "cpu", torch.float32)
