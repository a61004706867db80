"""Stage 2 with a causal student (docs/method.md §6) through the real distill job on Ray actors: causal
rollouts carry their context chunks, the learner's teacher-forced re-run reproduces the actor's x_hat, and
a rollout actor dying in the middle of a chunk is restarted with the books balanced."""

import dataclasses
import json
import math
import os
from pathlib import Path

import pytest
import torch

from actors.rollout import RolloutActor
from anyflow_ray.models.causal import WanCausalFlowMapTransformer3DModel
from anyflow_ray.pipeline import AnyFlowRayPipeline
from learners.distill import DistillWorker
from tests.probes import run_cfg, summary_balances

CHUNKS = [2, 2, 2, 2]


@pytest.fixture(scope="module", params=[0, 2], ids=["full-context", "compressed-context"])
def causal_init(prepared_run, tmp_path_factory, request):
    """(A causal Stage-1 export: the untrained Stage-1 flow map on CHUNKS saved as a pipeline folder, its
    full_chunk_limit): every chunk at full size, or FAR's compressed context past 2 chunks."""
    from anyflow_ray.models.loading import load_transformer
    from anyflow_ray.pipeline import save_as_pipeline

    cfg = run_cfg(prepared_run)
    model = WanCausalFlowMapTransformer3DModel.from_base(load_transformer(cfg.pretrain.output, flow_map=True), CHUNKS,
                                                         full_chunk_limit=request.param or None)
    folder = tmp_path_factory.mktemp("causal") / f"stage1-{request.param}"
    return save_as_pipeline(model, cfg.model.base, str(folder)), request.param


class DiesMidChunk(RolloutActor):
    """A rollout actor whose process exits inside the second chunk of its third rollout (step 2's, after a
    publish), once per run (a marker file in the run's output survives the restart)."""

    def make_trajectory(self, kind: str, seed: int) -> dict:
        self.made = getattr(self, "made", 0) + 1
        marker = Path(self.cfg.distill.output) / "died-mid-chunk"
        if self.made != 3 or marker.exists():
            return super().make_trajectory(kind, seed)

        def exit_in_chunk_two(module, args, kwargs):
            if kwargs.get("cache_states") is not None:  # chunk 2's first call: chunk 1 done, chunk 2 started
                marker.touch()
                os._exit(1)

        self.student.register_forward_pre_hook(exit_in_chunk_two, with_kwargs=True)
        return super().make_trajectory(kind, seed)


class RerunProbe(DistillWorker):
    """A learner rank that also reports, per step, how far its re-runs of each generator trajectory are from
    the actor's own x_hat (the trajectory's ``context_chunks``): the one it trains on (``grad_scope: all``, the
    prefix too, from the trajectory's noise) and the one from the actor's z_k (``last``: without the noise)."""

    def train_step(self, step, generator_refs=(), critic_refs=()):
        self.gaps = {"all": [], "last": []}
        result = super().train_step(step, generator_refs, critic_refs)
        return {**result, "causal_student": float(self.causal),
                **{f"rerun_gap_{scope}": max(gaps, default=float("nan")) for scope, gaps in self.gaps.items()}}

    def student_x_hat(self, payload):
        x_hat, context = super().student_x_hat(payload)
        with torch.no_grad():
            from_z_k = super().student_x_hat(dataclasses.replace(payload, noise=None))[0]
        for scope, rerun in (("all", x_hat), ("last", from_z_k)):
            self.gaps[scope].append(float((rerun.detach().cpu() - payload.context_chunks).abs().max()))
        return x_hat, context


def test_causal_stage2_reruns_the_actors_chunks_and_survives_an_actor_dying_mid_chunk(
        ray_local, prepared_run, causal_init, tmp_path):
    """Strict alternation (lag 0): every trajectory is made with the weights the learner holds when it trains
    on it, so the learner's re-run (teacher-forced; per chunk on caches with the compressed context) must
    give the actor's x_hat of every chunk."""
    from anyflow_ray.jobs import distill

    init, limit = causal_init
    far = [f"model.causal.full_chunk_limit={limit}", "model.causal.noisy_chunks=2"] if limit else []
    cfg = run_cfg(prepared_run, f"distill.output={tmp_path}/s2", f"distill.init={init}", *far,
                  f"model.causal.chunks={CHUNKS}", "pretrain.target=data", "distill.steps=4", "distill.save_every=4",
                  "distill.log_every=1", "rollout.num_actors=1", "distill.max_policy_lag=0", "distill.grad_scope=all")
    out = distill.run(cfg, worker_cls=RerunProbe, actor_cls=DiesMidChunk)
    summary = json.loads((out / "pipeline_summary.json").read_text())
    summary_balances(summary)
    assert (out / "died-mid-chunk").exists() and summary["restarts"] == 1, summary
    # every trajectory handed out carried valid context chunks (none rejected); one may be lost with the actor
    assert summary["rejected"] == 0 and summary["trained"] + summary["lost"] == 8 and summary["trained"] >= 7
    (first, v_first), (again, v_again) = summary["versions_at_start"]
    assert first == again == "rollout-0" and v_first == 0 and v_again >= 1

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["distill/causal_student"] == 1.0 for r in records) and records[-1]["distill/failed_rollouts"] >= 1
    gaps = [r[f"distill/rerun_gap_{scope}"] for r in records for scope in ("all", "last")]
    assert all(math.isfinite(g) and g < 1e-4 for g in gaps), gaps
    assert all(math.isfinite(r["distill/loss"]) and math.isfinite(r["distill/critic_loss"]) for r in records)
    exported = AnyFlowRayPipeline.from_pretrained(out).transformer
    assert isinstance(exported, WanCausalFlowMapTransformer3DModel) and exported.config.causal_chunks == CHUNKS
    assert exported.config.full_chunk_limit == (limit or None)
