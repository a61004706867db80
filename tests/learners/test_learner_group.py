"""Real Ray actors running real DeepSpeed ranks (gloo on the CPU)."""

import json
import logging
import math
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from anyflow_ray.training.checkpoint import CheckpointError, validate_checkpoint
from anyflow_ray.pipeline import AnyFlowRayPipeline
from anyflow_ray.training.export import export_checkpoint, export_complete
from learners.group import LearnerGroup, LearnerGroupError
from learners.ranks import every_rank, rank_zero
from learners.worker import LearnerWorker
from tests.probes import run_cfg


def _train(group, steps):
    return [group.call("train_step", s)[0]["loss"] for s in steps]


def test_one_and_two_ranks_take_the_same_stage1_step(ray_local, prepared_run, tmp_path):
    """2 ranks x 4 clips and 1 rank x 8 clips: same losses, same weights after two optimizer steps.
    With gradient accumulation (DeepSpeed's, learner.grad_accum=2) 2 ranks x 2 micro-steps of 2 clips take
    the same step (the objective's own equality: tests/training/test_losses.py)."""
    results = {}
    for ranks, accum in ((1, 1), (2, 1), (2, 2)):
        group = LearnerGroup(run_cfg(prepared_run, f"learner.num_ranks={ranks}", f"learner.grad_accum={accum}"),
                             "pretrain")
        try:
            assert [i["rank"] for i in group.info] == list(range(ranks))
            steps = [group.call("train_step", s) for s in (0, 1)]
            group.call("export_pipeline", str(tmp_path / f"r{ranks}a{accum}"))
            if accum == 1:  # a method says where it runs: every rank (a list) or rank 0 (its result)
                assert len(group.submit("checkpoint_meta", str(tmp_path / "none"))) == 1
                assert group.call("checkpoint_meta", str(tmp_path / "none")) is None  # rank 0's answer
                with pytest.raises(TypeError, match="LearnerWorker.checkpoint_engines does not declare where it runs"):
                    group.call("checkpoint_engines")
                with pytest.raises(AttributeError, match="has no method 'no_such_method'"):
                    group.submit("no_such_method")
        finally:
            group.shutdown()
        # every rank reports the same (global) loss and gradient norm
        for step in steps:
            assert {(r["loss"], r["grad_norm"]) for r in step} == {(step[0]["loss"], step[0]["grad_norm"])}
        results[ranks, accum] = [x for r in steps for x in (r[0]["loss"], r[0]["grad_norm"])]
    assert all(norm > 0 and math.isfinite(norm) for norm in results[1, 1][1::2])
    assert results[1, 1] == pytest.approx(results[2, 1], rel=1e-4)
    assert results[1, 1] == pytest.approx(results[2, 2], rel=1e-4)

    def weights(name):
        return AnyFlowRayPipeline.from_pretrained(tmp_path / name).transformer.state_dict()

    one = weights("r1a1")
    for other in ("r2a1", "r2a2"):
        theirs = weights(other)
        for name in one:
            assert torch.allclose(one[name], theirs[name], rtol=1e-4, atol=1e-6), (other, name)


@pytest.mark.parametrize("precision, ranks", [("fp32", 2), ("bf16", 1)])
def test_resume_reproduces_the_next_losses(ray_local, prepared_run, tmp_path, precision, ranks):
    """ZeRO-2 through DeepSpeed's own checkpoints: 5 steps straight = 3 steps, save, a new group, 2 more.
    Saving after every step with run.keep_checkpoints=2 keeps exactly the last two checkpoints."""
    # the paper's data target here (the tiny config's teacher target runs in the test above)
    cfg = run_cfg(prepared_run, f"learner.num_ranks={ranks}", "pretrain.target=data", "learner.zero_stage=2",
                  f"run.precision={precision}", "run.keep_checkpoints=2")
    group = LearnerGroup(cfg, "pretrain")
    try:
        assert group.info[0]["dtype"] == {"fp32": "torch.float32", "bf16": "torch.bfloat16"}[precision]
        straight = _train(group, range(5))
    finally:
        group.shutdown()

    out = tmp_path / "resumed"
    group = LearnerGroup(cfg, "pretrain")
    try:
        assert group.call("load_latest", str(out))[0] == 0  # nothing to resume yet
        first = []
        for step in range(3):
            first += _train(group, [step])
            group.call("save", str(out), step + 1)
        group.call("export_pipeline", str(tmp_path / "live"), 3)
    finally:
        group.shutdown()
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-000002", "step-000003"]
    assert (checkpoints / "latest").read_text().strip() == "step-000003"
    ckpt = checkpoints / "step-000003"
    assert sorted(p.name for p in ckpt.iterdir()) == ["training_state"]  # the trainable state, no pipeline
    # the checkpoint alone (no Ray, no DeepSpeed) rebuilds the model the learners exported, in their dtype
    export_checkpoint(ckpt, tmp_path / "offline")
    live = AnyFlowRayPipeline.from_pretrained(tmp_path / "live").transformer.state_dict()
    offline = AnyFlowRayPipeline.from_pretrained(tmp_path / "offline").transformer.state_dict()
    assert sorted(live) == sorted(offline) and all(torch.equal(live[n], offline[n]) for n in live)
    stored = load_file(tmp_path / "offline" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in stored.values()} == {{"fp32": torch.float32, "bf16": torch.bfloat16}[precision]}
    assert export_complete(tmp_path / "offline", 3) and export_complete(tmp_path / "live", 3)
    files = json.loads((ckpt / "training_state" / "meta.json").read_text())["files"]
    bf16 = "bf16_" if precision == "bf16" else ""
    assert {"model/mp_rank_00_model_states.pt", *(f"model/{bf16}zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
                                                  for r in range(ranks))} <= set(files)

    group = LearnerGroup(cfg, "pretrain")
    try:
        start = group.call("load_latest", str(out))[0]
        assert start == 3
        rest = _train(group, range(3, 5))
    finally:
        group.shutdown()
    assert first == pytest.approx(straight[:3], rel=1e-6)
    assert rest == pytest.approx(straight[3:], rel=1e-6)
    assert all(math.isfinite(x) for x in straight)


def test_corrupt_or_incomplete_checkpoints_are_refused(ray_local, prepared_run, tmp_path):
    cfg = run_cfg(prepared_run, "learner.num_ranks=1", "learner.zero_stage=1")
    out = tmp_path / "ckpt"
    group = LearnerGroup(cfg, "teacher")
    try:
        _train(group, [0])
        ckpt = Path(group.call("save", str(out), 1)[0])
        state = ckpt / "training_state"
        model_states = state / "model" / "mp_rank_00_model_states.pt"
        shutil.copy(model_states, tmp_path / "good")
        model_states.write_bytes(b"\x80\x04 a bare pickle, not a torch zip")
        with pytest.raises(LearnerGroupError, match="mp_rank_00_model_states.pt is not a valid torch checkpoint"):
            group.call("load_latest", str(out))
        shutil.copy(tmp_path / "good", model_states)
        rank_state = state / "rank-00000.safetensors"
        rank_state.write_bytes(rank_state.read_bytes()[:-4])  # truncated
        with pytest.raises(LearnerGroupError, match="rank-00000.safetensors (is not a valid safetensors|has)"):
            group.call("load_latest", str(out))
        (state / "model" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
        with pytest.raises(CheckpointError, match="missing: .*zero_pp_rank_0_mp_rank_00_optim_states.pt"):
            validate_checkpoint(ckpt, world_size=1)
        with pytest.raises(CheckpointError, match=r"written by 1 ranks; this run has 2 .*learner\.num_ranks=1"):
            validate_checkpoint(ckpt, world_size=2)  # a resume with another group size
        (state / "meta.json").unlink()
        with pytest.raises(LearnerGroupError, match="missing training_state/meta.json"):
            group.call("load_latest", str(out))
    finally:
        group.shutdown()


def _flip(path, offset, size=4096):
    """A same-size overwrite in the middle of a file (what a size check cannot see)."""
    data = bytearray(path.read_bytes())
    offset = min(offset, len(data) // 2)
    data[offset:offset + size] = bytes(b ^ 0x5A for b in data[offset:offset + size])
    path.write_bytes(bytes(data))


def test_a_same_size_overwrite_of_the_ema_or_optimizer_falls_back_to_the_previous_checkpoint(
        ray_local, prepared_run, tmp_path):
    """2 ranks, ZeRO-2: rank 0's EMA file and rank 1's optimizer partition of the newest checkpoint are
    overwritten in place; every rank resumes the step before, bit-equal to a clean resume of it."""
    cfg = run_cfg(prepared_run, "learner.num_ranks=2", "learner.zero_stage=2", "run.keep_checkpoints=3")
    out = tmp_path / "run"
    group = LearnerGroup(cfg, "pretrain")
    try:
        for step in range(3):
            _train(group, [step])
            group.call("save", str(out), step + 1)
        clean = _train(group, [3])
        state = out / "checkpoints" / "step-000003" / "training_state"
        _flip(state / "rank-00000.safetensors", 4096)
        _flip(state / "model" / "zero_pp_rank_1_mp_rank_00_optim_states.pt", 2048)
        assert group.call("load_latest", str(out)) == [2, 2]
        warning = group.call("resume_report")
        assert "step-000003 is damaged" in warning and "rank-00000.safetensors does not match the SHA-256" in warning
        assert "resuming from step-000002" in warning
        assert (out / "checkpoints" / "latest").read_text().strip() == "step-000002"
        assert (out / "checkpoints" / "step-000003.damaged").is_dir()  # kept for a look, never resumed
        again = _train(group, [2, 3])
        group.call("save", str(out), 4)  # saved into a clean folder
        assert group.call("load_latest", str(out)) == [4, 4] and group.call("resume_report") is None
    finally:
        group.shutdown()
    assert again[1] == clean[0]  # the steps after the fallback are the ones a clean run takes


def test_a_rank_that_dies_fails_the_group_with_its_rank_named(ray_local, prepared_run):
    import ray

    group = LearnerGroup(run_cfg(prepared_run, "learner.num_ranks=2"), "teacher")
    try:
        _train(group, [0])
        ray.kill(group.workers[1], no_restart=True)
        with pytest.raises(LearnerGroupError, match="rank 1 died"):
            group.call("train_step", 1)
    finally:
        group.shutdown()


def test_a_rank_that_cannot_start_fails_with_a_clear_error(ray_local, prepared_run, tmp_path):
    cfg = run_cfg(prepared_run, "learner.num_ranks=1", f"pretrain.init={tmp_path}/no-such-teacher")
    with pytest.raises(LearnerGroupError, match="no-such-teacher"):
        LearnerGroup(cfg, "pretrain")


def test_an_override_keeps_the_declaration_of_the_method_it_overrides():
    from learners.distill import DistillWorker
    from learners.ranks import EVERY_RANK, RANK_ZERO, runs_on

    class Probe(DistillWorker):
        def train_step(self, step, generator_refs=(), critic_refs=()):  # no decorator: DistillWorker's holds
            return super().train_step(step, generator_refs, critic_refs)

    assert runs_on(Probe, "train_step") == EVERY_RANK and runs_on(Probe, "save") == EVERY_RANK
    assert runs_on(Probe, "checkpoint_meta") == RANK_ZERO and runs_on(Probe, "broadcast_weights") == RANK_ZERO


class RankProbe(LearnerWorker):
    """A rank without DeepSpeed or a model that records which calls ran on it."""

    def setup(self, master_addr, master_port, board=None):  # keeps LearnerWorker.setup's @every_rank
        self.ran = []
        return {"rank": self.rank}

    @rank_zero
    def note(self, tag):
        self.ran.append(tag)
        return self.rank

    @every_rank
    def what_ran(self):
        return list(self.ran)

    def undeclared(self):
        self.ran.append("undeclared")


def test_a_rank_zero_method_runs_on_rank_0_only_and_an_undeclared_one_is_refused(ray_local, tmp_path):
    import ray

    group = LearnerGroup(run_cfg(tmp_path, "learner.num_ranks=2"), "teacher", worker_cls=RankProbe)
    try:
        assert group.call("note", "called") == 0  # rank 0's own result, not a list
        (ref,) = group.submit("note", "submitted")  # one ref: rank 0's
        assert ray.get(ref) == 0
        assert group.call("what_ran") == [["called", "submitted"], []]  # rank 1 ran neither
        with pytest.raises(TypeError, match=r"^RankProbe\.undeclared does not declare where it runs: decorate it "
                                            r"with @every_rank or @rank_zero"):
            group.call("undeclared")
        with pytest.raises(TypeError, match="does not declare where it runs"):
            group.submit("undeclared")
        assert group.call("what_ran") == [["called", "submitted"], []]  # refused before any rank ran it
    finally:
        group.shutdown()


# -- a limit per phase (learner.timeouts) -------------------------------------------------------------------
class SlowSaveHungStep(LearnerWorker):
    """Rank 0 saves slowly (longer than a step may take); rank 1 hangs in its second step."""

    def save(self, root, step, **kwargs):
        if self.rank == 0:
            time.sleep(8)
        return super().save(root, step, **kwargs)

    def train_step(self, step):
        if step == 1 and self.rank == 1:
            time.sleep(600)
        return super().train_step(step)


def test_a_save_longer_than_the_step_limit_finishes_and_a_hung_rank_is_named_within_it(ray_local, prepared_run,
                                                                                        tmp_path):
    cfg = run_cfg(prepared_run, "learner.num_ranks=2", "learner.timeouts.step=4", "learner.timeouts.save=120")
    group = LearnerGroup(cfg, "teacher", worker_cls=SlowSaveHungStep)
    try:
        _train(group, [0])
        saved = group.call("save", str(tmp_path / "run"), 1)  # 8 s: past the step limit, within the save limit
        assert Path(saved[0]).name == "step-000001" and validate_checkpoint(Path(saved[0]), 2)["step"] == 1
        started = time.monotonic()
        # rank 0 waits for rank 1 in the step's all-reduce, so both are still running
        with pytest.raises(LearnerGroupError, match=r"'train_step' timed out after 4s \(learner\.timeouts\.step; "
                                                    r"ranks still running: \[0, 1\]\)"):
            group.call("train_step", 1)
        assert time.monotonic() - started < 60  # named at the step limit, not at a save's or a collective's
    finally:
        group.shutdown()


class SlowSetup(RankProbe):
    """A set-up in two posted phases; rank 1's second one outlasts the set-up limit."""

    def setup(self, master_addr, master_port, board=None):
        self._board = board
        self._progress("indexing 12 row groups")
        time.sleep(2)
        self._progress("loading the teacher model")
        time.sleep(60 if self.rank == 1 else 0)
        return super().setup(master_addr, master_port, board)


def test_a_long_setup_reports_every_ranks_progress_and_a_stuck_one_names_what_it_was_doing(
        ray_local, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(LearnerGroup, "report_every_s", 1.0)
    cfg = run_cfg(tmp_path, "learner.num_ranks=2", "learner.timeouts.setup=20")
    with caplog.at_level(logging.INFO, logger="anyflow_ray"):
        with pytest.raises(LearnerGroupError, match=r"'setup' timed out after 20s \(learner\.timeouts\.setup; ranks "
                                                    r"still running: \[1\]\); rank 1: loading the teacher model"):
            LearnerGroup(cfg, "teacher", worker_cls=SlowSetup)
    reports = [r.getMessage() for r in caplog.records if "set-up" in r.getMessage()]
    assert any("rank 0: indexing 12 row groups" in m and "rank 1: indexing 12 row groups" in m for m in reports)
    assert any("rank 1: loading the teacher model" in m for m in reports)


def test_a_format_2_checkpoint_with_its_pipeline_inside_still_resumes(ray_local, prepared_run, tmp_path):
    """What the previous version wrote: the same engine files, no config in meta.json, the EMA model
    exported into the checkpoint folder itself."""
    cfg = run_cfg(prepared_run, "learner.num_ranks=1", "learner.zero_stage=1")
    out = tmp_path / "old"
    group = LearnerGroup(cfg, "teacher")
    try:
        _train(group, [0])
        ckpt = Path(group.call("save", str(out), 1)[0])
        group.call("export_pipeline", str(ckpt), 1)  # the pipeline format 2 kept in every checkpoint
        (ckpt / "export.json").unlink()
        meta_path = ckpt / "training_state" / "meta.json"
        meta = json.loads(meta_path.read_text())
        meta["format"] = 2
        del meta["config"]
        meta_path.write_text(json.dumps(meta))
        assert group.call("load_latest", str(out))[0] == 1
        next_loss = _train(group, [1])[0]
        assert math.isfinite(next_loss)
        # a format-2 checkpoint rebuilds its model from the run folder's config.yaml, and says so when it is gone
        with pytest.raises(CheckpointError, match=r"holds no config and .*config\.yaml is missing"):
            export_checkpoint(ckpt, tmp_path / "export")
        (ckpt / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
        with pytest.raises(LearnerGroupError, match="no transformer/\\*.safetensors"):
            group.call("load_latest", str(out))
    finally:
        group.shutdown()
