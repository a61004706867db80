"""run.storage through pyarrow.fs: a file:// URI stands in for s3:// / gs:// (same code path)."""

import pytest

from anyflow_ray.run.config import ConfigError, load_config
from anyflow_ray.run.storage import Storage


def test_files_and_folders_under_the_run_round_trip_through_storage(tmp_path):
    bucket, staging, other_node = tmp_path / "bucket", tmp_path / "node-a", tmp_path / "node-b"
    writer = Storage(f"file://{bucket}", staging)
    (staging / "stage1" / "checkpoints" / "step-000002").mkdir(parents=True)
    (staging / "stage1" / "checkpoints" / "step-000002" / "rank-0.bin").write_bytes(b"\x00" * 64)
    (staging / "stage1" / "metrics.jsonl").write_text('{"step": 1}\n')
    writer.upload(staging / "stage1" / "checkpoints" / "step-000002")
    writer.upload(staging / "stage1" / "metrics.jsonl")
    assert (bucket / "stage1" / "checkpoints" / "step-000002" / "rank-0.bin").stat().st_size == 64
    assert (bucket / "stage1" / "metrics.jsonl").read_text() == '{"step": 1}\n'

    reader = Storage(f"file://{bucket}", other_node)  # another node: nothing local yet
    assert reader.fetch(other_node / "stage1" / "checkpoints" / "step-000002")
    assert (other_node / "stage1" / "checkpoints" / "step-000002" / "rank-0.bin").read_bytes() == b"\x00" * 64
    assert not reader.fetch(other_node / "stage1" / "checkpoints" / "step-000002")  # present: not copied again
    assert not reader.fetch(other_node / "stage2")  # absent in storage too
    (bucket / "stage1" / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    assert reader.fetch(other_node / "stage1" / "metrics.jsonl")
    assert reader.fetch(other_node / "stage1" / "metrics.jsonl", refresh=True)
    assert (other_node / "stage1" / "metrics.jsonl").read_text().count("step") == 2
    assert not list(other_node.rglob(".*fetch-*"))  # no staging leftovers

    writer.delete(staging / "stage1" / "checkpoints" / "step-000002")
    assert not (bucket / "stage1" / "checkpoints" / "step-000002").exists()


def test_paths_outside_the_run_and_an_empty_storage_are_left_alone(tmp_path):
    off = Storage("", tmp_path)
    assert not off.enabled and off.remote_of(tmp_path / "x") is None
    on = Storage(f"file://{tmp_path / 'bucket'}", tmp_path / "run")
    assert on.remote_of(tmp_path / "models" / "wan") is None
    assert on.remote_of(tmp_path / "run" / "teacher") == f"{tmp_path / 'bucket'}/teacher"
    on.upload(tmp_path / "elsewhere.txt")  # outside the run: nothing to do, no error


def test_a_storage_that_is_not_a_uri_is_refused_by_key():
    with pytest.raises(ConfigError, match="run.storage"):
        load_config(None, ["run.storage=/mnt/shared"])
    assert load_config(None, ["run.storage=s3://bucket/runs"]).run.storage == "s3://bucket/runs"
