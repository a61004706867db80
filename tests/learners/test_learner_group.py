"""Real Ray actors running real DeepSpeed ranks (gloo on the CPU)."""

import math
import shutil
from pathlib import Path

import pytest
import torch

from anyflow_ray.checkpoint import CheckpointError, validate_checkpoint
from anyflow_ray.pipeline import AnyFlowPipeline
from learners.group import LearnerGroup, LearnerGroupError
from tests.learners.conftest import run_cfg


def _train(group, steps):
    return [group.run("train_step", s)[0]["loss"] for s in steps]


def test_one_and_two_ranks_take_the_same_stage1_step(ray_local, prepared_run, tmp_path):
    """2 ranks x 4 clips and 1 rank x 8 clips: same losses, same weights after two optimizer steps."""
    results = {}
    for ranks in (1, 2):
        group = LearnerGroup(run_cfg(prepared_run, f"learner.num_ranks={ranks}"), "stage1")
        try:
            assert [i["rank"] for i in group.info] == list(range(ranks))
            steps = [group.run("train_step", s) for s in (0, 1)]
            group.run_on(0, "export_pipeline", str(tmp_path / f"r{ranks}"))
        finally:
            group.shutdown()
        # every rank reports the same (global) loss and gradient norm
        for step in steps:
            assert {(r["loss"], r["grad_norm"]) for r in step} == {(step[0]["loss"], step[0]["grad_norm"])}
        results[ranks] = [x for r in steps for x in (r[0]["loss"], r[0]["grad_norm"])]
    assert all(norm > 0 and math.isfinite(norm) for norm in results[1][1::2])
    assert results[1] == pytest.approx(results[2], rel=1e-4)
    one = AnyFlowPipeline.from_pretrained(tmp_path / "r1").transformer.state_dict()
    two = AnyFlowPipeline.from_pretrained(tmp_path / "r2").transformer.state_dict()
    for name in one:
        assert torch.allclose(one[name], two[name], rtol=1e-4, atol=1e-6), name


def test_resume_reproduces_the_next_losses(ray_local, prepared_run, tmp_path):
    # the paper's data target here (the tiny config's teacher target runs in the test above)
    cfg = run_cfg(prepared_run, "learner.num_ranks=1", "pretrain.target=data")
    group = LearnerGroup(cfg, "stage1")
    try:
        straight = _train(group, range(5))
    finally:
        group.shutdown()

    out = tmp_path / "resumed"
    group = LearnerGroup(cfg, "stage1")
    try:
        assert group.run("load_latest", str(out))[0] == 0  # nothing to resume yet
        first = _train(group, range(3))
        group.run("save", str(out), 3)
    finally:
        group.shutdown()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000003"
    assert (out / "checkpoints" / "step-000003" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    AnyFlowPipeline.from_pretrained(out / "checkpoints" / "step-000003")  # a loadable pipeline

    group = LearnerGroup(cfg, "stage1")
    try:
        start = group.run("load_latest", str(out))[0]
        assert start == 3
        rest = _train(group, range(3, 5))
    finally:
        group.shutdown()
    assert first == pytest.approx(straight[:3], rel=1e-6)
    assert rest == pytest.approx(straight[3:], rel=1e-6)
    assert all(math.isfinite(x) for x in straight)


def test_corrupt_or_incomplete_checkpoints_are_refused(ray_local, prepared_run, tmp_path):
    cfg = run_cfg(prepared_run, "learner.num_ranks=1")
    out = tmp_path / "ckpt"
    group = LearnerGroup(cfg, "teacher")
    try:
        _train(group, [0])
        ckpt = group.run("save", str(out), 1)[0]
        state = f"{ckpt}/training_state/rank-00000.safetensors"
        shutil.copy(state, tmp_path / "good")
        with open(state, "wb") as f:
            f.write(b"\x80\x04 a pickle, not safetensors")
        with pytest.raises(LearnerGroupError, match="rank-00000.safetensors.*not a valid safetensors"):
            group.run("load_latest", str(out))
        shutil.copy(tmp_path / "good", state)
        with pytest.raises(CheckpointError, match=r"written by 1 ranks; this run has 2 .*learner\.num_ranks=1"):
            validate_checkpoint(Path(ckpt), world_size=2)  # a resume with another group size
        (out / "checkpoints" / "step-000001" / "training_state" / "meta.json").unlink()
        with pytest.raises(LearnerGroupError, match="missing training_state/meta.json"):
            group.run("load_latest", str(out))
    finally:
        group.shutdown()


def test_a_rank_that_dies_fails_the_group_with_its_rank_named(ray_local, prepared_run):
    import ray

    group = LearnerGroup(run_cfg(prepared_run, "learner.num_ranks=2"), "teacher")
    try:
        _train(group, [0])
        ray.kill(group.workers[1], no_restart=True)
        with pytest.raises(LearnerGroupError, match="rank 1 died"):
            group.run("train_step", 1)
    finally:
        group.shutdown()


def test_a_rank_that_cannot_start_fails_with_a_clear_error(ray_local, prepared_run, tmp_path):
    cfg = run_cfg(prepared_run, "learner.num_ranks=1", f"pretrain.init={tmp_path}/no-such-teacher")
    with pytest.raises(LearnerGroupError, match="no-such-teacher"):
        LearnerGroup(cfg, "stage1")
