"""Survival of a tiny Stage 1 and Stage 2 under faults injected one at a time; one line per fault.

    python tools/chaos.py [--root DIR] [--stages 1,2] [--faults kill-rank,kill-driver,...]

Each fault runs the real command line (``anyflow-ray pretrain`` / ``distill`` on configs/tiny.yaml made
small: 1 layer, 1 rank, 4 steps, a checkpoint every 2) in its own output folder, injects the fault from
outside (SIGKILL of the process by pid, bytes overwritten on disk, a second run started beside the first),
then runs the same command again, as an automatic retry would. It prints, per fault:

    stage1 kill-driver  recovered  exit -9 then 0; steps redone 1; data lost 0; losses equal to the unfaulted run, the same exported model

- recovered: the retry exits 0 and the stage's export is complete;
- steps redone: the metric records the retry moved to metrics.superseded.jsonl (trained again);
- data lost: steps of the unfaulted run missing from metrics.jsonl;
- losses: every step's loss against the unfaulted run's (equal: bit-equal, the runs are deterministic), and the
  exported transformer's SHA-256 against the unfaulted run's.

Faults: kill-rollout (a rollout actor, Stage 2), kill-rank (the learner rank), kill-driver (the driver and its
local Ray), kill-in-save (the rank while it writes a checkpoint), kill-before-export (the driver once the
last checkpoint is in place, before the export), corrupt-checkpoint (4 KiB overwritten in the newest
checkpoint's EMA file, its export removed), second-run (the same command started while the first trains).
Takes 15-25 minutes on 2 cores. Exit status 1 when any fault was not recovered.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "anyflow_ray.cli"]
SMALL = ["--config", "configs/tiny.yaml", "model.tiny.num_layers=1", "model.tiny.ffn_dim=32", "run.threads=1",
         "run.wandb_mode=disabled", "data.num_train=16", "data.num_heldout=8", "data.shard_size=8",
         "learner.num_ranks=1", "distill.num_ranks=1", "learner.cpus_per_rank=0.5", "teacher.batch_size=4",
         "teacher.warmup=1", "teacher.steps=2", "teacher.save_every=2", "pretrain.global_batch=4", "pretrain.warmup=1",
         "pretrain.steps=4", "pretrain.save_every=2", "pretrain.log_every=1", "distill.real_batch=4",
         "distill.steps=4", "distill.save_every=2", "distill.log_every=1", "distill.budgets=[2]",
         "rollout.batch_size=2", "rollout.cpus_per_actor=0.25", "run.keep_checkpoints=3", "run.lease_expiry_s=30"]
JOBS = {"1": "pretrain", "2": "distill"}
FAULTS = ("kill-rollout", "kill-rank", "kill-driver", "kill-in-save", "kill-before-export", "corrupt-checkpoint",
          "second-run")
PROCESS = {"kill-rollout": "ray::RolloutActor", "kill-rank": "Worker", "kill-in-save": "Worker"}


def command(root: Path, job: str, out: Path | None = None, *extra: str) -> list[str]:
    args = [*CLI, job, *SMALL, f"run.output_dir={root}", *extra]
    return args + ([f"{job}.output={out}"] if out else [])


def start(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen(args, cwd=REPO, stdout=log.open("a"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc: Linux)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def find(pid: int, title: str) -> int | None:
    """The first process below ``pid`` whose command line contains ``title`` (Ray names its workers
    ``ray::<ActorClass>...``; a learner rank is ``ray::LearnerWorker`` / ``ray::DistillWorker``)."""
    for child in descendants(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmdline.startswith("ray::") and title in cmdline.split(" ")[0]:
            return child
    return None


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the driver and everything it started (its local Ray): a lost node, not a polite stop."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 600.0, poll: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    return False


def logged_steps(out: Path) -> int:
    try:
        return sum(1 for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip())
    except OSError:
        return 0


def saving(out: Path) -> bool:
    """A checkpoint folder being written: its training_state there, its meta.json not yet."""
    return any((p / "training_state").is_dir() and not (p / "training_state" / "meta.json").is_file()
               for p in (out / "checkpoints").glob("step-*"))


def latest_is(out: Path, step: int) -> bool:
    try:
        return (out / "checkpoints" / "latest").read_text().strip() == f"step-{step:06d}"
    except OSError:
        return False


def losses(out: Path, job: str) -> dict[int, float]:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return {}
    return {r["step"]: r[f"{job}/loss"] for r in map(json.loads, filter(str.strip, lines))}


def redone(out: Path) -> int:
    path = out / "metrics.superseded.jsonl"
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.is_file() else 0


def export_done(out: Path, step: int) -> bool:
    try:
        return json.loads((out / "export.json").read_text()).get("step") == step
    except (OSError, ValueError):
        return False


def model_hash(out: Path) -> str | None:
    """The SHA-256 export.json recorded for the exported transformer's weights."""
    try:
        files = json.loads((out / "export.json").read_text())["files"]
    except (OSError, ValueError, KeyError):
        return None
    return next((r["sha256"] for rel, r in files.items() if rel.startswith("transformer/") and rel.endswith(".safetensors")), None)


def overwrite(path: Path, offset: int = 4096, size: int = 4096) -> None:
    data = bytearray(path.read_bytes())
    offset = min(offset, len(data) // 2)
    data[offset:offset + size] = bytes(b ^ 0x5A for b in data[offset:offset + size])
    path.write_bytes(bytes(data))


def inject(fault: str, job: str, root: Path, out: Path, log: Path) -> tuple[list[int], str]:
    """Run ``job`` into ``out`` with ``fault``; (exit codes, a note) of the faulted run(s) before the retry."""
    args = command(root, job, out)
    if fault == "corrupt-checkpoint":  # a finished run whose newest checkpoint rots and whose export is lost
        first = subprocess.run(args, cwd=REPO, stdout=log.open("a"), stderr=subprocess.STDOUT,
                               env={**os.environ, "WANDB_MODE": "disabled"}).returncode
        overwrite(out / "checkpoints" / "step-000004" / "training_state" / "rank-00000.safetensors")
        (out / "export.json").unlink()
        return [first], "EMA of step 4 overwritten in place"
    proc = start(args, log)
    note = ""
    if fault in PROCESS:
        ready = (lambda: saving(out)) if fault == "kill-in-save" else (lambda: logged_steps(out) >= 1)
        if wait_for(ready, proc, poll=0.005 if fault == "kill-in-save" else 0.1):
            pid = find(proc.pid, PROCESS[fault])
            if pid:
                os.kill(pid, signal.SIGKILL)
                note = f"killed {PROCESS[fault]} pid {pid}"
    elif fault == "kill-driver":
        if wait_for(lambda: logged_steps(out) >= 3, proc, poll=0.05):
            kill_tree(proc)
            note = "driver and its Ray killed after step 3"
    elif fault == "kill-before-export":
        if wait_for(lambda: latest_is(out, 4), proc, poll=0.005):
            kill_tree(proc)
            note = "killed once checkpoints/latest named step 4"
    elif fault == "second-run":
        if wait_for(lambda: (out / ".lease.json").is_file(), proc, poll=0.05):
            second = subprocess.run(args, cwd=REPO, capture_output=True, text=True,
                                    env={**os.environ, "WANDB_MODE": "disabled"}, timeout=300)
            refused = "being written by" in second.stderr
            note = f"second run exit {second.returncode}, {'refused' if refused else 'NOT refused'}"
            proc.wait()
            return [second.returncode, proc.returncode], note
    proc.wait()
    return [proc.returncode], note or "the fault found no moment to strike"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="work folder (default: a new temporary one)")
    parser.add_argument("--stages", default="1,2")
    parser.add_argument("--faults", default=",".join(FAULTS))
    opts = parser.parse_args()
    root = Path(opts.root or tempfile.mkdtemp(prefix="anyflow-chaos-")).absolute()
    root.mkdir(parents=True, exist_ok=True)
    log = root / "chaos.log"
    env = {**os.environ, "WANDB_MODE": "disabled"}
    for setup in (["make-tiny"], ["data"], ["teacher"]):  # the inputs, once
        if subprocess.run(command(root, setup[0]), cwd=REPO, stdout=log.open("a"), stderr=subprocess.STDOUT,
                          env=env).returncode:
            print(f"set-up `{setup[0]}` failed: see {log}")
            return 1
    failures = 0
    for stage in opts.stages.split(","):
        job = JOBS[stage]
        clean = root / f"{job}-clean"
        extra = [] if job == "pretrain" else [f"distill.init={root / 'pretrain-clean'}"]
        SMALL.extend(extra)
        if subprocess.run(command(root, job, clean), cwd=REPO, stdout=log.open("a"), stderr=subprocess.STDOUT,
                          env=env).returncode:
            print(f"stage{stage}: the unfaulted run failed: see {log}")
            return 1
        baseline = losses(clean, job)
        for fault in opts.faults.split(","):
            if fault == "kill-rollout" and job != "distill":
                continue
            out = root / f"{job}-{fault}"
            started = time.monotonic()
            codes, note = inject(fault, job, root, out, log)
            retry = subprocess.run(command(root, job, out), cwd=REPO, stdout=log.open("a"), stderr=subprocess.STDOUT,
                                   env=env).returncode
            got = losses(out, job)
            ok = retry == 0 and export_done(out, 4) and (fault != "second-run" or "refused" in note.split(", ")[-1])
            lost = sorted(set(baseline) - set(got))
            gap = max((abs(got[k] - v) / max(abs(v), 1e-12) for k, v in baseline.items() if k in got), default=0.0)
            equal = "equal to" if got == baseline else f"within {gap:.1e} (relative) of"
            same_model = "the same" if model_hash(out) == model_hash(clean) else "ANOTHER"
            failures += not ok
            print(f"stage{stage} {fault:<19} {'recovered' if ok else 'NOT RECOVERED':<13} exit "
                  f"{' then '.join(map(str, codes))} then {retry}; steps redone {redone(out)}; data lost "
                  f"{len(lost)}{' ' + str(lost) if lost else ''}; losses {equal} the unfaulted run, {same_model} "
                  f"exported model "
                  f"({note}; {time.monotonic() - started:.0f} s)", flush=True)
        for item in extra:
            SMALL.remove(item)
    print(f"log: {log}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
