"""Stage 1 through the CLI: the real-scale dry run, and a short tiny run on the learner group."""

import json
import shutil
import subprocess
import sys

import pytest

from anyflow_ray.cli import main
from anyflow_ray.metrics import read_metrics
from anyflow_ray.pipeline import AnyFlowPipeline


def test_real_scale_dry_run_prints_counts_config_and_memory(capsys):
    assert main(["pretrain", "--config", "configs/wan2.1-t2v-1.3b.yaml", "--dry-run", "learner.zero_stage=3"]) == 0
    out = capsys.readouterr().out
    total = int(out.split("total ")[1].split()[0].replace(",", ""))
    trainable = int(out.split("trainable ")[1].split()[0].replace(",", ""))
    assert 1.3e9 < total < 1.8e9 and 0 < trainable < 0.2 * total  # LoRA 256 (adapters only): ~15% trainable
    assert '"stage": 3' in out and '"bf16"' in out
    assert "ZeRO-3" in out and "<- learner.zero_stage" in out.split("ZeRO-3")[1].splitlines()[0]


def test_dry_run_needs_a_full_size_model():
    with pytest.raises(ValueError, match="model.full_size"):  # in-process: a subprocess costs ~8 s of imports
        main(["pretrain", "--config", "configs/tiny.yaml", "--dry-run"])


def test_tiny_pretrain_writes_loadable_checkpoints_and_metrics(tmp_path):
    from anyflow_ray.config import load_config
    from anyflow_ray.jobs.data import scaffold_untrained_run

    small = [f"run.output_dir={tmp_path}", "model.tiny.num_layers=1", "model.tiny.ffn_dim=32", "data.num_train=32",
             "data.num_heldout=8", "pretrain.steps=4", "pretrain.global_batch=8", "pretrain.save_every=2",
             "pretrain.log_every=2", "learner.num_ranks=1", "learner.cpus_per_rank=0.5"]
    scaffold_untrained_run(load_config("configs/tiny.yaml", small))
    shutil.rmtree(tmp_path / "stage1")  # the job itself must write the student
    proc = subprocess.run([sys.executable, "-m", "anyflow_ray.cli", "pretrain", "--config", "configs/tiny.yaml",
                           *small], capture_output=True, text=True, env={**__import__("os").environ,
                                                                          "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "stage1"
    student = AnyFlowPipeline.from_pretrained(out)
    assert type(student.transformer).__name__ == "WanFlowMapTransformer3DModel"
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000004"
    assert AnyFlowPipeline.from_pretrained(out / "checkpoints" / "step-000002").transformer is not None
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 4]
    assert all(r["stage1/frac_diagonal"] == 0.5 for r in records)
    assert json.loads((out / "model_index.json").read_text())["transformer"][1] == "WanFlowMapTransformer3DModel"
    assert list((out / "wandb").glob("offline-run-*"))
