"""cluster/ files parse, and every entrypoint in them is a valid anyflow-ray command line."""

import shlex
from pathlib import Path

import yaml

from anyflow_ray.cli import COMMANDS, parse_args
from anyflow_ray.config import load_config

CLUSTER = Path("cluster")


def _check_entrypoint(entrypoint: str) -> None:
    words = shlex.split(entrypoint)
    assert words[0] == "anyflow-ray"
    assert words[1] in COMMANDS
    args = parse_args(words[1:])
    load_config(args.config, args.overrides)  # the config file exists and every override is a valid key


def test_rayjob_manifest():
    doc = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())
    assert doc["kind"] == "RayJob" and doc["apiVersion"] == "ray.io/v1"
    _check_entrypoint(doc["spec"]["entrypoint"])
    head = doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "RAY_AUTH_MODE", "value": "token"} in head["env"]
    workers = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
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


def test_readme_and_submit_script_use_valid_commands():
    text = (CLUSTER / "README.md").read_text()
    for line in text.splitlines():
        if line.startswith("ray job submit") and " -- " in line:
            _check_entrypoint(line.split(" -- ", 1)[1])
    assert "anyflow-ray" in (CLUSTER / "submit.sh").read_text()
