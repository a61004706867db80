"""Checkpoint folder bookkeeping (no Ray, no DeepSpeed): rotation, leftovers of a killed run, manifests."""

import json

import pytest
from safetensors.torch import save_file
import torch

from anyflow_ray.training import checkpoint as ckpt_io


def _fake_checkpoint(root, step, extra=b"x" * 10):
    ckpt = ckpt_io.step_dir(root, step)
    ckpt_io.save_rank_state(ckpt, 0, {"rng.torch": torch.get_rng_state()})
    (ckpt / "training_state" / "model").mkdir(parents=True, exist_ok=True)
    (ckpt / "training_state" / "model" / "blob.bin").write_bytes(extra)
    (ckpt / "transformer").mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.zeros(2)}, str(ckpt / "transformer" / "diffusion_pytorch_model.safetensors"))
    ckpt_io.save_meta(ckpt, {"format": ckpt_io.FORMAT, "step": step, "world_size": 1, "files": ckpt_io.manifest(ckpt)})
    return ckpt


def test_rotation_keeps_the_newest_up_to_latest_and_leaves_newer_leftovers(tmp_path):
    for step in (3, 6, 9, 12):
        ckpt_io.write_latest(tmp_path, _fake_checkpoint(tmp_path, step))
        ckpt_io.rotate(tmp_path, keep=2)
    names = lambda: sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))  # noqa: E731
    assert names() == ["step-000009", "step-000012"]
    # a killed run left step 15 unfinished; the run resumed from an older ``latest`` and saves step 10
    _fake_checkpoint(tmp_path, 15)
    ckpt_io.write_latest(tmp_path, ckpt_io.step_dir(tmp_path, 9))
    ckpt_io.write_latest(tmp_path, _fake_checkpoint(tmp_path, 10))
    assert [p.name for p in ckpt_io.rotate(tmp_path, keep=2)] == []  # 9 and 10 are the newest up to latest
    assert names() == ["step-000009", "step-000010", "step-000012", "step-000015"]
    assert ckpt_io.rotate(tmp_path, keep=1) == [ckpt_io.step_dir(tmp_path, 9)]


def test_an_unfinished_folder_is_cleared_but_never_the_one_latest_names(tmp_path):
    done = _fake_checkpoint(tmp_path, 2)
    ckpt_io.write_latest(tmp_path, done)
    stale = _fake_checkpoint(tmp_path, 4)
    ckpt_io.clear_unfinished(tmp_path, stale)
    ckpt_io.clear_unfinished(tmp_path, done)
    assert not stale.exists() and done.is_dir()


def test_the_manifest_catches_a_truncated_or_missing_file(tmp_path):
    ckpt = _fake_checkpoint(tmp_path, 1)
    assert ckpt_io.validate_checkpoint(ckpt, 1)["step"] == 1
    blob = ckpt / "training_state" / "model" / "blob.bin"
    blob.write_bytes(b"x" * 4)
    with pytest.raises(ckpt_io.CheckpointError, match=r"blob\.bin has 4 bytes, 10 were written"):
        ckpt_io.validate_checkpoint(ckpt, 1)
    blob.unlink()
    with pytest.raises(ckpt_io.CheckpointError, match=r"missing: .*blob\.bin"):
        ckpt_io.validate_checkpoint(ckpt, 1)
    meta = ckpt / "training_state" / "meta.json"
    meta.write_text(json.dumps({"step": 1, "world_size": 1}))  # written by the old (format 1) code
    with pytest.raises(ckpt_io.CheckpointError, match="format 1"):
        ckpt_io.validate_checkpoint(ckpt, 1)
