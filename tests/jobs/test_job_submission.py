"""`ray job submit` against a real head on 127.0.0.1 with token authentication, and the dashboard metrics.

The head runs as `ray start --head --block` in a child process, so stopping it touches no other Ray
instance on the machine.
"""

import os
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from anyflow_ray.run.config import load_config

VENV_BIN = str(Path(sys.executable).parent)
TINY = ["model.tiny.num_layers=1", "model.tiny.ffn_dim=32", "data.num_train=32", "data.num_heldout=8",
        "distill.steps=20", "distill.log_every=1", "distill.save_every=10", "rollout.batch_size=2",
        "distill.real_batch=8", "distill.budgets=[2,4]", "learner.cpus_per_rank=0.5", "rollout.cpus_per_actor=0.25"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(args, env, **kw):
    return subprocess.run([f"{VENV_BIN}/ray", *args], env=env, capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from anyflow_ray.jobs.data import scaffold_untrained_run

    root = tmp_path_factory.mktemp("submit")
    return scaffold_untrained_run(load_config("configs/tiny.yaml", [f"run.output_dir={root}", *TINY]))


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    token = secrets.token_hex(16)
    ports = {name: _free_port() for name in ("gcs", "dashboard", "metrics", "agent")}
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "WANDB_MODE": "disabled",
           "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "RAY_metrics_report_interval_ms": "1000"}
    proc = subprocess.Popen([f"{VENV_BIN}/ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                             f"--port={ports['gcs']}", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={ports['dashboard']}", f"--metrics-export-port={ports['metrics']}",
                             f"--dashboard-agent-listen-port={ports['agent']}",
                             "--num-cpus=2", "--include-dashboard=true"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{ports['dashboard']}"
    deadline = time.monotonic() + 120
    while _ray(["job", "list", "--address", address], env).returncode != 0:
        assert proc.poll() is None, "ray start --head exited"
        assert time.monotonic() < deadline, "the head's dashboard did not come up"
        time.sleep(2)
    yield {"address": address, "env": env, "ports": ports}
    proc.terminate()
    proc.wait(timeout=60)
    # `ray start` recorded this head as the machine's current cluster; do not leave a dead address behind
    marker = Path("/tmp/ray/ray_current_cluster")
    if marker.is_file() and marker.read_text().strip().endswith(f":{ports['gcs']}"):
        marker.unlink()


def test_a_client_without_the_token_is_refused(head):
    for bad in ({"RAY_AUTH_TOKEN": "not-the-token"}, {}):
        env = {k: v for k, v in head["env"].items() if k != "RAY_AUTH_TOKEN"} | bad | {"HOME": "/nonexistent"}
        proc = _ray(["job", "list", "--address", head["address"]], env, timeout=120)
        assert proc.returncode != 0
        assert "auth" in (proc.stdout + proc.stderr).lower()


def test_submit_script_with_the_shipped_runtime_env_runs_a_tiny_distill_job(head, prepared):
    """cluster/submit.sh as a user runs it: cluster/runtime_env.yaml sets WANDB_MODE and
    TOKENIZERS_PARALLELISM too, and the driver must not set them a second time (Ray refuses that)."""
    entry = ["distill", "--config", "configs/tiny.yaml", f"run.output_dir={prepared}", *TINY]
    deadline = time.monotonic() + 120
    while True:  # the head's job agent may need a few more seconds than its dashboard
        proc = subprocess.run(["bash", "cluster/submit.sh", head["address"], "--no-wait", "--", *entry],
                              env=head["env"], capture_output=True, text=True, timeout=300)
        if proc.returncode == 0 or "No available agent" not in proc.stderr or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert proc.returncode == 0, proc.stderr[-2000:]
    job_id = re.search(r"raysubmit_[A-Za-z0-9]+", proc.stdout + proc.stderr).group(0)
    metrics_seen, status = set(), ""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        reply = _ray(["job", "status", "--address", head["address"], job_id], head["env"])
        status = (reply.stdout + reply.stderr).upper()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{head['ports']['metrics']}/metrics", timeout=5) as r:
                text = r.read().decode()
            metrics_seen |= {line.split("{")[0].split(" ")[0] for line in text.splitlines()
                             if line.startswith("ray_anyflow_") or line.startswith("anyflow_")}
        except OSError:
            pass
        if any(s in status for s in ("SUCCEEDED", "FAILED", "STOPPED")):
            break
        time.sleep(4)  # each `ray job status` is a new process: poll sparingly on two cores
    logs = _ray(["job", "logs", "--address", head["address"], job_id], head["env"]).stdout
    assert "SUCCEEDED" in status, logs[-3000:]
    assert (prepared / "stage2" / "model_index.json").is_file()
    names = {n.removeprefix("ray_") for n in metrics_seen}
    for expected in ("anyflow_buffer_depth", "anyflow_policy_lag", "anyflow_learner_steps_per_s",
                     "anyflow_weight_sync_s", "anyflow_loss"):
        assert expected in names, sorted(names)
