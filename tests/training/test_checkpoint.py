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


def _overwrite_same_size(path, offset=64, size=4096):
    data = bytearray(path.read_bytes())
    size = min(size, len(data) - offset)
    data[offset:offset + size] = bytes(b ^ 0xFF for b in data[offset:offset + size])
    path.write_bytes(bytes(data))


def test_a_same_size_overwrite_is_caught_by_its_hash_and_the_previous_checkpoint_resumed(tmp_path):
    for step in (2, 4):
        ckpt_io.write_latest(tmp_path, _fake_checkpoint(tmp_path, step, extra=bytes(range(256)) * 40))
    files = ckpt_io.read_meta(ckpt_io.step_dir(tmp_path, 4))["files"]
    assert files["model/blob.bin"]["bytes"] == 10240 and len(files["model/blob.bin"]["sha256"]) == 64
    blob = ckpt_io.step_dir(tmp_path, 4) / "training_state" / "model" / "blob.bin"
    _overwrite_same_size(blob)
    with pytest.raises(ckpt_io.CheckpointError, match=r"blob\.bin does not match the SHA-256"):
        ckpt_io.validate_checkpoint(ckpt_io.step_dir(tmp_path, 4), 1)
    ckpt, meta, damaged, warning = ckpt_io.choose_resume(tmp_path, 1)
    assert ckpt == ckpt_io.step_dir(tmp_path, 2) and meta["step"] == 2 and damaged == [ckpt_io.step_dir(tmp_path, 4)]
    assert "step-000004 is damaged" in warning and "blob.bin" in warning and "resuming from step-000002" in warning
    moved = ckpt_io.settle_resume(tmp_path, ckpt, damaged)
    assert [p.name for p in moved] == ["step-000004.damaged"] and moved[0].is_dir()  # kept, out of the way
    assert ckpt_io.find_latest(tmp_path) == ckpt
    assert ckpt_io.choose_resume(tmp_path, 1)[3] is None  # from here on an ordinary resume
    # every checkpoint damaged: refused, naming each
    _overwrite_same_size(ckpt_io.rank_file(ckpt, 0), offset=200, size=8)
    with pytest.raises(ckpt_io.CheckpointError, match=r"no intact checkpoint .*step-000002: .*rank-00000"):
        ckpt_io.choose_resume(tmp_path, 1)


def test_a_missing_latest_resumes_the_newest_intact_step_folder_never_step_0(tmp_path):
    for step in (3, 6):
        ckpt_io.write_latest(tmp_path, _fake_checkpoint(tmp_path, step))
    torn = ckpt_io.step_dir(tmp_path, 9) / "training_state"  # a save killed before its meta.json
    torn.mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest").unlink()
    ckpt, meta, damaged, warning = ckpt_io.choose_resume(tmp_path, 1)
    assert ckpt.name == "step-000006" and damaged == [] and "latest is missing" in warning
    (tmp_path / "checkpoints" / "latest").write_text("step-000012\n")  # names a folder that is gone
    assert ckpt_io.choose_resume(tmp_path, 1)[0].name == "step-000006"
    # a checkpoint of another number of ranks is refused, not skipped
    with pytest.raises(ckpt_io.CheckpointError, match="written by 1 ranks; this run has 2"):
        ckpt_io.choose_resume(tmp_path, 2)
    assert ckpt_io.choose_resume(tmp_path / "empty", 1) == (None, None, [], None)


def test_ranks_agree_on_the_checkpoint_when_only_one_of_them_sees_damage(tmp_path):
    """Each rank checks the files it wrote; the gathered answers make every rank skip the same checkpoint."""
    for step in (1, 2):
        ckpt = _fake_checkpoint(tmp_path, step)
        ckpt_io.save_rank_state(ckpt, 1, {"rng.torch": torch.get_rng_state()})
        meta = ckpt_io.read_meta(ckpt)
        ckpt_io.save_meta(ckpt, {**meta, "world_size": 2, "files": ckpt_io.manifest(ckpt)})
        ckpt_io.write_latest(tmp_path, ckpt)
    _overwrite_same_size(ckpt_io.rank_file(ckpt_io.step_dir(tmp_path, 2), 1), offset=100, size=8)
    meta = ckpt_io.read_meta(ckpt_io.step_dir(tmp_path, 2))
    assert ckpt_io.damage(ckpt_io.step_dir(tmp_path, 2), meta, rank=0) is None  # rank 0's files are fine
    candidates = ckpt_io.resume_candidates(tmp_path)[0]
    said = {rank: [ckpt_io.damage(c, ckpt_io.read_meta(c), rank) for c in candidates] for rank in (0, 1)}
    for rank in (0, 1):  # each rank's all-gather returns both ranks' answers for the candidate at hand
        gathered = iter(zip(said[0], said[1]))
        chosen = ckpt_io.choose_resume(tmp_path, 2, rank, agree=lambda p: list(next(gathered)))
        assert chosen[0].name == "step-000001" and "rank-00001" in chosen[3]
