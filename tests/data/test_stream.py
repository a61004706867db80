"""RowStream: a rank's rows in bounded memory, a global shuffle per epoch, the same order after a resume."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from anyflow_ray.data.shard_writer import write_shards
from anyflow_ray.data.shards import ShardError, read_shards
from anyflow_ray.data.stream import RowStream


def write_rows(root, n, shard_size=40, row_group_size=8, video_shape=(3, 2, 4, 4)):
    """``n`` rows whose seed is the row id (0..n-1) and whose video values are the row id too."""
    videos = np.broadcast_to(np.arange(n, dtype=np.float32).reshape(n, *([1] * len(video_shape))),
                             (n, *video_shape)).copy()
    embeddings = np.random.default_rng(0).standard_normal((n, 4, 8)).astype(np.float32)
    write_shards(root, videos, [f"clip {i}" for i in range(n)], embeddings, list(range(n)),
                 shard_size=shard_size, row_group_size=row_group_size)
    return root


@pytest.fixture(scope="module")
def rows_200(tmp_path_factory):
    return write_rows(tmp_path_factory.mktemp("stream"), 200)


def epoch_ids(stream, epoch):
    start = sum(stream.epoch_rows(e) for e in range(epoch))
    return stream.rows(start, stream.epoch_rows(epoch)).seeds.tolist()


def test_two_ranks_epochs_cover_every_row_exactly_once_and_each_epoch_is_reshuffled(rows_200):
    ranks = [RowStream(rows_200, rank, 2, seed=5, window=2) for rank in range(2)]
    for epoch in (0, 1, 2):
        ids = [epoch_ids(stream, epoch) for stream in ranks]
        assert sorted(ids[0] + ids[1]) == list(range(200))  # every row once, on one rank
        assert not set(ids[0]) & set(ids[1])
    # a new permutation of row groups each epoch, dealt across ranks: rank 0 reads other rows in epoch 1
    assert set(epoch_ids(ranks[0], 0)) != set(epoch_ids(ranks[0], 1))
    # rows of one window come from several shards (prepare writes shards in input order; this undoes it)
    first = ranks[0].rows(0, 16).seeds // 40
    assert len(set(first.tolist())) > 1
    # the video and embedding of a row travel together
    videos, embeddings = ranks[0].batch(0, 16)
    assert torch.equal(videos[:, 0, 0, 0, 0].long(), torch.from_numpy(ranks[0].rows(0, 16).seeds))
    assert embeddings.shape == (16, 4, 8)


def test_a_resumed_stream_reads_the_same_rows_as_an_uninterrupted_one_across_epochs(rows_200):
    straight = RowStream(rows_200, 1, 2, seed=5, window=2)
    batches = [straight.rows(step * 12, 12).seeds.tolist() for step in range(20)]  # 240 rows > one epoch
    resumed = RowStream(rows_200, 1, 2, seed=5, window=2)  # "killed" after step 7: a fresh process
    assert [resumed.rows(step * 12, 12).seeds.tolist() for step in range(7, 20)] == batches[7:]
    assert RowStream(rows_200, 1, 2, seed=6, window=2).rows(0, 12).seeds.tolist() != batches[0]


def test_a_rank_reads_only_its_own_row_groups_through_a_file_uri_and_the_same_clips_as_read_shards(rows_200):
    stream = RowStream(f"file://{rows_200}", 0, 4, seed=1, window=3, prefetch=False)
    ids = epoch_ids(stream, 0)
    assert stream.groups_read == len(stream.epoch_groups(0)) + 1  # its own groups, once (+ the shape probe)
    assert len(stream.epoch_groups(0)) == 25 // 4 + (0 < 25 % 4)  # 25 groups of 8 rows dealt to 4 ranks
    whole = read_shards(rows_200)
    got = stream.rows(0, len(ids))
    assert torch.equal(torch.from_numpy(got.embeddings).reshape(-1, 4, 8), whole.embeddings[ids])
    assert got.prompts == [whole.prompts[i] for i in ids]
    embeddings_only = RowStream(f"file://{rows_200}", 0, 4, seed=1, columns=["prompt_embedding"])
    videos, embeddings = embeddings_only.batch(0, 5)
    assert videos.shape == (5, 0) and embeddings.shape == (5, 4, 8) and embeddings_only.video_shape == (3, 2, 4, 4)


def test_bad_inputs_are_named(rows_200, tmp_path):
    with pytest.raises(ShardError, match="25 row group.*cannot be dealt to 26 readers.*data.row_group_size"):
        RowStream(rows_200, 0, 26)
    with pytest.raises(FileNotFoundError, match="holds no shard"):
        RowStream(tmp_path, 0, 1)
    broken = write_rows(tmp_path / "nan", 16, shard_size=8, row_group_size=4)
    manifest = json.loads((broken / "manifest.json").read_text())
    (broken / "manifest.json").write_text(json.dumps({**manifest, "num_rows": 17}))
    with pytest.raises(ShardError, match="says 17 rows but the shards hold 16"):
        RowStream(broken, 0, 1)


PEAK = """
import json, sys
from anyflow_ray.data.shards import read_shards
from anyflow_ray.data.stream import RowStream

def hwm_kib():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])

root, how = sys.argv[1], sys.argv[2]
stream = RowStream(root, 0, 1, seed=0, window=4)
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) restarts from the current size
base = hwm_kib()
if how == "stream":
    rows = 0
    while rows < len(stream):
        rows += len(stream.rows(rows, min(64, len(stream) - rows)).prompts)
else:
    rows = len(read_shards(root))
print(json.dumps({"rows": rows, "growth_mib": (hwm_kib() - base) / 1024}))
"""


def peak_growth(root, how):
    out = subprocess.run([sys.executable, "-c", PEAK, str(root), how], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_streams_resident_memory_stays_flat_with_a_data_set_ten_times_larger(tmp_path):
    """Rows of 12 KiB: 1,000 (12 MiB) and 10,000 (117 MiB). Reading an epoch through the stream grows the
    process by the same amount either way (a window of 4 row groups of 64 rows, and Arrow's and the
    allocator's pools: about 35 MiB here); read_shards grows with the data (about 2.5x it)."""
    small = write_rows(tmp_path / "1k", 1000, shard_size=500, row_group_size=64, video_shape=(3, 4, 16, 16))
    large = write_rows(tmp_path / "10k", 10_000, shard_size=500, row_group_size=64, video_shape=(3, 4, 16, 16))
    data_mib = 10_000 * 3 * 4 * 16 * 16 * 4 / 2**20
    s_small, s_large, whole = peak_growth(small, "stream"), peak_growth(large, "stream"), peak_growth(large, "memory")
    assert s_small["rows"] == 1000 and s_large["rows"] == whole["rows"] == 10_000
    assert s_large["growth_mib"] <= 1.25 * s_small["growth_mib"] + 8, (s_small, s_large)
    assert whole["growth_mib"] > 0.8 * data_mib, whole  # the measurement sees a reader that holds it all
    assert s_large["growth_mib"] < 0.25 * whole["growth_mib"], (s_large, whole)
