"""`prepare` in bounded memory: a long clip at 4x the output size and a tar shard of 50 clips decode holding
about one output clip; the job shuffles its shards, splits off an exact held-out fraction, writes c_null,
sizes its pools from the cluster's GPUs and keeps a bf16 VAE only within its tolerance."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from anyflow_ray.data.video import stable_seed
from anyflow_ray.run.config import load_config

SIZE = dict(frames=5, fps=8.0, height=32, width=32)


def ffmpeg() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def test_clip(path: Path, width: int, height: int, seconds: float, fps: int = 16, pattern: str = "testsrc2") -> Path:
    """An H.264 mp4 of ffmpeg's moving test pattern, made by ffmpeg itself (no frame in Python)."""
    subprocess.run([ffmpeg(), "-v", "error", "-y", "-f", "lavfi", "-i", f"{pattern}=size={width}x{height}:rate={fps}",
                    "-t", str(seconds), "-pix_fmt", "yuv420p", "-c:v", "libx264", "-preset", "ultrafast", str(path)],
                   check=True)
    return path


test_clip.__test__ = False


@pytest.fixture(scope="module")
def tar_of_clips(tmp_path_factory):
    """A tar shard of 50 captioned 64x48 one-second clips, plus a truncated clip and one without caption."""
    folder = tmp_path_factory.mktemp("tar")
    src = test_clip(folder / "src.mp4", 64, 48, 4.0)
    tar_path = folder / "clips.tar"
    with tarfile.open(tar_path, "w") as tar:
        for i in range(52):
            key = f"clip-{i:03d}"
            start = (i % 3) * 0.5  # clips that differ: cut at other times of the pattern
            clip = folder / f"{key}.mp4"
            subprocess.run([ffmpeg(), "-v", "error", "-y", "-ss", str(start), "-i", str(src), "-t", "1", "-c:v",
                            "libx264", "-preset", "ultrafast", str(clip)], check=True)
            if i == 50:
                clip.write_bytes(clip.read_bytes()[:200])
            tar.add(clip, arcname=clip.name)
            if i != 51:
                caption = folder / f"{key}.json"
                caption.write_text(json.dumps({"captions": [f"test pattern number {i}"]}))
                tar.add(caption, arcname=caption.name)
    return tar_path


MEASURE = """
import json, sys, tracemalloc
import torch
torch.set_num_threads(1)
from anyflow_ray.data.video import ClipSize, RawClip, decode_clip, list_sources
from anyflow_ray.jobs.prepare_stages import decode_rows

def hwm_kib():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])

mode, path, size = sys.argv[1], sys.argv[2], ClipSize(*json.loads(sys.argv[3]))
if mode == "clip":  # imports and first-call allocations before the measurement
    decode_clip(RawClip("warm", path, b"", "c", path=path), size)
else:
    next(iter(decode_rows(list_sources([path])[0], size, lambda records: None)))
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) restarts from the current size
base = hwm_kib()
tracemalloc.start()
skipped, clips, output = [], 0, 0
if mode == "clip":
    pixels, _ = decode_clip(RawClip("k", path, b"", "c", path=path), size)
    clips, output = 1, pixels.nbytes
    del pixels
else:  # the decode task body over one tar shard's clips, consumed one at a time as Ray Data does
    (item,) = list_sources([path])
    for row in decode_rows(item, size, skipped.extend):
        clips, output = clips + 1, row["pixels"].nbytes
        del row
peak = tracemalloc.get_traced_memory()[1]
print(json.dumps({"clips": clips, "skipped": len(skipped), "output_bytes": output, "python_peak_bytes": peak,
                  "rss_growth_kib": hwm_kib() - base}))
"""


def measure(mode: str, path: Path, size: dict) -> dict:
    args = [size["frames"], size["fps"], size["height"], size["width"]]
    done = subprocess.run([sys.executable, "-c", MEASURE, mode, str(path), json.dumps(args)], check=True,
                          capture_output=True, text=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(mode, path.name, result)
    return result


def test_a_long_clip_at_4x_the_output_resolution_decodes_holding_only_the_output(tmp_path):
    """1024x1024 source, 5 s at 16 fps; out: 33 frames at 8 fps, 256x256 (6.2 MiB of uint8). The decoder before
    kept the 65 source frames up to the last one needed (195 MiB) and a float32 copy of 33 of them at full
    size (396 MiB). Bound: Python-side arrays at most the output + 256 KiB; the process's peak resident size
    grows by at most the output + 24 MiB (ffmpeg decodes in its own process)."""
    source = test_clip(tmp_path / "long.mp4", 1024, 1024, 5.0)
    size = dict(frames=33, fps=8.0, height=256, width=256)
    got = measure("clip", source, size)
    output = 3 * 33 * 256 * 256
    assert got["clips"] == 1 and got["output_bytes"] == output
    assert got["python_peak_bytes"] <= output + 256 * 1024, got
    assert got["rss_growth_kib"] * 1024 <= output + 24 * 2 ** 20, got


def test_a_tar_shard_of_50_clips_is_decoded_one_clip_at_a_time(tar_of_clips, tmp_path):
    """The tar shard is indexed from its headers and each member copied to a temporary file when decoded:
    Python holds one clip's output (and the index) at a time, as for a tar of 5 clips."""
    few = tmp_path / "few.tar"
    with tarfile.open(tar_of_clips) as whole, tarfile.open(few, "w") as part:
        for member in whole.getmembers()[:10]:
            part.addfile(member, whole.extractfile(member))
    many, five = measure("tar", tar_of_clips, SIZE), measure("tar", few, SIZE)
    clip_bytes = 3 * 5 * 32 * 32
    assert (many["clips"], many["skipped"]) == (50, 2) and (five["clips"], five["skipped"]) == (5, 0)
    assert many["output_bytes"] == clip_bytes
    assert many["python_peak_bytes"] <= 2 * clip_bytes + 256 * 1024, many
    assert many["python_peak_bytes"] <= five["python_peak_bytes"] + 64 * 1024, (many, five)


# ----------------------------------------------------------------------------- the job (Ray)

Z_DIM = 4


@pytest.fixture(scope="module")
def prepared(ray_module, tar_of_clips, tmp_path_factory):
    from anyflow_ray.data.encode import make_tiny_vae
    from anyflow_ray.jobs import prepare
    from anyflow_ray.models.loading import make_tiny

    root = tmp_path_factory.mktemp("prepared")
    cfg = load_config("configs/tiny.yaml", [
        f"run.output_dir={root}", "data.frames=5", "data.fps=8", "data.height=32", "data.width=32",
        "data.shard_size=8", "data.row_group_size=4", "model.tiny.num_layers=1", "model.tiny.ffn_dim=32",
        "run.threads=1", "prepare.decode_cpus=0.25", "prepare.actor_cpus=0.25", "prepare.vae_batch_size=4",
        "prepare.clips_per_block=8", "prepare.heldout_fraction=0.2", f"prepare.input=[{tar_of_clips}]",
        "model.negative_prompt=a still picture"])
    make_tiny(cfg.model.base, cfg.model.tiny, channels=Z_DIM)
    make_tiny_vae(cfg.model.base, Z_DIM)
    return cfg, prepare.run(cfg)


def keys_in_order(folder) -> list[str]:
    from anyflow_ray.data.shards import list_shard_files

    files = list_shard_files(folder)
    return pa.concat_tables([pq.read_table(p, columns=["key"]) for p in files]).column("key").to_pylist()


def test_the_heldout_split_has_its_exact_share_and_no_clip_of_train(prepared):
    from anyflow_ray.jobs.prepare import heldout_keys

    cfg, summary = prepared
    listed = [f"clip-{i:03d}" for i in range(51)]  # clip-051 has no caption: never a work item
    expected = heldout_keys(listed, 0.2) - {"clip-050"}  # clip-050 is the truncated one
    assert len(heldout_keys(listed, 0.2)) == round(0.2 * 51) == 10
    assert heldout_keys(listed, 0.2) == set(sorted(listed, key=stable_seed)[:10])
    train, heldout = keys_in_order(cfg.prepare.output), keys_in_order(cfg.prepare.heldout_output)
    assert set(heldout) == expected and len(heldout) == len(expected)
    assert not set(train) & set(heldout) and len(train) == len(set(train))
    assert set(train) | set(heldout) == {f"clip-{i:03d}" for i in range(50)}
    assert (summary["written"], summary["skipped"], summary["heldout_total"]) == (50, 2, len(expected))
    skips = {json.loads(line)["key"]: json.loads(line)["reason"]
             for line in (Path(cfg.prepare.output) / "skipped.jsonl").read_text().splitlines()}
    assert skips["clip-051"] == "missing caption" and skips["clip-050"].startswith("unreadable")


def test_shards_are_written_in_shuffled_order_not_the_input_order(prepared):
    from anyflow_ray.jobs.prepare import shuffled

    cfg, _ = prepared
    train = keys_in_order(cfg.prepare.output)
    ranks = [int(key.rsplit("-", 1)[1]) for key in train]
    assert ranks != sorted(ranks) and ranks != sorted(ranks, reverse=True)
    rank_correlation = np.corrcoef(np.argsort(np.argsort(ranks)), np.arange(len(ranks)))[0, 1]
    assert abs(rank_correlation) < 0.6, ranks  # the input order would be 1.0
    items = [{"key": str(i)} for i in range(100)]
    assert shuffled(items, 3) == shuffled(items, 3) != shuffled(items, 4)
    assert sorted(int(i["key"]) for i in shuffled(items, 3)) == list(range(100))


def test_prepare_writes_c_null_beside_the_shards_and_a_second_run_keeps_it(prepared):
    from anyflow_ray.data.uncond import read_uncond
    from anyflow_ray.models.loading import load_text_encoder, text_max_length
    from anyflow_ray.models.text import encode_prompts

    cfg, summary = prepared
    stored, meta = read_uncond(cfg.data.root)
    assert summary["c_null"] == str(Path(cfg.data.root).absolute() / "c_null.safetensors")
    tokenizer, encoder = load_text_encoder(cfg.model.base)
    expected = encode_prompts(tokenizer, encoder, ["a still picture"], text_max_length(cfg.model.base))
    torch.testing.assert_close(stored, expected)  # the text actor's precision (fp32 on the CPU)
    assert meta["prompt"] == "a still picture"
    shard = next(Path(cfg.prepare.output).glob("shard-*.parquet"))
    assert list(stored.shape[1:]) == pq.read_table(shard, columns=["embedding_shape"]).column(0)[0].as_py()


def test_pool_sizes_come_from_the_cluster_gpus_with_auto():
    from anyflow_ray.jobs.prepare_stages import pool_sizes

    wan = load_config("configs/wan2.1-t2v-1.3b.yaml")
    assert (wan.prepare.vae_concurrency, wan.prepare.text_concurrency) == ("auto", "auto")
    assert pool_sizes(wan, 64) == (62, 2) and pool_sizes(wan, 8) == (7, 1) and pool_sizes(wan, 0) == (1, 1)
    fixed = load_config("configs/wan2.1-t2v-1.3b.yaml", ["prepare.vae_concurrency=3", "prepare.text_concurrency=2"])
    assert pool_sizes(fixed, 64) == (3, 2)
    half = load_config("configs/wan2.1-t2v-1.3b.yaml", ["prepare.vae_gpus=0.5"])
    assert pool_sizes(half, 8) == (14, 1)
    assert pool_sizes(load_config("configs/tiny.yaml"), 0) == (1, 1)


@pytest.fixture(scope="module")
def vae_clip(tmp_path_factory):
    from anyflow_ray.data.encode import make_tiny_vae
    from anyflow_ray.data.video import ClipSize, RawClip, decode_clip

    base = tmp_path_factory.mktemp("vae")
    make_tiny_vae(base, Z_DIM)
    source = test_clip(base / "clip.mp4", 96, 64, 2.0)
    pixels, _ = decode_clip(RawClip("k", str(source), b"", "c", path=str(source)), ClipSize(9, 8.0, 64, 64))
    return base, pixels


def test_bf16_vae_latents_are_within_the_stated_tolerance_of_fp32(vae_clip):
    """Measured on the tiny random VAE on the CPU (a 9 x 64 x 64 test-pattern clip): the relative RMS error
    of bf16 latents against fp32 is printed; prepare keeps bf16 only below BF16_VAE_TOLERANCE (1%)."""
    from anyflow_ray.data.encode import encode_video, load_vae
    from anyflow_ray.data.video import to_model_range
    from anyflow_ray.jobs.prepare_stages import BF16_VAE_TOLERANCE, relative_error

    base, pixels = vae_clip
    x = to_model_range(pixels)[None]
    exact = encode_video(load_vae(base), x)
    approx = encode_video(load_vae(base, dtype=torch.bfloat16), x)
    error, worst = relative_error(approx, exact), float((approx - exact).abs().max() / exact.abs().max())
    print(f"bf16 VAE vs fp32: relative RMS error {error:.2e}, max abs error / max |z| {worst:.2e}")
    assert approx.dtype == torch.float32 and error <= BF16_VAE_TOLERANCE


def test_a_vae_actor_keeps_bf16_only_within_tolerance(ray_module, vae_clip, monkeypatch):
    from anyflow_ray.data.encode import encode_video, load_vae
    from anyflow_ray.data.video import to_model_range
    from anyflow_ray.jobs import prepare_stages

    base, pixels = vae_clip
    cfg = load_config("configs/tiny.yaml", [f"model.base={base}", "data.frames=9", "data.height=64",
                                            "data.width=64", "prepare.vae_dtype=bf16", "run.threads=1"])
    exact = encode_video(load_vae(base), to_model_range(pixels)[None])
    for tolerance, kept in ((1.0, torch.bfloat16), (0.0, torch.float32)):
        monkeypatch.setattr(prepare_stages, "BF16_VAE_TOLERANCE", tolerance)
        stage = prepare_stages.VaeStage(cfg)
        first = stage({"pixels": [pixels], "key": np.array(["k"])})["latents"]
        second = stage({"pixels": [pixels], "key": np.array(["k"])})["latents"]
        assert stage.vae.dtype == kept and stage.vae_bf16 is None
        torch.testing.assert_close(torch.from_numpy(first), exact)  # the checked batch: fp32's latents
        if kept == torch.float32:
            torch.testing.assert_close(torch.from_numpy(second), exact)
    fp32 = prepare_stages.VaeStage(load_config("configs/tiny.yaml", [f"model.base={base}", "data.frames=9",
                                                                      "data.height=64", "data.width=64"]))
    assert fp32.vae.dtype == torch.float32 and fp32.vae_bf16 is None  # auto on the CPU: fp32, no check
