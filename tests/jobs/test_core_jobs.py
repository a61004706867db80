"""The core chain through the CLI on a very small setting: make-tiny -> data -> teacher -> sample -> evaluate."""

import json
import subprocess
import sys

import pytest

from anyflow_ray.cli import main
from anyflow_ray.data.shards import read_shards
from anyflow_ray.metrics import read_metrics
from anyflow_ray.pipeline import AnyFlowPipeline

SMALL = ["model.tiny.num_layers=1", "model.tiny.ffn_dim=32", "data.num_train=64", "data.num_heldout=32",
         "data.shard_size=40", "teacher.steps=6", "teacher.batch_size=8", "learner.num_ranks=1", "teacher.log_every=2",
         "eval.steps=[1,2]", 'eval.models=["${teacher.output}"]', "eval.num_prompts=8", "eval.reference_steps=4", "eval.swd_projections=16",
         "sample.steps=[1,2]", 'sample.prompts=["a red circle moving left"]']


def cli(command, run_dir, *extra):
    proc = subprocess.run([sys.executable, "-m", "anyflow_ray.cli", command, "--config", "configs/tiny.yaml",
                           f"run.output_dir={run_dir}", *SMALL, *extra], capture_output=True, text=True,
                          env={**__import__("os").environ, "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    for command in ("make-tiny", "data"):  # in-process through the same CLI entry point: no interpreter start-up
        assert main([command, "--config", "configs/tiny.yaml", f"run.output_dir={run}", *SMALL]) == 0
    cli("teacher", run)  # a subprocess: it starts Ray, which must not outlive it inside the test process
    return run


def test_data_shards_and_resolved_config(run_dir):
    train = read_shards(run_dir / "data" / "train")
    heldout = read_shards(run_dir / "data" / "heldout")
    assert len(train.prompts) == 64 and len(heldout.prompts) == 32
    assert train.videos.shape[1:] == (3, 8, 16, 16)
    assert not set(train.seeds.tolist()) & set(heldout.seeds.tolist())
    assert (run_dir / "data" / "config.yaml").is_file()


def test_teacher_writes_pipeline_metrics_and_wandb(run_dir):
    pipe = AnyFlowPipeline.from_pretrained(run_dir / "teacher")
    assert type(pipe.transformer).__name__ == "WanTransformer3DModel"
    records = read_metrics(run_dir / "teacher" / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 4, 6]
    assert all(r["teacher/loss"] > 0 for r in records)
    assert list((run_dir / "teacher" / "wandb").glob("offline-run-*"))
    assert (run_dir / "teacher" / "config.yaml").is_file()


def test_sample_defaults_to_the_student_and_writes_one_folder_per_model(run_dir, capsys):
    import shutil

    from PIL import Image

    from anyflow_ray.config import load_config
    from anyflow_ray.jobs.sample import models_to_sample

    cfg = load_config("configs/tiny.yaml", [f"run.output_dir={run_dir}"])
    assert models_to_sample(cfg) == [str(run_dir / "stage2")]  # the final student, not the teacher
    assert models_to_sample(load_config("configs/tiny.yaml", [f"run.output_dir={run_dir}", "sample.model=/m/x"])) == ["/m/x"]
    args = ["--config", "configs/tiny.yaml", f"run.output_dir={run_dir}", *SMALL]
    assert main(["sample", *args]) != 0  # no student trained yet: refused, naming the key and the folder
    err = capsys.readouterr().err
    assert "sample.models" in err and "stage2" in err

    shutil.copytree(run_dir / "teacher", run_dir / "stage2")  # stands in for a trained student
    assert main(["sample", *args]) == 0
    out = run_dir / "samples"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["stage2"]
    assert main(["sample", *args, 'sample.models=["${teacher.output}","${distill.output}"]']) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["stage2", "teacher"]
    for name in ("teacher", "stage2"):
        for steps in (1, 2):
            assert (out / name / f"a_red_circle_moving_left_{steps}steps.gif").is_file()
        sheet = Image.open(out / name / "contact_sheet.png")
        frames, steps = 8, 2  # data.frames, sample.steps=[1,2]: every 16x16 frame drawn at least 64 px a side
        assert sheet.width >= steps * frames * 64 and sheet.height >= 64
    shutil.rmtree(run_dir / "stage2")


def test_evaluate_prints_table_and_writes_json_and_plot(run_dir):
    proc = cli("evaluate", run_dir)
    assert "| teacher | 1 |" in proc.stdout and "| teacher | 2 |" in proc.stdout
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert [r["steps"] for r in results["rows"]] == [1, 2]
    assert all(r["ode_rmse"] >= 0 and 0 <= r["all"] <= 1 for r in results["rows"])
    assert (run_dir / "eval" / "quality_vs_steps.png").stat().st_size > 1000


def test_corrupt_shard_is_refused_by_name(run_dir, tmp_path):
    import shutil

    bad = tmp_path / "data"
    shutil.copytree(run_dir / "data", bad)
    (bad / "train" / "shard-00000.parquet").write_bytes(b"not parquet")
    proc = subprocess.run([sys.executable, "-m", "anyflow_ray.cli", "teacher", "--config", "configs/tiny.yaml",
                           f"run.output_dir={run_dir}", f"data.root={bad}", f"teacher.output={tmp_path}/t", *SMALL],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "shard-00000.parquet" in proc.stderr
