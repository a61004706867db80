"""`anyflow-ray prepare` on generated mp4 + json clips (some broken on purpose), with a tiny random
AutoencoderKLWan and the tiny UMT5. Training on prepared shards: the README's tiny-latent path in
tests/jobs/test_readme_walk.py."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from anyflow_ray.run.config import load_config
from anyflow_ray.data.encode import (decode_latents, denormalize_latents, encode_video, load_vae, make_tiny_vae,
                                     normalize_latents)
from anyflow_ray.data.shards import list_shard_files, read_shards
from anyflow_ray.data.synthetic import sample_specs, write_clip_files
from anyflow_ray.data.video import ClipError, ClipSize, RawClip, iter_clips, list_sources, load_clip

Z_DIM = 4
# sources: 9 frames at 16 fps, 64 x 96; prepared: 5 frames at 8 fps (every other frame), 64 x 64 (centre crop)
SOURCE = ["data.frames=9", "data.fps=16", "data.height=64", "data.width=96", "data.num_train=12", "data.num_heldout=1"]
PREPARED = ["data.frames=5", "data.fps=8", "data.height=64", "data.width=64", "data.shard_size=4"]
SMALL = ["model.tiny.num_layers=1", "model.tiny.ffn_dim=32", "run.threads=1", "learner.num_ranks=1",
         "learner.cpus_per_rank=0.5", "prepare.decode_cpus=0.25", "prepare.actor_cpus=0.25", "prepare.vae_batch_size=3",
         "pretrain.steps=2", "pretrain.global_batch=4", "pretrain.warmup=1", "pretrain.save_every=2",
         "pretrain.log_every=1"]
BROKEN = {"clip-00003": "unreadable", "clip-00005": "missing caption", "clip-00007": "too short"}


def break_clips(videos) -> None:
    """A truncated mp4, a clip without its caption and a clip too short for 5 frames at 8 fps."""
    path = videos / "clip-00003.mp4"
    path.write_bytes(path.read_bytes()[:300])
    (videos / "clip-00005.json").unlink()
    short = write_clip_files(videos / "short", sample_specs(1, 99), frames=3, height=64, width=96, fps=16)[0]
    for suffix in (".mp4", ".json"):
        shutil.move(short.with_suffix(suffix), videos / f"clip-00007{suffix}")
    (videos / "short").rmdir()


@pytest.fixture(scope="module")
def run(ray_module, tmp_path_factory):
    """Generated mp4 clips -> prepare (twice) on a latent-space tiny model: the configs and both summaries."""
    from anyflow_ray.jobs import data, prepare
    from anyflow_ray.models.loading import make_tiny

    root = tmp_path_factory.mktemp("prepare")
    data.run(load_config("configs/tiny.yaml", [f"run.output_dir={root}", "data.format=mp4", *SOURCE]))
    videos = root / "data" / "videos" / "train"
    break_clips(videos)
    cfg = load_config("configs/tiny.yaml", [f"run.output_dir={root}", *PREPARED, *SMALL,
                                            f"prepare.input=[{videos}]"])
    make_tiny(cfg.model.base, cfg.model.tiny, channels=Z_DIM)  # a transformer on Z_DIM latent channels
    make_tiny_vae(cfg.model.base, Z_DIM)
    first = prepare.run(cfg)
    files = list_shard_files(cfg.prepare.output)
    second = prepare.run(cfg)
    return {"cfg": cfg, "videos": videos, "first": first, "second": second, "files_after_first": files}


def shard_table(cfg, columns):
    """The prepared shards' ``columns``, in shard name order (the order read_shards returns rows in)."""
    import pyarrow as pa

    return pa.concat_tables([pq.read_table(path, columns=columns) for path in list_shard_files(cfg.prepare.output)])


def test_shards_hold_finite_latents_of_the_right_shape(run):
    cfg = run["cfg"]
    clips = read_shards(cfg.prepare.output)
    # the Wan VAE: 4x in time (1 + 4k frames), 8x in space
    assert clips.videos.shape == (9, Z_DIM, 2, 8, 8)
    assert clips.embeddings.shape == (9, cfg.model.tiny.text_max_length, cfg.model.tiny.text_dim)
    assert torch.isfinite(clips.videos).all() and clips.videos.std() > 0.01
    table = shard_table(cfg, ["key", "frames", "fps", "height", "width"])
    expected = {f"clip-{i:05d}" for i in range(12)} - set(BROKEN)
    assert set(table.column("key").to_pylist()) == expected
    assert set(table.column("frames").to_pylist()) == {5} and set(table.column("fps").to_pylist()) == {8.0}
    assert set(table.column("width").to_pylist()) == {64}
    captions = {key: json.loads((run["videos"] / f"{key}.json").read_text())["captions"][0] for key in expected}
    keys = table.column("key").to_pylist()
    assert clips.prompts == [captions[key] for key in keys]
    manifest = json.loads((Path(cfg.prepare.output) / "manifest.json").read_text())
    assert manifest["num_rows"] == 9 and manifest["video_shape"] == [Z_DIM, 2, 8, 8]
    assert run["first"]["written"] == 9 and run["first"]["skipped"] == 3


def test_broken_clips_are_in_the_skip_list_with_their_reasons(run):
    lines = (Path(run["cfg"].prepare.output) / "skipped.jsonl").read_text().splitlines()
    records = {r["key"]: r for r in map(json.loads, lines)}
    assert sorted(records) == sorted(BROKEN)
    for key, reason in BROKEN.items():
        assert records[key]["reason"].startswith(reason), records[key]
        assert records[key]["source"].endswith(f"{key}.mp4")
    assert records["clip-00007"]["reason"] == "too short: 2 frames at 8 fps, need 5"


def test_a_second_run_writes_nothing_new(run):
    second = run["second"]
    assert second["written"] == 0 and second["already_prepared"] == 9 and second["skipped"] == 3
    assert second["seconds"] == 0  # nothing left to do: no pipeline ran (skipped clips are not retried)
    assert list_shard_files(run["cfg"].prepare.output) == run["files_after_first"]


def test_latents_are_the_vae_posterior_mean_and_decode_to_the_clip_shape(run):
    cfg = run["cfg"]
    vae = load_vae(cfg.model.base)
    table = shard_table(cfg, ["key"])
    key = table.column("key")[0].as_py()
    clip = RawClip(key, "x", (run["videos"] / f"{key}.mp4").read_bytes(), "caption")
    pixels = load_clip(clip, ClipSize(5, 8.0, 64, 64))
    assert pixels.shape == (3, 5, 64, 64) and -1 <= float(pixels.min()) and float(pixels.max()) <= 1
    latents = encode_video(vae, pixels[None])
    # stored in bf16 (shard format 2): within bf16's rounding (2**-9 relative) of the fp32 latents
    torch.testing.assert_close(latents[0], read_shards(cfg.prepare.output).videos[0], rtol=2 ** -8, atol=1e-4)
    assert decode_latents(vae, latents).shape == (1, 3, 5, 64, 64)
    z = torch.randn(2, Z_DIM, 2, 8, 8)
    torch.testing.assert_close(denormalize_latents(normalize_latents(z, vae), vae), z)
    mean = torch.tensor(vae.config.latents_mean).view(1, Z_DIM, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, Z_DIM, 1, 1, 1)
    torch.testing.assert_close(normalize_latents(z, vae), (z - mean) / std)


# ----------------------------------------------------------------------------- inputs (no Ray)


def _clip_files(tmp_path, n=2):
    return write_clip_files(tmp_path / "src", sample_specs(n, 3), frames=5, height=16, width=16, fps=8)


def test_tar_shards_and_manifests_are_read_like_folders(tmp_path):
    paths = _clip_files(tmp_path)
    with tarfile.open(tmp_path / "part-0.tar", "w") as tar:
        for path in paths:
            for suffix in (".mp4", ".json"):
                tar.add(path.with_suffix(suffix), arcname=path.with_suffix(suffix).name)
    (tmp_path / "m.csv").write_text("video,caption,key\nsrc/clip-00000.mp4,a caption,first\n")
    (tmp_path / "m.jsonl").write_text(json.dumps({"video": str(paths[1]), "caption": "another"}) + "\n")
    items = list_sources([str(tmp_path / "part-0.tar"), str(tmp_path / "m.csv"), str(tmp_path / "m.jsonl")])
    clips = [clip for item in items for clip in iter_clips(item)]
    assert [(c.key, c.caption) for c in clips[:2]] == [
        (p.stem, json.loads(p.with_suffix(".json").read_text())["captions"][0]) for p in paths]
    assert clips[0].source.endswith("part-0.tar#clip-00000")
    assert [(c.key, c.caption) for c in clips[2:]] == [("first", "a caption"), ("clip-00001", "another")]
    done = [clip.key for item in items for clip in iter_clips(item, frozenset({"clip-00000", "first"}))]
    assert done == ["clip-00001", "clip-00001"]
    assert load_clip(clips[0], ClipSize(5, 8.0, 16, 16)).shape == (3, 5, 16, 16)


def test_clip_errors_name_the_file_and_a_short_reason(tmp_path):
    path = _clip_files(tmp_path, 1)[0]
    with pytest.raises(ClipError, match="clip-00000.mp4") as error:
        load_clip(RawClip("k", str(path), path.read_bytes()[:100], "c"), ClipSize(5, 8.0, 16, 16))
    assert error.value.reason.startswith("unreadable")
    with pytest.raises(ClipError) as error:
        load_clip(RawClip("k", str(path), path.read_bytes(), "c"), ClipSize(9, 8.0, 16, 16))
    assert error.value.reason == "too short: 5 frames at 8 fps, need 9"
    path.with_suffix(".json").write_text(json.dumps({"captions": []}))
    (error_or_clip,) = iter_clips(list_sources([str(path)])[0])
    assert isinstance(error_or_clip, ClipError) and error_or_clip.reason == "missing caption"
    with pytest.raises(ValueError, match="not a folder"):
        list_sources([str(tmp_path / "notes.txt")])


def test_resampling_picks_frames_by_time(tmp_path):
    """16 fps sources sampled at 8 fps keep every other frame; the crop keeps the centre."""
    from anyflow_ray.data.video import write_mp4

    video = np.full((3, 8, 16, 32), -1.0, dtype=np.float32)
    for t in range(8):
        video[:, t, :, 8:24] = -1 + t * 0.25  # brightness = frame number; the sides stay black
    write_mp4(tmp_path / "ramp.mp4", video, 16)
    clip = RawClip("ramp", "ramp.mp4", (tmp_path / "ramp.mp4").read_bytes(), "c")
    pixels = load_clip(clip, ClipSize(4, 8.0, 16, 16))
    brightness = pixels.mean(dim=(0, 2, 3))
    torch.testing.assert_close(brightness, torch.tensor([-1.0, -0.5, 0.0, 0.5]), atol=0.05, rtol=0)

