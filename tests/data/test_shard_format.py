"""Shard format 2 (bf16, embeddings trimmed to their tokens) against format 1 (fp32, padded): the same clips
back through both readers, smaller rows, and every corruption of the new columns named."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from anyflow_ray.data.shard_format import (FORMAT_KEY, SHARD_SCHEMA_V2, from_bf16_bits, to_bf16_bits,
                                           token_lengths)
from anyflow_ray.data.shard_writer import write_shards
from anyflow_ray.data.shards import ShardError, read_block, read_shards
from anyflow_ray.data.stream import RowStream

L, D = 12, 8


def clips(n: int, seed: int = 0, video_shape=(4, 3, 5, 6)):
    """Random clips whose embeddings hold 1..L real tokens and zeros after them (as the text encoder's)."""
    rng = np.random.default_rng(seed)
    videos = rng.standard_normal((n, *video_shape)).astype(np.float32) * 3
    embeddings = rng.standard_normal((n, L, D)).astype(np.float32)
    tokens = rng.integers(1, L + 1, size=n)
    embeddings[np.arange(L)[None, :] >= tokens[:, None]] = 0.0
    return videos, [f"clip {i}" for i in range(n)], embeddings, list(range(n)), tokens


def test_bf16_codec_rounds_as_torch_does_and_decodes_exactly():
    values = np.concatenate([np.random.default_rng(1).standard_normal(10_000).astype(np.float32) * 100,
                             np.array([0.0, -0.0, 1.0, 65504.0, 1e-30, -3.3e38], dtype=np.float32)])
    bits = to_bf16_bits(values)
    expected = torch.from_numpy(values).bfloat16()
    assert np.array_equal(bits, expected.view(torch.int16).numpy().view(np.uint16))
    assert np.array_equal(from_bf16_bits(bits), expected.float().numpy())


def test_the_same_clips_written_as_v1_and_v2_read_back_equal_within_bf16_rounding(tmp_path):
    videos, prompts, embeddings, seeds, tokens = clips(20)
    for version in (1, 2):
        write_shards(tmp_path / f"v{version}", videos, prompts, embeddings, seeds, shard_size=7, row_group_size=3,
                     format_version=version)
    v1, v2 = read_shards(tmp_path / "v1"), read_shards(tmp_path / "v2")
    assert torch.equal(v1.videos, torch.from_numpy(videos)) and torch.equal(v1.embeddings, torch.from_numpy(embeddings))
    assert v2.videos.shape == v1.videos.shape and v2.embeddings.shape == v1.embeddings.shape == (20, L, D)
    torch.testing.assert_close(v2.videos, v1.videos, rtol=2 ** -8, atol=0)  # bf16: 8 bits of mantissa
    torch.testing.assert_close(v2.embeddings, v1.embeddings, rtol=2 ** -8, atol=0)
    assert (v2.embeddings[np.arange(L)[None, :] >= tokens[:, None]] == 0).all()  # padded back with zeros
    assert v2.prompts == v1.prompts == prompts and v2.seeds.tolist() == seeds
    table = pq.read_table(tmp_path / "v2" / "shard-00000.parquet")
    assert table.column("embedding_length").to_pylist() == tokens[:7].tolist()
    assert pq.read_schema(tmp_path / "v2" / "shard-00000.parquet").metadata[FORMAT_KEY] == b"2"
    assert json.loads((tmp_path / "v2" / "manifest.json").read_text())["format"] == 2
    assert json.loads((tmp_path / "v1" / "manifest.json").read_text())["format"] == 1
    for rank in (0, 1):  # the streaming reader hands out the same rows from either format
        s1 = RowStream(tmp_path / "v1", rank, 2, seed=5, window=2, prefetch=False)
        s2 = RowStream(tmp_path / "v2", rank, 2, seed=5, window=2)
        a, b = s1.rows(0, len(s1)), s2.rows(0, len(s2))
        assert a.seeds.tolist() == b.seeds.tolist() and a.prompts == b.prompts
        np.testing.assert_allclose(b.videos, a.videos, rtol=2 ** -8, atol=0)
        np.testing.assert_allclose(b.embeddings, a.embeddings, rtol=2 ** -8, atol=0)
        assert s2.bytes_per_row() * 2 == s1.bytes_per_row()


def test_a_folder_holding_both_formats_reads_as_one_data_set(tmp_path):
    """A prepare re-run after the upgrade adds format-2 shards beside format-1 ones."""
    videos, prompts, embeddings, seeds, _ = clips(10)
    write_shards(tmp_path / "a", videos[:6], prompts[:6], embeddings[:6], seeds[:6], format_version=1)
    write_shards(tmp_path / "b", videos[6:], prompts[6:], embeddings[6:], seeds[6:], format_version=2)
    (tmp_path / "b" / "shard-00000.parquet").rename(tmp_path / "a" / "shard-00001.parquet")
    (tmp_path / "a" / "manifest.json").unlink()
    batch = read_shards(tmp_path / "a")
    torch.testing.assert_close(batch.videos, torch.from_numpy(videos), rtol=2 ** -8, atol=0)
    assert batch.prompts == prompts
    stream = RowStream(tmp_path / "a", 0, 1, seed=0, window=2)
    assert sorted(stream.rows(0, 10).seeds.tolist()) == seeds


def test_a_wan_row_is_a_third_of_its_fp32_size(tmp_path):
    """One Wan2.1 row: latents 16x21x60x104 and a UMT5 embedding 512x4096 of which a 120-token prompt fills 120
    states. Format 1 holds 16.8 MB of it, format 2 5.2 MB (4.2 MB of latents, 8 KiB per token): in a reader's
    window and on disk (random values do not compress)."""
    latent, tokens = (16, 21, 60, 104), 120
    rng = np.random.default_rng(0)
    videos = rng.standard_normal((1, *latent), dtype=np.float32)
    embeddings = np.zeros((1, 512, 4096), dtype=np.float32)
    embeddings[0, :tokens] = rng.standard_normal((tokens, 4096), dtype=np.float32)
    held, disk = {}, {}
    for version in (1, 2):
        (path,) = write_shards(tmp_path / f"v{version}", videos, ["a prompt"], embeddings, [0], format_version=version)
        held[version] = read_block(path, {"video_shape": None, "embedding_shape": None}).nbytes
        disk[version] = path.stat().st_size
    assert held[1] == 4 * (math.prod(latent) + 512 * 4096)
    assert held[2] == 2 * (math.prod(latent) + tokens * 4096)
    assert held[2] / held[1] < 0.31 and disk[2] / disk[1] < 0.35, (held, disk)


def write_v2(path, rows):
    pq.write_table(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA_V2), path)


def v2_row(index=0, length=2, values=None):
    bits = to_bf16_bits(np.full(length * 3, 0.5, dtype=np.float32)).tolist()
    return {"video": values if values is not None else to_bf16_bits(np.full(4, 0.25, np.float32)).tolist(),
            "video_shape": [1, 2, 2], "prompt": f"p{index}", "prompt_embedding": bits, "embedding_shape": [4, 3],
            "embedding_length": length, "seed": index}


@pytest.mark.parametrize("change,fragments", [
    (lambda rows: rows[1].update(embedding_length=5), ["row 1", "embedding_length", "is 5", "[0, 4]"]),
    (lambda rows: rows[2].update(prompt_embedding=rows[2]["prompt_embedding"][:-1]),
     ["row 2", "prompt_embedding", "5 values", "expected 6 = embedding_length x 3"]),
    (lambda rows: rows[1].update(video=[0x7FC0, 0, 0, 0]), ["row 1", "video", "NaN or infinite"]),
    (lambda rows: rows[2].update(prompt_embedding=[0x7F80] * 6), ["row 2", "prompt_embedding", "NaN or infinite"]),
    (lambda rows: rows[0].update(embedding_length=None), ["row 0", "embedding_length", "null"]),
])
def test_v2_corruptions_name_file_row_and_column(tmp_path, change, fragments):
    rows = [v2_row(i) for i in range(3)]
    change(rows)
    write_v2(tmp_path / "shard-00000.parquet", rows)
    for read in (lambda: read_shards(tmp_path), lambda: RowStream(tmp_path, 0, 1).rows(0, 3)):
        with pytest.raises(ShardError) as error:
            read()
        for fragment in ["shard-00000.parquet", *fragments]:
            assert fragment in str(error.value), (fragment, str(error.value))


def test_a_format_the_reader_does_not_know_or_contradicting_columns_are_refused(tmp_path):
    table = pa.Table.from_pylist([v2_row()], schema=SHARD_SCHEMA_V2)
    pq.write_table(table.replace_schema_metadata({FORMAT_KEY: b"3"}), tmp_path / "shard-00000.parquet")
    with pytest.raises(ShardError, match="shard format '3' is not one this version reads"):
        read_shards(tmp_path)
    pq.write_table(table.replace_schema_metadata({FORMAT_KEY: b"1"}), tmp_path / "shard-00000.parquet")
    with pytest.raises(ShardError, match="says shard format 1 but its columns are format 2"):
        read_shards(tmp_path)
    pq.write_table(table.replace_schema_metadata(None), tmp_path / "shard-00000.parquet")  # by its columns
    assert read_shards(tmp_path).embeddings.shape == (1, 4, 3)


def test_token_lengths_keep_inner_zero_states_and_overflow_is_refused(tmp_path):
    embeddings = np.zeros((3, 5, 2), dtype=np.float32)
    embeddings[0, [0, 3]] = 1.0  # a zero state inside the prompt stays
    embeddings[1, 0] = -2.0
    assert token_lengths(embeddings).tolist() == [4, 1, 0]
    videos = np.full((1, 2, 2), 3.4e38, dtype=np.float32)
    with pytest.raises(ValueError, match="beyond bf16's range"):
        write_shards(tmp_path / "big", videos, ["p"], embeddings[:1], [0])
    assert not list((tmp_path / "big").glob("shard-*.parquet"))
