"""A local Ray instance and a prepared tiny run (model, data, an initial teacher folder) for learner tests."""

import pytest

from anyflow_ray.run.config import load_config

SMALL = ["model.tiny.num_layers=1", "model.tiny.ffn_dim=32", "data.num_train=64", "data.num_heldout=16",
         "teacher.batch_size=8", "pretrain.global_batch=8", "pretrain.warmup=2", "pretrain.lr=1e-3",
         "learner.num_ranks=1", "learner.cpus_per_rank=0.5", "learner.timeout_s=240", "run.threads=2",
         "rollout.batch_size=2", "rollout.cpus_per_actor=0.25", "distill.real_batch=8", "distill.lr=1e-4",
         "distill.budgets=[2,4]"]


@pytest.fixture(scope="session")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"WANDB_MODE": "disabled"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def prepared_run(tmp_path_factory):
    """make-tiny + data + untrained teacher and Stage-1 pipelines, through the jobs' own code."""
    from anyflow_ray.jobs.data import scaffold_untrained_run

    root = tmp_path_factory.mktemp("learners")
    return scaffold_untrained_run(load_config("configs/tiny.yaml", [f"run.output_dir={root}", *SMALL]))


def run_cfg(root, *extra):
    return load_config("configs/tiny.yaml", [f"run.output_dir={root}", *SMALL, *extra])
