"""The causal student's Stage 1 through the real ``pretrain`` job (teacher forcing, docs/method.md §6) on the
shared Ray instance, and the evaluation of its export per chunk and streaming."""

import json
from pathlib import Path

import pytest

from anyflow_ray.metrics import read_metrics
from anyflow_ray.pipeline import AnyFlowPipeline
from tests.learners.conftest import run_cfg

CAUSAL = ["model.causal.chunks=[2,2,2,2]", "model.causal.cache_chunks=3", "pretrain.target=data",
          "pretrain.steps=2", "pretrain.save_every=2", "pretrain.log_every=1"]


@pytest.fixture(scope="module")
def causal_run(ray_local, prepared_run, tmp_path_factory):
    """Two teacher-forced Stage-1 steps from the (untrained) teacher, written to a folder of this module."""
    from anyflow_ray.jobs import pretrain

    out = tmp_path_factory.mktemp("causal-stage1") / "stage1"
    cfg = run_cfg(prepared_run, *CAUSAL, f"pretrain.output={out}")
    pretrain.run(cfg)
    return cfg


def test_causal_stage1_job_exports_a_causal_pipeline(causal_run):
    out = Path(causal_run.pretrain.output)
    pipe = AnyFlowPipeline.from_pretrained(out)
    assert type(pipe.transformer).__name__ == "WanCausalFlowMapTransformer3DModel"
    assert list(pipe.transformer.config.causal_chunks) == [2, 2, 2, 2]
    index = json.loads((out / "model_index.json").read_text())
    assert index["transformer"][1] == "WanCausalFlowMapTransformer3DModel"
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000002"
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["stage1/noised_chunks"] == 4 and r["stage1/frac_diagonal"] == 0.5 for r in records)
    assert all(r["stage1/loss"] > 0 for r in records)


def test_evaluating_a_causal_model_reports_each_chunk_and_a_stream(causal_run, prepared_run, tmp_path, capsys):
    from anyflow_ray.jobs import evaluate

    evaluate.run(run_cfg(prepared_run, *CAUSAL, f"pretrain.output={causal_run.pretrain.output}",
                         f"eval.output={tmp_path}", "eval.steps=[1,2]", "eval.num_prompts=8", "eval.reference_steps=2",
                         "eval.swd_projections=8", "eval.batch_size=4", "eval.consistency_models=[]",
                         f"eval.models=[{causal_run.teacher.output},{causal_run.pretrain.output}]"))
    result = json.loads((tmp_path / "results.json").read_text())
    assert [(r["model"], r["steps"]) for r in result["rows"]] == [("teacher", 1), ("teacher", 2),
                                                                  ("stage1", 1), ("stage1", 2)]
    fixed = [r for r in result["chunk_rows"] if not r["streaming"]]
    stream = [r for r in result["chunk_rows"] if r["streaming"]]
    # every model per chunk at the training length; the causal one streams 2x as long from its rolling cache
    assert [(r["model"], r["steps"], r["chunk"], r["start"], r["end"]) for r in fixed] == [
        (model, n, j, 2 * j, 2 * j + 2) for model in ("teacher", "stage1") for n in (1, 2) for j in range(4)]
    assert [(r["model"], r["steps"], r["chunk"], r["end"]) for r in stream] == [
        ("stage1", n, j, 2 * j + 2) for n in (1, 2) for j in range(8)]
    # the teacher's 2-step samples are the reference (eval.reference_steps=2): 0 in every chunk, the student's not
    assert all((r["ode_rmse"] == 0) == (r["model"] == "teacher" and r["steps"] == 2) and r["swd"] > 0 for r in fixed)
    assert all(r["ode_rmse"] is None and r["swd"] > 0 for r in stream)
    assert result["meta"]["chunks"] == [2, 2, 2, 2] and result["meta"]["stream_frames"] == 16
    assert len(result["meta"]["chunk_swd_floor"]) == 4
    printed = capsys.readouterr().out
    assert "SWD ↓ per chunk, streaming 16 latent frames" in printed and "| stage1 | 2 |" in printed
    assert (tmp_path / "quality_per_chunk.png").is_file()
    assert "ODE RMSE ↓ per chunk" in (tmp_path / "results.md").read_text()

