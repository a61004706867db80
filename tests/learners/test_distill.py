"""Stage 2 on real Ray actors: the pipeline's accounting, faults, and bad trajectories."""

import dataclasses
import json

import pytest
import ray
import torch

from pathlib import Path

from actors.rollout import RolloutActor
from anyflow_ray.pipeline import AnyFlowRayPipeline
from anyflow_ray.training.export import open_pipeline
from anyflow_ray.training.distill import Trajectory
from learners.distill import DistillWorker
from learners.group import LearnerGroup
from tests.probes import EmaProbe, diffusers_written, kill_an_actor_at_submit, run_cfg, summary_balances


class RaisesTwice(RolloutActor):
    """A rollout actor whose second and third rollouts raise, once per run (a marker file in the run's
    output survives the restart the two failures in a row bring)."""

    def make_trajectory(self, kind: str, seed: int):
        self.made = getattr(self, "made", 0) + 1
        marker = Path(self.cfg.distill.output) / "raised"
        if self.made in (2, 3) and not marker.exists():
            if self.made == 3:
                marker.touch()
            raise RuntimeError("CUDA out of memory (injected)\nTried to allocate 2.00 GiB")
        return super().make_trajectory(kind, seed)


class AlwaysRaises:
    """A rollout actor every rollout of which raises."""

    def __init__(self, cfg: dict, actor_id: str, buffer: str, registry: str):
        self.actor_id = actor_id

    def rollout(self, kind: str, seed: int) -> dict:
        raise OSError(f"no space left on device (injected, {self.actor_id})")


class CriticRerunProbe(DistillWorker):
    """Reports, per step, how far the learner's one-call re-run x_hat = Phi(z_k; T_k -> 0) of each critic
    trajectory is from the actor's own x_hat: zero when the actor made it the consistency way with the
    weights the learner holds (lag 0)."""

    def _fetch(self, wrapped_refs, kind):
        from anyflow_ray.sampling.rollouts import consistency_finish

        good, lost, rejected = super()._fetch(wrapped_refs, kind)
        if kind == "critic":
            student = self.engines["student"].module
            with torch.no_grad():
                for p in good:
                    state = p.state(self.device, self.dtype)
                    gap = (consistency_finish(student, state, self.objective.context(p)).cpu() - p.x_hat).abs().max()
                    self.gap = max(getattr(self, "gap", 0.0), float(gap))
        return good, lost, rejected

    def train_step(self, step, generator_refs=(), critic_refs=()):
        result = super().train_step(step, generator_refs, critic_refs)
        return {**result, "critic_rerun_gap": getattr(self, "gap", float("nan"))}


@pytest.mark.parametrize("lag, rollout, layout", [(0, "consistency", "diffusers"), (1, "flowmap", "reference")])
def test_distill_pipeline_runs_and_its_books_balance(ray_local, prepared_run, tmp_path, lag, rollout, layout):
    """Both rollouts through the same job; the consistency baseline's states are re-run exactly (lag 0).
    Stage 2 starts from a folder diffusers' own class wrote (as NVIDIA's students), in diffusers' names and
    in the reference's far.* layout."""
    from anyflow_ray.jobs import distill

    init = diffusers_written(Path(run_cfg(prepared_run).distill.init), tmp_path / "init", layout)
    cfg = run_cfg(prepared_run, f"distill.output={tmp_path}/s2", "distill.steps=4", "distill.save_every=2",
                  "distill.log_every=1", "rollout.num_actors=2", f"distill.max_policy_lag={lag}",
                  f"distill.rollout={rollout}", f"distill.init={init}")
    out = distill.run(cfg, worker_cls=CriticRerunProbe)
    summary = json.loads((out / "pipeline_summary.json").read_text())
    summary_balances(summary)
    assert summary["trained"] == 8 and summary["lost"] == summary["rejected"] == 0  # 1 gen + 1 critic per step
    assert set(summary["loaded_versions"]) <= {"rollout-0", "rollout-1"} and summary["loaded_versions"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["distill/policy_lag"] <= lag for r in records)
    gaps = [r["distill/critic_rerun_gap"] for r in records]
    if rollout == "consistency":
        assert all(g < 1e-5 for g in gaps), gaps
    else:  # backward simulation's x_hat takes the k-th step first: not the one-jump prediction
        assert max(gaps) > 1e-3, gaps
    assert records[-1]["distill/version"] == 4
    meta = json.loads((out / "checkpoints" / "step-000004" / "training_state" / "meta.json").read_text())
    assert meta["weight_version"] == 4
    assert type(AnyFlowRayPipeline.from_pretrained(out).transformer).__name__ == "WanFlowMapTransformer3DModel"


def test_a_killed_rollout_actor_is_restarted_and_the_run_finishes(ray_local, prepared_run, tmp_path, monkeypatch):
    from actors.fleet import RolloutFleet
    from anyflow_ray.jobs import distill

    calls = kill_an_actor_at_submit(monkeypatch, RolloutFleet, 8)  # mid-run: 2 rollouts queued per actor
    cfg = run_cfg(prepared_run, f"distill.output={tmp_path}/s2", "distill.steps=8", "distill.save_every=8",
                  "rollout.num_actors=1", "distill.max_policy_lag=1")
    out = distill.run(cfg)
    summary = json.loads((out / "pipeline_summary.json").read_text())
    summary_balances(summary)
    assert calls.get("killed")
    assert summary["restarts"] == 1, summary
    # 8 steps x (1 generator + 1 critic) handed out; a trajectory the killed actor owned is lost, not trained
    assert summary["trained"] + summary["lost"] == 16 and summary["trained"] >= 14
    (first, v_first), (again, v_again) = summary["versions_at_start"]
    assert first == again == "rollout-0" and v_first == 0
    assert v_again >= 1  # the restarted actor came back with newer weights than the initial ones


def test_rollouts_that_raise_are_booked_and_retried_and_the_run_finishes(ray_local, prepared_run, tmp_path):
    from anyflow_ray.jobs import distill

    cfg = run_cfg(prepared_run, f"distill.output={tmp_path}/s2", "distill.steps=6", "distill.save_every=6",
                  "rollout.num_actors=1", "distill.max_policy_lag=1", "rollout.failures_before_restart=2")
    out = distill.run(cfg, actor_cls=RaisesTwice)
    summary = json.loads((out / "pipeline_summary.json").read_text())
    summary_balances(summary)  # a failed rollout never reached the buffer: the books still balance
    assert summary["rollout_errors"] == {"RuntimeError: CUDA out of memory (injected)": 2}, summary
    assert summary["restarts"] == 1 and summary["retired_actors"] == []  # two in a row: restarted once
    assert summary["trained"] + summary["lost"] == 12 and summary["trained"] >= 10
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["distill/rollout_errors"] == 2


def test_when_every_actor_keeps_failing_the_fleet_stops_naming_the_error(ray_local):
    from actors.fleet import RolloutFleet, RolloutFleetError
    from anyflow_ray.run.config import load_config

    cfg = load_config("configs/tiny.yaml", ["rollout.num_actors=2", "rollout.cpus_per_actor=0.25",
                                            "rollout.failures_before_restart=2", "rollout.restarts_on_error=1"])
    fleet = RolloutFleet(cfg, "no-buffer", "no-registry", actor_cls=AlwaysRaises)
    try:
        fleet.keep_busy(depth=1)
        with pytest.raises(RolloutFleetError, match=r"Last error: OSError: no space left on device .*rollout-\d"):
            for _ in range(200):  # each actor: 2 failures, a restart, 2 more failures, retired
                fleet.wait_any(timeout=5.0)
                fleet.collect(timeout=0)
        assert fleet.retired == {0, 1} and fleet.error_restarts == [1, 1]
        assert fleet.rollout_errors == 8 and len(fleet.errors) == 2  # one line per actor's message
        assert fleet.produced == 0
    finally:
        for actor in fleet.actors:
            ray.kill(actor, no_restart=True)


def test_bad_trajectories_are_rejected_and_the_good_one_trains_on_the_weighted_loss(ray_local, prepared_run):
    group = LearnerGroup(run_cfg(prepared_run, "distill.real_weight=3.0"), "distill", worker_cls=DistillWorker)
    try:
        good = Trajectory("generator", torch.tensor([0, 1]), 2, 0, torch.randn(2, 3, 8, 16, 16),
                          torch.full((2,), 1000.0), torch.full((2,), 833.0))
        nan = dataclasses.replace(good, z_k=torch.full((2, 3, 8, 16, 16), float("nan")))
        wrong = dataclasses.replace(good, z_k=torch.randn(2, 3, 4, 16, 16))

        refs = [[ray.put(good)], [ray.put(nan)], [ray.put(wrong)]]
        result = group.call("train_step", 0, refs, [])[0]
        assert (result["trained"], result["rejected"], result["lost"]) == (1, 2, 0)
        assert torch.isfinite(torch.tensor(result["loss"]))
        # the generator trains on DMD + real_weight x the co-training loss
        assert result["real_loss"] > 0
        assert result["loss"] == pytest.approx(result["dmd_loss"] + 3.0 * result["real_loss"], rel=1e-5)
    finally:
        group.shutdown()


def test_a_dead_learner_rank_stops_the_run_and_the_run_resumes_with_its_weight_version(
        ray_local, prepared_run, tmp_path, monkeypatch):
    from anyflow_ray.jobs import distill
    from learners.group import LearnerGroupError

    cfg = run_cfg(prepared_run, f"distill.output={tmp_path}/s2", "distill.steps=6", "distill.save_every=2",
                  "distill.log_every=1")
    original = LearnerGroup.submit

    def submit_and_die_at_step_3(self, method, *args, **kwargs):
        if method == "train_step" and args[0] == 3:
            ray.kill(self.workers[0], no_restart=True)
        return original(self, method, *args, **kwargs)

    monkeypatch.setattr(LearnerGroup, "submit", submit_and_die_at_step_3)
    with pytest.raises(LearnerGroupError, match="rank 0 died"):
        distill.run(cfg)
    out = tmp_path / "s2"
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000002"
    monkeypatch.setattr(LearnerGroup, "submit", original)
    distill.run(cfg)  # resumes from step 2 with weight version 2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    resumed = [r for r in records if r["step"] > 2][-4:]
    assert [r["step"] for r in resumed] == [3, 4, 5, 6]
    assert [r["distill/version"] for r in resumed] == [3, 4, 5, 6]


def test_a_stopped_run_resubmitted_continues_with_the_losses_of_an_uninterrupted_one(ray_local, prepared_run,
                                                                                     tmp_path):
    """ZeRO-2, strict alternation: 4 steps straight = 2 steps, then the same command with steps=4."""
    from anyflow_ray.jobs import distill

    common = ["distill.max_policy_lag=0", "rollout.num_actors=1", "learner.zero_stage=2", "distill.log_every=1",
              "distill.save_every=2"]
    straight = distill.run(run_cfg(prepared_run, f"distill.output={tmp_path}/straight", "distill.steps=4", *common))
    out = tmp_path / "resumed"
    distill.run(run_cfg(prepared_run, f"distill.output={out}", "distill.steps=2", *common))
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000002"
    distill.run(run_cfg(prepared_run, f"distill.output={out}", "distill.steps=4", *common))

    def records(path):
        return {r["step"]: r for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines())}

    want, got = records(straight), records(out)
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in ("loss", "dmd_loss", "real_loss", "critic_loss"):
            assert got[step][f"distill/{key}"] == pytest.approx(want[step][f"distill/{key}"], rel=1e-6), (step, key)
        assert got[step]["distill/version"] == want[step]["distill/version"] == step
    # the buffer's books continue the first part's (restored from the checkpoint's driver state)
    s_want = json.loads((straight / "pipeline_summary.json").read_text())
    s_got = json.loads((out / "pipeline_summary.json").read_text())
    summary_balances(s_got)
    assert s_got["trained"] == s_want["trained"] == 8
    for key in ("accepted", "taken", "trained"):
        assert s_got[key] == s_want[key], key
    meta = json.loads((out / "checkpoints" / "step-000004" / "training_state" / "meta.json").read_text())
    assert meta["weight_version"] == 4 and meta["driver_state"]["buffer"]["trained"] == 8
    assert {"student/mp_rank_00_model_states.pt",
            "critic/zero_pp_rank_0_mp_rank_00_optim_states.pt"} <= set(meta["files"])


@pytest.mark.parametrize("weights", ["current", "ema"])
def test_torch_dist_broadcast_gives_each_actor_the_learners_weights_even_mid_rollout(ray_local, prepared_run, weights):
    """distill.weight_sync=torch_dist: learner rank 0 + 2 rollout actors in a gloo group of their own. The
    broadcast carries exactly the learner's trainable tensors (their EMA with experiments.rollout_weights=ema),
    and lands even while an actor's rollout waits inside it for buffer space (no deadlock)."""
    from actors.buffer import TrajectoryBuffer
    from actors.weights import WeightRegistry
    from actors.fleet import RolloutFleet
    from actors.weights import CollectiveSync

    cfg = run_cfg(prepared_run, "distill.weight_sync=torch_dist", "rollout.num_actors=2", "distill.sync_timeout_s=30",
                  f"experiments.rollout_weights={weights}", "distill.ema=0.5", "distill.lr=1e-2")
    group = LearnerGroup(cfg, "distill", worker_cls=EmaProbe)
    names = f"mid-rollout-buffer-{weights}", f"mid-rollout-registry-{weights}"
    buffer = ray.remote(TrajectoryBuffer).options(name=names[0]).remote(1, 1)  # room for one trajectory
    registry = ray.remote(WeightRegistry).options(name=names[1]).remote()
    fleet = None
    try:
        sync = CollectiveSync(cfg, group, registry)
        fleet = sync.start(0, lambda: RolloutFleet(cfg, *names))
        assert ray.get([a.current_version.remote() for a in fleet.actors]) == [0, 0]
        # fill the buffer, then leave a second rollout waiting inside actor 0 for space
        assert ray.get(fleet.actors[0].rollout.remote("critic", 1))["version"] == 0
        blocked = fleet.actors[0].rollout.remote("critic", 2)
        assert not ray.wait([blocked], timeout=3)[0]
        # move the learner's weights, then broadcast them as version 1
        gen = [ray.put(Trajectory("generator", torch.tensor([0, 1]), 2, 0, torch.randn(2, 3, 8, 16, 16),
                                  torch.full((2,), 1000.0), torch.full((2,), 833.0)))]
        group.call("train_step", 0, [gen], [])
        trained = group.call("trainable_state")
        learner = trained if weights == "current" else group.call("gathered_ema")[0]
        before = ray.get(fleet.actors[1].state_of.remote(sorted(learner)))
        assert any(not torch.equal(before[n], learner[n]) for n in learner)
        assert (weights == "ema") == any(not torch.equal(trained[n], learner[n]) for n in learner)
        sync.publish(1, fleet)  # actor 0 takes it in its "weights" concurrency group
        assert ray.get([a.current_version.remote() for a in fleet.actors]) == [1, 1]
        assert ray.get(registry.loaded_versions.remote()) == {"rollout-0": 1, "rollout-1": 1}
        assert ray.get(registry.latest.remote())[0] == 1
        ray.get(buffer.take.remote("critic", 1, 1))  # room: the waiting rollout lands, stamped with its v0
        assert ray.get(blocked, timeout=60)["version"] == 0
        for actor in fleet.actors:
            held = ray.get(actor.state_of.remote(sorted(learner)))
            assert all(torch.equal(held[n], learner[n]) for n in learner)
    finally:
        for actor in ([*fleet.actors] if fleet else []) + [buffer, registry]:
            ray.kill(actor, no_restart=True)
        group.shutdown()


def test_torch_dist_sync_reforms_its_group_when_an_actor_restarts(ray_local, prepared_run, tmp_path, monkeypatch):
    from actors.fleet import RolloutFleet
    from anyflow_ray.jobs import distill

    calls = kill_an_actor_at_submit(monkeypatch, RolloutFleet, 5)
    cfg = run_cfg(prepared_run, f"distill.output={tmp_path}/s2", "distill.steps=6", "distill.save_every=6",
                  "rollout.num_actors=2", "distill.max_policy_lag=1", "distill.weight_sync=torch_dist")
    out = distill.run(cfg)
    summary = json.loads((out / "pipeline_summary.json").read_text())
    summary_balances(summary)
    assert calls.get("killed") and summary["restarts"] == 1, summary
    assert summary["trained"] + summary["lost"] == 12 and summary["rejected"] == 0
    sync = summary["weight_sync"]
    assert sync["backend"] == "torch_dist" and sync["publishes"] == 6 and sync["group_reforms"] >= 1, sync
    assert summary["actor_versions"] == [6, 6]
    assert summary["loaded_versions"] == {"rollout-0": 6, "rollout-1": 6}
    assert [v for _, v in summary["versions_at_start"]] == [-1, -1, -1]  # collective: nothing to pull at start


def test_distill_runs_at_zero3_on_two_ranks(ray_local, prepared_run, tmp_path):
    """The whole Stage-2 pipeline as the 14B config runs it: partitioned weights (every rank publishes,
    i.e. gathers, each version; the actor loads them; each checkpoint and the final export hold the whole
    EMA weights) and per-rank shards (each rank and the actor read their own share; trajectories carry
    their prompt embeddings, so none is rejected for an index the rank does not hold)."""
    from anyflow_ray.jobs import distill

    cfg = run_cfg(prepared_run, f"distill.output={tmp_path}/s2", "distill.num_ranks=2", "learner.zero_stage=3",
                  "distill.steps=3", "distill.save_every=3", "distill.log_every=1", "rollout.num_actors=1",
                  "distill.max_policy_lag=1", "distill.lr=1e-2", "data.rank_shards=true")
    out = distill.run(cfg)
    summary = json.loads((out / "pipeline_summary.json").read_text())
    summary_balances(summary)
    assert summary["trained"] == 12 and summary["lost"] == summary["rejected"] == 0  # 2 gen + 2 critic per step
    assert summary["weight_sync"]["publishes"] == 3
    assert summary["actor_versions"] == [summary["loaded_versions"]["rollout-0"]]
    assert 1 <= summary["loaded_versions"]["rollout-0"] <= 3  # loaded published versions, not only v0
    meta = json.loads((out / "checkpoints" / "step-000003" / "training_state" / "meta.json").read_text())
    assert meta["zero_stage"] == 3 and meta["world_size"] == 2 and meta["weight_version"] == 3
    initial = AnyFlowRayPipeline.from_pretrained(cfg.distill.init).transformer.state_dict()
    final = AnyFlowRayPipeline.from_pretrained(out).transformer.state_dict()
    # the checkpoint's own EMA partitions put together without DeepSpeed (training/export.py)
    saved = open_pipeline(out / "checkpoints" / "step-000003").transformer.state_dict()
    assert sorted(final) == sorted(initial)
    for name, value in final.items():
        assert value.shape == initial[name].shape and torch.isfinite(value).all()
        assert torch.equal(value, saved[name])  # the same EMA: gathered by the ranks, and from the checkpoint
    assert any(not torch.allclose(final[n], initial[n]) for n in initial)


class NonFiniteAtStep3(DistillWorker):
    """A learner rank whose student output turns to NaN at step 3 (as a diverging run's would)."""

    def train_step(self, step, generator_refs=(), critic_refs=()):
        self._poisoned = step == 2
        return super().train_step(step, generator_refs, critic_refs)

    def student_x_hat(self, payload):
        x_hat, context = super().student_x_hat(payload)
        return (x_hat * float("nan") if self._poisoned else x_hat), context


def test_a_non_finite_loss_stops_before_anything_is_applied_and_leaves_the_last_good_state(
        ray_local, prepared_run, tmp_path):
    """Step 3's loss is NaN. With lag 1, step 4 and the publish of version 3 are already queued on the
    ranks when it fails; the rank refuses both, so the last good state really is 2 optimizer steps, the
    failed batch is booked as rejected and the batch taken ahead as dropped: a resume balances."""
    from anyflow_ray.jobs import distill

    cfg = run_cfg(prepared_run, f"distill.output={tmp_path}/s2", "distill.steps=5", "distill.save_every=10",
                  "distill.log_every=1", "distill.max_policy_lag=1")
    with pytest.raises(RuntimeError, match=r"stopped at step 3: non-finite loss at step 3 on learner rank\(s\) \[0\]"
                                           r".*dmd=nan.*trajectory weight versions \[[12]") as err:
        distill.run(cfg, worker_cls=NonFiniteAtStep3)
    assert "step-000002" in str(err.value)
    out = tmp_path / "s2"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and records[-1]["distill/version"] == 2  # v3 never published
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000002"
    state = out / "checkpoints" / "step-000002" / "training_state"
    meta = json.loads((state / "meta.json").read_text())
    assert meta["step"] == 2 and meta["weight_version"] == 2
    engine = torch.load(state / "student" / "mp_rank_00_model_states.pt", weights_only=False)
    assert engine["global_steps"] == 2  # neither step 3 nor the queued step 4 reached the optimizer
    books = meta["driver_state"]["buffer"]
    assert books["trained"] == 4 and books["rejected"] == 2
    assert books["taken"] == books["trained"] + books["lost"] + books["rejected"]
    assert books["accepted"] == books["taken"] + books["dropped_stale"] + books["dropped_at_end"] + books["depth"]
    saved = open_pipeline(out / "checkpoints" / "step-000002").transformer.state_dict()
    assert all(torch.isfinite(t).all() for t in saved.values())
