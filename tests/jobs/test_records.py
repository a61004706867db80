"""Runs are records: a re-run of a training job never silently rewrites the earlier run's folder.

The cheapest real job (the tiny teacher, 2 steps, one rank) through the CLI entry point, in-process on one
Ray instance for the module: a resume with a changed config is refused and rewrites nothing, a job with
nothing left to train says so and leaves the folder byte-identical, ``run.new_run=true`` starts a fresh
``<output>-2``, a resume with a larger step budget trains on and records its config; a config whose
resources the machine cannot hold stops at once with one line.
"""

from pathlib import Path

import pytest
import yaml

from anyflow_ray.cli import main

SMALL = ["--config", "configs/tiny.yaml", "model.tiny.num_layers=1", "model.tiny.ffn_dim=32", "data.num_train=16",
         "data.num_heldout=8", "teacher.steps=2", "teacher.batch_size=4", "teacher.log_every=1", "teacher.save_every=2",
         "learner.num_ranks=1", "learner.cpus_per_rank=0.5", "learner.timeout_s=240"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, ray_module):
    """make-tiny + data + a 2-step teacher, through the CLI."""
    run = tmp_path_factory.mktemp("records")
    for command in ("make-tiny", "data", "teacher"):
        assert main([command, *SMALL, f"run.output_dir={run}"]) == 0
    assert (run / "teacher" / "checkpoints" / "latest").read_text().strip() == "step-000002"
    return run


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def cli_lines(text: str) -> list[str]:
    """The CLI's own lines (Ray forwards its actors' log lines to the same stream)."""
    return [line for line in text.splitlines() if line.startswith("anyflow-ray ")]


def teacher(run_dir, *extra) -> int:
    return main(["teacher", *SMALL, f"run.output_dir={run_dir}", *extra])


def test_resume_with_a_changed_config_is_refused_and_rewrites_nothing(run_dir, capsys):
    before = snapshot(run_dir / "teacher")
    assert teacher(run_dir, "teacher.lr=0.01", "teacher.steps=4") == 2
    err = cli_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("anyflow-ray teacher: ")
    err = err[0]
    assert "teacher.lr: 0.001 -> 0.01" in err and "run.new_run=true" in err and "teacher.steps" not in err
    assert teacher(run_dir, "learner.num_ranks=2", "teacher.steps=4") == 2  # a checkpoint of another world size
    err = cli_lines(capsys.readouterr().err)
    assert len(err) == 1 and "learner.num_ranks: 1 -> 2" in err[0]
    assert snapshot(run_dir / "teacher") == before  # config.yaml, metrics, model, checkpoints


def test_nothing_left_to_train_says_so_and_leaves_the_folder_byte_identical(run_dir, capsys):
    before = snapshot(run_dir / "teacher")
    assert teacher(run_dir, "teacher.log_every=2") == 0  # a logging knob may differ
    out = capsys.readouterr().out.strip().splitlines()
    assert any("nothing to train" in line and "step 2 of teacher.steps=2" in line for line in out)
    assert snapshot(run_dir / "teacher") == before


def test_new_run_starts_a_fresh_folder_and_leaves_the_earlier_one(run_dir, capsys):
    before = snapshot(run_dir / "teacher")
    assert teacher(run_dir, "teacher.lr=0.01", "run.new_run=true") == 0
    fresh = run_dir / "teacher-2"
    assert f"this run writes to {fresh}" in capsys.readouterr().out
    assert yaml.safe_load((fresh / "config.yaml").read_text())["teacher"]["lr"] == 0.01
    assert (fresh / "checkpoints" / "latest").read_text().strip() == "step-000002"
    assert (fresh / "model_index.json").is_file()
    assert snapshot(run_dir / "teacher") == before


def test_a_larger_step_budget_resumes_and_records_its_config(run_dir, capsys):
    assert teacher(run_dir, "teacher.steps=3") == 0
    folder = run_dir / "teacher"
    assert (folder / "checkpoints" / "latest").read_text().strip() == "step-000003"
    assert yaml.safe_load((folder / "config.yaml").read_text())["teacher"]["steps"] == 3
    assert [line.count('"step"') for line in (folder / "metrics.jsonl").read_text().splitlines()] == [1, 1, 1]


def test_a_cluster_too_small_for_the_config_stops_at_once_in_one_line(run_dir, capsys):
    import time

    start = time.monotonic()
    assert main(["teacher", *SMALL, f"run.output_dir={run_dir}", "teacher.output=" + str(run_dir / "big"),
                 "learner.cpus_per_rank=8"]) == 2
    err = cli_lines(capsys.readouterr().err)
    assert len(err) == 1 and "the cluster cannot hold" in err[0] and "learner.cpus_per_rank" in err[0]
    assert time.monotonic() - start < 60
