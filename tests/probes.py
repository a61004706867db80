"""Test helpers shared by more than one test module: the learner tests' small run, Stage-2 ranks that report
what they hold, the pipeline summary's books, a rollout actor killed mid-run, and an exact flow map.

Test modules import these from here, never from one another. The probe ranks are Ray actor classes, pickled
by reference: the worker processes import them from ``tests.probes``."""

from __future__ import annotations

import json
import shutil

import ray
import torch

from anyflow_ray.run.config import load_config
from learners.distill import DistillWorker
from learners.ranks import every_rank

# -- the learner tests' run (tests/learners/conftest.py prepares it once per session) ------------------------

LEARNER_RUN = ["model.tiny.num_layers=1", "model.tiny.ffn_dim=32", "data.num_train=64", "data.num_heldout=16",
               "teacher.batch_size=8", "pretrain.global_batch=8", "pretrain.warmup=2", "pretrain.lr=1e-3",
               "learner.num_ranks=1", "learner.cpus_per_rank=0.5", "learner.timeouts.step=240", "learner.timeouts.setup=240", "run.threads=2",
               "rollout.batch_size=2", "rollout.cpus_per_actor=0.25", "distill.real_batch=8", "distill.lr=1e-4",
               "distill.budgets=[2,4]"]


def run_cfg(root, *extra):
    """The learner tests' config for a run under ``root``, with ``extra`` overrides last."""
    return load_config("configs/tiny.yaml", [f"run.output_dir={root}", *LEARNER_RUN, *extra])


# -- Stage-2 ranks that report what they hold ------------------------------------------------------------------


class ZeRO3Probe(DistillWorker):
    """A Stage-2 rank that also reports what ZeRO-3 holds, gathered independently of the worker's code."""

    @every_rank
    def partition_sizes(self) -> dict:
        return {"ema": [s.numel() for s in self.ema.shadow], "local": [p.ds_tensor.numel() for p in self.trainable],
                "placeholders": [p.numel() for p in self.trainable]}

    @every_rank
    def gathered_trainable(self) -> dict | None:
        import deepspeed

        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters([p for _, p in named]):  # all at once, every rank
            whole = {n: p.detach().cpu().clone() for n, p in named}
        return whole if self.rank == 0 else None


class EmaProbe(ZeRO3Probe):
    """Also reports the whole EMA of the trainable parameters by name, gathered independently."""

    @every_rank
    def gathered_ema(self) -> dict | None:
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if self.zero_stage == 3:
            from learners.partitions import gather_parts

            return gather_parts(named, list(self.ema.shadow), keep=self.rank == 0) or None
        return {n: s.detach().cpu().clone() for (n, _), s in zip(named, self.ema.shadow)}


# -- the Stage-2 pipeline ----------------------------------------------------------------------------------------


def summary_balances(s):
    """The books of ``pipeline_summary.json`` balance: every accepted trajectory is taken, dropped or still
    buffered, and every taken one is trained on, lost or rejected."""
    assert s["accepted"] == s["taken"] + s["dropped_stale"] + s["dropped_at_end"] + s["depth"]
    assert s["taken"] == s["trained"] + s["lost"] + s["rejected"]


def kill_an_actor_at_submit(monkeypatch, fleet_cls, nth: int) -> dict:
    """Kill the actor that just got the ``nth`` rollout (it dies with it in flight; Ray restarts it)."""
    calls = {"n": 0}
    original = fleet_cls.submit

    def submit_and_kill_once(self, actor_index, kind=None):
        original(self, actor_index, kind)
        calls["n"] += 1
        if calls["n"] == nth:
            ray.kill(self.actors[actor_index], no_restart=False)
            calls["killed"] = True

    monkeypatch.setattr(fleet_cls, "submit", submit_and_kill_once)
    return calls


# -- sampling ----------------------------------------------------------------------------------------------------


class ExactStraightFlowMap(torch.nn.Module):
    """Exact two-time flow map of the ODE whose data is x0 = c (the context mean): u = (z - c) / t."""

    is_flow_map = True

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, z, T, context, timestep_r=None, return_dict=False):
        self.calls += 1
        c = context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1, 1)
        return ((z - c) / (T / 1000).reshape(-1, 1, 1, 1, 1),)


def reference_layout(folder, out):
    """``folder`` re-labelled as NVlabs/AnyFlow wrote its students: ``far.*`` classes in model_index.json,
    ``FAR_Wan_Transformer3DModel`` (flow map on, FAR off) in the transformer's config; the same tensors."""
    shutil.copytree(folder, out)
    index = json.loads((out / "model_index.json").read_text())
    index.update(_class_name="WanAnyFlowPipeline",
                 transformer=["far.models.transformer_far_wan_model", "FAR_Wan_Transformer3DModel"],
                 scheduler=["far.schedulers.scheduling_flowmap_euler_discrete", "FlowMapEulerDiscreteScheduler"])
    (out / "model_index.json").write_text(json.dumps(index))
    config = json.loads((out / "transformer" / "config.json").read_text())
    config.update(_class_name="FAR_Wan_Transformer3DModel", init_flowmap_model=True, init_far_model=False,
                  compressed_patch_size=[1, 4, 4], full_chunk_limit=3, chunk_partition=None,
                  qk_norm="rms_norm_across_heads", added_kv_proj_dim=None)
    (out / "transformer" / "config.json").write_text(json.dumps(config))
    return out


def diffusers_written(folder, out, layout: str = "diffusers"):
    """Pipeline folder ``folder`` with its transformer saved by diffusers' own ``AnyFlowTransformer3DModel``
    and no anyflow.json (as NVIDIA's releases), in diffusers' names or (``layout="reference"``) the
    reference's ``far.*`` layout."""
    from diffusers import AnyFlowTransformer3DModel

    staged = out.parent / f"{out.name}.staged"
    shutil.copytree(folder, staged)
    shutil.rmtree(staged / "transformer")
    AnyFlowTransformer3DModel.from_pretrained(folder / "transformer").save_pretrained(staged / "transformer")
    (staged / "anyflow.json").unlink(missing_ok=True)
    (staged / "export.json").unlink(missing_ok=True)
    if layout == "diffusers":
        return staged.rename(out)
    reference_layout(staged, out)
    shutil.rmtree(staged)
    return out
