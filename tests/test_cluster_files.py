"""cluster/ files parse, and every entrypoint in them is a valid anyflow-ray command line."""

import shlex
from pathlib import Path

import yaml

from anyflow_ray.cli import COMMANDS, parse_args
from anyflow_ray.run.config import load_config

CLUSTER = Path("cluster")


def _check_entrypoint(entrypoint: str) -> None:
    words = shlex.split(entrypoint)
    assert words[0] == "anyflow-ray"
    assert words[1] in COMMANDS
    args = parse_args(words[1:])
    load_config(args.config, args.overrides)  # the config file exists and every override is a valid key


def test_rayjob_manifest():
    """Its GPUs are the job's: one per learner rank and the planned rollout fleet's (run/fleet_plan.py)."""
    doc = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())
    assert doc["kind"] == "RayJob" and doc["apiVersion"] == "ray.io/v1"
    _check_entrypoint(doc["spec"]["entrypoint"])
    head = doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "RAY_AUTH_MODE", "value": "token"} in head["env"]
    gpus = {group["groupName"]: group["replicas"] * int(
        group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        for group in doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    args = parse_args(shlex.split(doc["spec"]["entrypoint"])[1:])
    cfg = load_config(args.config, args.overrides)
    assert gpus == {"learners": cfg.distill.num_ranks, "rollouts": cfg.rollout.num_actors} == {"learners": 8, "rollouts": 2}
    yaml.safe_load(doc["spec"]["runtimeEnvYAML"])


def test_ray_up_config():
    doc = yaml.safe_load((CLUSTER / "ray-up.yaml").read_text())
    assert doc["head_node_type"] in doc["available_node_types"]
    assert any(t["resources"].get("GPU") for t in doc["available_node_types"].values())
    assert any("ray start --head" in c for c in doc["head_start_ray_commands"])
    assert any("RAY_AUTH_MODE=token" in c for c in doc["head_start_ray_commands"])


def test_runtime_env():
    doc = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert set(doc) <= {"pip", "env_vars", "excludes", "working_dir"}
    assert all(isinstance(v, str) for v in doc["env_vars"].values())


def test_driver_adds_only_the_env_vars_the_submitted_job_lacks():
    """Ray refuses a driver whose ray.init sets an env var the submitted job's runtime env sets too."""
    import json

    from anyflow_ray.jobs.ray_runtime import JOB_CONFIG_VAR, driver_runtime_env

    cfg = load_config(None, [])
    shipped = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    submitted = {JOB_CONFIG_VAR: json.dumps({"runtime_env": shipped})}
    assert driver_runtime_env(cfg, submitted) == {}
    partial = {JOB_CONFIG_VAR: json.dumps({"runtime_env": {"env_vars": {"WANDB_MODE": "online"}}})}
    assert driver_runtime_env(cfg, partial) == {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    alone = driver_runtime_env(cfg, {"WANDB_MODE": "disabled"})  # not submitted: the driver sets both
    assert alone == {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}}


def test_readme_and_submit_script_use_valid_commands():
    text = (CLUSTER / "README.md").read_text()
    checked = 0
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("ray job submit") and " -- " in line:
            _check_entrypoint(line.split(" -- ", 1)[1])
            checked += 1
        elif line.startswith("cluster/submit.sh "):  # submit.sh ADDRESS [flags --] command args
            words = shlex.split(line)[2:]
            words = words[words.index("--") + 1:] if "--" in words else words
            if not words[-1].endswith("..."):
                _check_entrypoint(" ".join(["anyflow-ray", *words]))
                checked += 1
    assert checked >= 3
    assert "anyflow-ray" in (CLUSTER / "submit.sh").read_text()
