"""A local Ray instance and a prepared tiny run (model, data, an initial teacher folder) for learner tests."""

import pytest

from tests.probes import run_cfg


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
    return scaffold_untrained_run(run_cfg(root))
