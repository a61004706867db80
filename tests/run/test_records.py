"""Runs as records, from files only (no Ray): one writer per folder, a failed start that does not block its
fix, a moved folder that resumes, metrics that heal after a resume, checkpoints relocated with their folder."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from anyflow_ray.run import lease as lease_mod
from anyflow_ray.run.config import load_config, relocate_run, save_config
from anyflow_ray.run.lease import Lease, LeaseHeld, LeaseLost
from anyflow_ray.run.logger import MetricsLogger, read_metrics
from anyflow_ray.run.records import config_changes, hold_run, open_run
from anyflow_ray.training import checkpoint as ckpt_io
from omegaconf import OmegaConf


def _cfg(root, *overrides):
    return load_config("configs/tiny.yaml", [f"run.output_dir={root}", "run.wandb_mode=disabled", *overrides])


def _checkpoint(out, step, cfg=None):
    ckpt = ckpt_io.step_dir(out, step)
    for rank in (0, 1):  # the tiny config's two learner ranks
        ckpt_io.save_rank_state(ckpt, rank, {"rng.torch": torch.get_rng_state()})
    ckpt_io.save_meta(ckpt, {"format": ckpt_io.FORMAT, "step": step, "world_size": 2, "job": "pretrain",
                             "config": OmegaConf.to_container(cfg, resolve=True) if cfg else {},
                             "files": ckpt_io.manifest(ckpt)})
    ckpt_io.write_latest(out, ckpt)
    return ckpt


def test_a_second_run_on_a_live_folder_is_refused_and_takes_over_once_the_lease_expires(tmp_path, capsys):
    out = tmp_path / "stage1"
    first = Lease(out, "pretrain", expiry_s=1.5).acquire()
    try:
        with pytest.raises(LeaseHeld, match=r"being written by the pretrain run of .*pid %d.*run.new_run=true" % os.getpid()):
            Lease(out, "pretrain", expiry_s=1.5).acquire()
        time.sleep(1.0)  # the owner heartbeats (every 0.2 s here): still refused after its expiry would have passed
        with pytest.raises(LeaseHeld):
            Lease(out, "pretrain", expiry_s=1.5).acquire()
        first._stop.set()  # the owner hangs: no more heartbeats
        first._thread.join()
        time.sleep(1.7)
        second = Lease(out, "pretrain", expiry_s=1.5).acquire()
        assert "taking over the run folder" in capsys.readouterr().out and "expired" in lease_mod.stale_reason(
            {"heartbeat": 0, "expiry_s": 1, "host": "elsewhere"})
        # the stalled owner learns at its next beat that the folder is no longer its own, and stops
        assert first.beat() is False
        with pytest.raises(LeaseLost, match="taken over by the pretrain run"):
            first.check()
        first.release()  # not its lease any more: left alone
        assert json.loads((out / ".lease.json").read_text())["token"] == second.token
        second.release()
        assert not (out / ".lease.json").exists()
    finally:
        first._stop.set()


def test_a_killed_owner_on_this_host_lets_go_at_once(tmp_path, capsys):
    out = tmp_path / "run"
    code = ("import sys, time; from anyflow_ray.run.lease import Lease; "
            "Lease(sys.argv[1], 'teacher', 600).acquire(); print('held', flush=True); time.sleep(60)")
    owner = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "held"
        with pytest.raises(LeaseHeld, match=f"pid {owner.pid}"):
            Lease(out, "teacher", 600).acquire()
    finally:
        owner.kill()
        owner.wait()
    Lease(out, "teacher", 600).acquire().release()  # a 600 s expiry, yet no wait: its process is gone
    assert "its process on this host no longer exists" in capsys.readouterr().out


def test_hold_run_refuses_a_live_folder_in_one_line_and_leases_the_new_run_folder(tmp_path):
    cfg = _cfg(tmp_path)
    record, lease = hold_run(cfg, "pretrain")
    with lease:
        with pytest.raises(LeaseHeld) as err:
            hold_run(cfg, "pretrain")
        assert len(str(err.value).splitlines()) == 1 and str(record.out) in str(err.value)
    save_config(cfg, record.out)
    _checkpoint(record.out, 2, cfg)
    record, lease = hold_run(_cfg(tmp_path, "run.new_run=true"), "pretrain")  # a fresh <out>-2
    with lease:
        assert record.out.name == "stage1-2" and (record.out / ".lease.json").is_file()
        assert not (tmp_path / "stage1" / ".lease.json").exists()


def test_a_run_that_saved_no_checkpoint_does_not_block_the_corrected_command(tmp_path, capsys):
    bad = _cfg(tmp_path, "pretrain.lr=0.5")
    out = open_run(bad, "pretrain").out
    save_config(bad, out)  # what a run that failed before its first checkpoint leaves
    record = open_run(_cfg(tmp_path), "pretrain")
    assert record.fresh and record.start == 0
    assert "saved no checkpoint; this run starts afresh" in capsys.readouterr().out
    _checkpoint(out, 2, bad)  # once it has a checkpoint, its config binds
    with pytest.raises(Exception, match=r"pretrain.lr: 0.5 -> "):
        open_run(_cfg(tmp_path), "pretrain")


def test_a_deleted_latest_resumes_the_newest_step_folder_not_step_0(tmp_path):
    cfg = _cfg(tmp_path)
    out = open_run(cfg, "pretrain").out
    save_config(cfg, out)
    for step in (2, 4):
        _checkpoint(out, step, cfg)
    (out / "checkpoints" / "latest").unlink()
    record = open_run(cfg, "pretrain")
    assert not record.fresh and record.start == 4  # config.yaml is not rewritten, nothing restarts at 0


def test_a_copied_run_folder_resumes_and_its_checkpoint_finds_its_folders(tmp_path):
    cfg = _cfg(tmp_path / "a")
    moved = _cfg(tmp_path / "b")
    old = OmegaConf.to_container(cfg, resolve=True)
    old["run"]["output_dir"] = str(tmp_path / "a")  # as the learners resolved it: absolute
    assert config_changes(old, OmegaConf.to_container(moved, resolve=True), "distill") == []
    other = OmegaConf.to_container(_cfg(tmp_path / "b", f"model.base={tmp_path}/elsewhere"), resolve=True)
    assert any(c.startswith("model.base") for c in config_changes(old, other, "distill"))
    tree = relocate_run(old, "pretrain", tmp_path / "b" / "stage1")
    assert tree["pretrain"]["init"] == str(tmp_path / "b" / "teacher")
    assert tree["model"]["base"] == str(tmp_path / "b" / "base-model")
    assert relocate_run(old, "pretrain", tmp_path / "a" / "stage1") is old


def test_metrics_after_a_resume_keep_each_step_once_and_wandb_keeps_its_run(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    logger = MetricsLogger(out, "pretrain")
    for step in range(1, 7):
        logger.log(step, {"loss": float(step)})
    logger._file.write('{"step": 7, "lo')  # torn by a kill
    logger.close()
    logger = MetricsLogger(out, "pretrain", start=4)  # resumed from the checkpoint at step 4
    assert "3 metric record(s) after step 4" in capsys.readouterr().out
    for step in (5, 6):
        logger.log(step, {"loss": step + 0.5})
    logger.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(out / "metrics.jsonl")] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.5), (6, 6.5)]
    superseded = read_metrics(out / "metrics.superseded.jsonl")
    assert [r.get("step") for r in superseded] == [5, 6, None] and {r["superseded_at"] for r in superseded} == {4}

    monkeypatch.setenv("WANDB_MODE", "offline")
    wandb_cfg = _cfg(tmp_path, "run.wandb_mode=offline")
    ids = []
    for start in (None, 2):
        logger = MetricsLogger(tmp_path / "w", "pretrain", wandb_cfg, start=start)
        ids.append(logger._wandb.id)
        logger.close()
    assert ids[0] == ids[1] == (tmp_path / "w" / "wandb_run_id").read_text().strip()
