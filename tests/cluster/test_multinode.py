"""A two-node Ray cluster on one machine: a head with no GPU (where a submitted job's driver runs) and a
node that advertises two GPUs (fake: Ray schedules by the number, the processes find no CUDA and say so).

What a GPU cluster changes and a one-node run cannot show: learner bundles ask for the GPUs the config
says (never what the driver has), ranks land on the GPU node, every process resolves its own device,
colocated rollout actors share the learners' bundles, and everything lands under one storage root
while the driver and rank 0 sit on different nodes.
"""

import json

import pytest
import ray
from ray.cluster_utils import Cluster

from anyflow_ray.run.config import load_config
from anyflow_ray.run.device import cuda_index
from learners.placement import Placement, PlacementError, check, fits

SMALL = ["model.tiny.num_layers=1", "model.tiny.ffn_dim=32", "data.num_train=32", "data.num_heldout=8",
         "pretrain.global_batch=8", "learner.cpus_per_rank=0.5", "learner.timeouts.step=300", "learner.timeouts.setup=300", "run.threads=2",
         "rollout.batch_size=2", "rollout.cpus_per_actor=0.25", "distill.real_batch=8", "distill.lr=1e-4",
         "distill.budgets=[2,4]", "distill.log_every=1"]


@pytest.fixture(scope="module")
def two_nodes():
    if ray.is_initialized():  # another module's local instance: this module needs its own cluster
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    gpu_node = cluster.add_node(num_cpus=3, num_gpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, runtime_env={"env_vars": {"WANDB_MODE": "disabled"}})
    head_id = ray.get_runtime_context().get_node_id()
    yield {"head": head_id, "gpu_node": gpu_node.node_id}
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def shared_root(tmp_path_factory):
    """A folder standing in for the storage every node mounts, prepared by the jobs' own code."""
    from anyflow_ray.jobs.data import scaffold_untrained_run

    root = tmp_path_factory.mktemp("shared-storage")
    return scaffold_untrained_run(load_config("configs/tiny.yaml", [f"run.output_dir={root}", *SMALL]))


def test_placement_fit_is_decided_per_node():
    two_gpu_node, head = {"CPU": 4.0, "GPU": 2.0}, {"CPU": 8.0}
    plan = Placement(num_ranks=2, rank_cpus=1.0, rank_gpus=1.0, num_actors=2, actor_cpus=1.0, actor_gpus=1.0)
    assert not fits(plan.demands(), [head, two_gpu_node])  # 4 GPUs asked, 2 exist
    colocated = Placement(num_ranks=2, rank_cpus=1.0, rank_gpus=0.5, num_actors=2, actor_cpus=1.0, actor_gpus=0.5,
                          colocate=True)
    assert colocated.bundle == {"CPU": 2.0, "GPU": 1.0}
    assert fits(colocated.demands(), [head, two_gpu_node])
    with pytest.raises(PlacementError, match="learner.gpus_per_rank") as err:
        check(plan, [head, two_gpu_node], autoscaling=False)
    assert "{'CPU': 4.0, 'GPU': 2.0}" in str(err.value) and "{'CPU': 1.0, 'GPU': 1.0}" in str(err.value)
    check(plan, [head, two_gpu_node], autoscaling=True)  # nodes may join: left to the placement group


def test_learner_ranks_ask_for_the_clusters_gpus_and_land_on_the_gpu_node(two_nodes, shared_root):
    from learners.group import LearnerGroup

    cfg = load_config("configs/tiny.yaml", [f"run.output_dir={shared_root}", *SMALL, "learner.num_ranks=2"])
    assert cfg.learner.gpus_per_rank == "auto"  # the driver (on the GPU-less head) decides nothing itself
    group = LearnerGroup(cfg, "pretrain")
    try:
        assert group.plan.bundle == {"CPU": 0.5, "GPU": 1.0}
        assert {info["node_id"] for info in group.info} == {two_nodes["gpu_node"]}
        assert sorted(info["gpu_ids"][0] for info in group.info) == ["0", "1"]
        assert all(info["device"] == "cpu" for info in group.info)  # fake GPUs: each rank found no CUDA itself
        # learner.see_node_gpus: Ray left CUDA_VISIBLE_DEVICES unset, so each rank sees the node's GPUs (NCCL
        # P2P/NVLink between them) and selects its own by id
        assert all(info["visible_devices"] is None and info["cuda_index"] == int(info["gpu_ids"][0])
                   for info in group.info)
        assert all(info["backend"] == "gloo" and info["allreduce_busbw_gbs"] > 0 for info in group.info)
    finally:
        group.shutdown()
    # learner.see_node_gpus=false keeps Ray's default: a process sees only the GPU it was given, as device 0
    seen = ray.get(_visible_devices.options(num_gpus=1).remote())
    assert seen["visible"] == seen["gpu_ids"][0] and cuda_index(seen["gpu_ids"], seen["visible"]) == 0


@ray.remote
def _visible_devices() -> dict:
    import os

    return {"visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "gpu_ids": [str(i) for i in ray.get_gpu_ids()]}


class _WhereActor:
    """A rollout actor that only says where it runs (RolloutFleet's actor_cls: no model to load)."""

    def __init__(self, cfg, actor_id, buffer, registry):
        self.actor_id = actor_id

    def whereabouts(self) -> dict:
        return {"actor": self.actor_id, "node_id": ray.get_runtime_context().get_node_id(),
                "gpu_ids": [str(i) for i in ray.get_gpu_ids()]}


def test_a_placement_the_cluster_cannot_hold_fails_at_once_naming_it(two_nodes, shared_root):
    from learners.group import LearnerGroup

    cfg = load_config("configs/tiny.yaml", [f"run.output_dir={shared_root}", *SMALL, "learner.num_ranks=2",
                                            "learner.gpus_per_rank=2"])
    with pytest.raises(PlacementError, match=r"2 learner bundle\(s\) of \{'CPU': 0.5, 'GPU': 2.0\}"):
        LearnerGroup(cfg, "pretrain")
    assert ray.util.placement_group_table() == {} or all(
        pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())


def test_stage2_on_two_ranks_with_colocated_actors_one_killed_everything_under_the_storage_root(
        two_nodes, shared_root, monkeypatch):
    from actors.fleet import RolloutFleet
    from anyflow_ray.jobs import distill
    from tests.probes import kill_an_actor_at_submit, summary_balances

    seen = {}
    original = RolloutFleet.__init__

    def remember_where_actors_run(self, *args, **kwargs):
        original(self, *args, **kwargs)
        seen["actors"] = ray.get([a.whereabouts.remote() for a in self.actors])

    monkeypatch.setattr(RolloutFleet, "__init__", remember_where_actors_run)
    calls = kill_an_actor_at_submit(monkeypatch, RolloutFleet, 5)
    run = [f"run.output_dir={shared_root}", *SMALL, "distill.num_ranks=2", "rollout.num_actors=2",
           "rollout.colocate=true", "distill.save_every=3"]
    out = distill.run(load_config("configs/tiny.yaml", [*run, "distill.steps=6"]))
    assert calls.get("killed")
    summary = json.loads((out / "pipeline_summary.json").read_text())
    summary_balances(summary)
    # one generator + one critic trajectory per rank per step; one owned by the killed actor may be lost
    assert summary["taken"] == 6 * 2 * 2 and summary["trained"] + summary["lost"] == summary["taken"]
    assert summary["restarts"] >= 1
    # colocated: the actors sit in the learners' bundles on the GPU node, half a GPU each
    assert {a["node_id"] for a in seen["actors"]} == {two_nodes["gpu_node"]}
    assert all(len(a["gpu_ids"]) == 1 and a["device"] == "cpu" for a in seen["actors"])
    # the driver (head) and rank 0 (GPU node) both wrote under the one root
    for path in ("config.yaml", "metrics.jsonl", "pipeline_summary.json", "model_index.json",
                 "checkpoints/latest", "checkpoints/step-000006"):
        assert (out / path).exists(), path
    assert out.is_relative_to(shared_root)
    # resume reads it back: the same command with a larger budget continues from step 6
    monkeypatch.undo()
    longer = distill.run(load_config("configs/tiny.yaml", [*run, "distill.steps=7"]))
    records = [json.loads(line) for line in (longer / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 7 and records[-1]["distill/version"] == 7


def test_auto_starts_the_planned_rollout_fleet_on_the_gpu_node(two_nodes, shared_root):
    """rollout.num_actors=auto: the consistency rollout at N=32 (16.5 calls a clip) outweighs one learner rank's
    step, so the plan is 2 one-GPU actors; they start on the GPU node, one fake GPU each."""
    from actors.fleet import RolloutFleet
    from anyflow_ray.run.fleet_plan import fleet_plan
    from learners.placement import plan

    cfg = load_config("configs/tiny.yaml", [f"run.output_dir={shared_root}", *SMALL, "distill.num_ranks=1",
                                            "distill.rollout=consistency", "distill.budgets=[32]",
                                            "distill.real_batch=4", "rollout.num_actors=auto"])
    grad = 4 if cfg.model.gradient_checkpointing else 3  # forward + backward (+ recompute)
    learner = 2 * 1 * grad + 2 * 3 + 4 * (grad + 3) + 2 * grad  # jump, DMD, co-training, critic
    assert fleet_plan(cfg).rollout_gpus == pytest.approx(2 * 2 * 16.5 / learner)
    assert cfg.rollout.num_actors == fleet_plan(cfg).num_actors == 2
    placement = plan(cfg, 1, cfg.rollout.num_actors)
    assert placement.actor_resources() == {"CPU": 0.25, "GPU": 1.0}
    fleet = RolloutFleet(cfg, "no-buffer", "no-registry", placement=placement, actor_cls=_WhereActor)
    try:
        where = ray.get([actor.whereabouts.remote() for actor in fleet.actors], timeout=120)
        assert len(where) == 2 and {w["node_id"] for w in where} == {two_nodes["gpu_node"]}
        assert sorted(w["gpu_ids"][0] for w in where) == ["0", "1"]
    finally:
        for handle in fleet.actors:
            ray.kill(handle)


def test_run_storage_uri_holds_the_run_and_a_node_with_an_empty_disk_resumes_from_it(two_nodes, shared_root,
                                                                                      tmp_path):
    """``run.storage=file://...`` takes the same pyarrow.fs path as s3:// or gs://: the driver (head) and the
    ranks (GPU node) each upload what they write; after the staging folder is wiped (new nodes), the
    same command fetches inputs and the checkpoint from storage and continues."""
    import shutil

    from anyflow_ray.jobs import distill
    from anyflow_ray.run.storage import Storage

    bucket, staging = tmp_path / "bucket", tmp_path / "staging"
    seed = Storage(f"file://{bucket}", shared_root)  # inputs put there once, as `aws s3 sync` would
    for name in ("base-model", "data", "teacher", "stage1"):
        seed.upload(shared_root / name)
    run = [f"run.output_dir={staging}", f"run.storage=file://{bucket}", *SMALL, "distill.num_ranks=2",
           "rollout.num_actors=2", "rollout.colocate=true", "distill.save_every=2", "run.keep_checkpoints=1"]
    distill.run(load_config("configs/tiny.yaml", [*run, "distill.steps=4"]))
    stored = bucket / "stage2"
    for path in ("config.yaml", "metrics.jsonl", "pipeline_summary.json", "model_index.json",
                 "transformer", "checkpoints/latest", "checkpoints/step-000004/training_state/meta.json"):
        assert (stored / path).exists(), path
    assert not (stored / "checkpoints" / "step-000002").exists()  # rotation reaches storage too

    shutil.rmtree(staging)
    distill.run(load_config("configs/tiny.yaml", [*run, "distill.steps=5"]))
    records = [json.loads(line) for line in (stored / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]  # one record, continued from storage
    assert (stored / "checkpoints" / "latest").read_text().strip() == "step-000005"
