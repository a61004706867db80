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


def test_every_file_deepspeed_names_per_rank_is_uploaded_by_that_rank():
    """The names come from DeepSpeed's own naming methods (fp32 and bf16 ZeRO partitions, ZeRO-3 model
    states, the rank-0 model states), so a DeepSpeed rename fails here rather than on a multi-node resume."""
    from types import SimpleNamespace

    from deepspeed.runtime.engine import DeepSpeedEngine

    def names(rank: int, bf16: bool, zero3: bool) -> list[str]:
        engine = SimpleNamespace(checkpoint_mp_rank=0, zero_optimization_partition_weights=lambda: zero3)
        engine._get_zero_ckpt_prefix = lambda dp_rank, bf16_mode: DeepSpeedEngine._get_zero_ckpt_prefix(
            engine, dp_rank, bf16_mode)
        optim = DeepSpeedEngine._get_rank_zero_ckpt_name(engine, "ckpt", "tag", 0, rank, bf16)
        model = DeepSpeedEngine._get_ckpt_name(engine, "ckpt", "tag", pp_placeholder=rank)
        return [optim.split("/")[-1], model.split("/")[-1]]

    for rank in (0, 1, 3, 12):
        for bf16 in (False, True):
            optim, model = names(rank, bf16, zero3=False)
            assert ckpt_io.writer_rank(optim) == rank, optim
            assert ckpt_io.writer_rank(model) == 0, model  # mp_rank_00_model_states.pt: rank 0's
            assert [ckpt_io.writer_rank(name) for name in names(rank, bf16, zero3=True)] == [rank, rank]
    assert "bf16_zero_pp_rank_3_mp_rank_00_optim_states.pt" in names(3, True, False)  # the name the issue saw
    assert ckpt_io.writer_rank("rank-00012.safetensors") == 12
    assert ckpt_io.writer_rank("meta.json") == 0 and ckpt_io.writer_rank("diffusion_pytorch_model.safetensors") == 0
