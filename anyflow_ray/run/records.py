"""Runs are records: a training job's output folder is never silently rewritten.

Before a training job (teacher, Stage 1, Stage 2) takes any resource, ``open_run`` compares the
config with the one the folder's earlier run recorded (``<output>/config.yaml``) and with its latest
checkpoint (``checkpoints/latest`` -> ``training_state/meta.json``):

- no earlier run, or ``run.new_run=true``: a fresh run (``run.new_run`` picks ``<output>-2``, ``-3``, ...
  when ``<output>`` already holds a run, and says so);
- an earlier run whose config differs in anything that shapes the model or its training: refused,
  listing each key as ``old -> new``. Only the step budgets and the logging / IO knobs of
  ``HARMLESS`` may change between a run and its resume;
- its latest checkpoint already at the step budget: nothing to train; the job says so in one line and
  writes nothing (``RunRecord.done``), unless the stage's export of that step is missing or incomplete
  (the run died after its last checkpoint): then it is exported from that checkpoint
  (``RunRecord.export_only``; the export is the only copy of the model, checkpoints hold no pipeline).

``config.yaml`` is then written by the job when it starts fresh or once it has trained (never by a
resume that is refused or has nothing to do). Ray-free: it reads two small files.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from anyflow_ray.training.checkpoint import LATEST, choose_resume, resume_candidates, settle_resume, state_dir
from anyflow_ray.training.export import MARKER as EXPORT_MARKER, export_complete
from anyflow_ray.run.config import INHERITED, MOVED, ConfigError
from anyflow_ray.run.lease import Lease
from anyflow_ray.run.storage import Storage

# job -> (its config section, the sections that shape its model, data and training)
JOB_SECTIONS = {
    "teacher": ("teacher", ("run", "model", "schedule", "data", "learner", "teacher")),
    "pretrain": ("pretrain", ("run", "model", "schedule", "data", "learner", "pretrain")),
    "distill": ("distill", ("run", "model", "schedule", "data", "learner", "pretrain", "rollout", "distill", "experiments")),
}
# keys a resume may change: step budgets, logging, checkpoint cadence, IO and scheduling knobs that do not
# touch the model, the data or the optimisation (run.output_dir: the resolved folders below stand for it)
HARMLESS = frozenset({
    "teacher.steps", "pretrain.steps", "distill.steps",
    "teacher.log_every", "pretrain.log_every", "distill.log_every",
    "teacher.save_every", "pretrain.save_every", "distill.save_every",
    "pretrain.resume", "distill.resume",
    "run.output_dir", "run.new_run", "run.lease_expiry_s", "run.wandb_mode", "run.wandb_project", "run.keep_checkpoints",
    "run.autoscaling", "run.gpu_memory_gb", "run.threads",
    "learner.master_port", "distill.sync_timeout_s", "run.export_dtype",
    "rollout.num_actors", "learner.see_node_gpus",  # the fleet scales on a resume; which GPU index a rank uses
    *(f"learner.timeouts.{phase}" for phase in ("placement", "setup", "step", "save", "collective")),
})
# folders compared by their place in run.output_dir when inside it (a copied or moved run folder resumes),
# else as absolute paths (a run started with a relative path resumes with an absolute one)
PATH_KEYS = frozenset({"model.base", "data.root", "teacher.output", "pretrain.output", "pretrain.init",
                       "distill.output", "distill.init", "distill.teacher"})


class RunRefused(ConfigError):
    """A resume the earlier run's record does not allow; the message says what differs and what to do."""


@dataclass(frozen=True)
class RunRecord:
    cfg: DictConfig  # the config the job runs with (its output key moved when run.new_run picked a new folder)
    out: Path  # the job's output folder
    start: int  # the step the latest checkpoint is at (0: a fresh run)
    fresh: bool  # nothing of an earlier run is resumed; config.yaml may be written at once
    done: bool  # the latest checkpoint is at the step budget: nothing to train, nothing to write
    export_only: bool = False  # trained to the budget, its export missing or incomplete: export it only


def open_run(cfg: DictConfig, job: str) -> RunRecord:
    """Decide, from files only, whether ``job`` starts fresh, resumes, is refused or has nothing to do."""
    section, _ = JOB_SECTIONS[job]
    out = Path(cfg[section].output)
    steps, resume = int(cfg[section].steps), bool(cfg[section].get("resume", True))
    _fetch_record(cfg, out)
    if cfg.run.get("new_run", False) and holds_run(out):
        fresh_out = next_free(out)
        print(f"{job}: {out} holds an earlier run; run.new_run=true: this run writes to {fresh_out}", flush=True)
        return RunRecord(_with_output(cfg, section, fresh_out), fresh_out, 0, fresh=True, done=False)
    storage = Storage.of(cfg)
    meta = resume_meta(out, storage)
    recorded = out / "config.yaml"
    if recorded.is_file() and meta is None:  # nothing of it would be resumed: its record binds nothing
        print(f"{job}: {out} holds the config of an earlier run that saved no checkpoint; this run starts "
              f"afresh there with its own config", flush=True)
    elif recorded.is_file():
        changes = config_changes(_read_yaml(recorded), OmegaConf.to_container(cfg, resolve=True), job)
        if changes:
            raise RunRefused(f"{out} holds a run whose config differs in {'; '.join(changes)}: resuming it "
                             f"would change its record. Set run.new_run=true to start a fresh folder "
                             f"({next_free(out)}), or restore those values")
    if meta is None:
        return RunRecord(cfg, out, 0, fresh=True, done=False)
    step = int(meta.get("step", 0))
    if not resume:
        raise RunRefused(f"{section}.resume=false but {out} holds a run (checkpoint at step {step}): set "
                         f"run.new_run=true to start a fresh folder ({next_free(out)}), or remove {out}")
    key = "distill.num_ranks" if job == "distill" else "learner.num_ranks"
    ranks = int(OmegaConf.select(cfg, key))
    if meta.get("world_size") not in (None, ranks):
        raise RunRefused(f"{out}: its checkpoint at step {step} was written by {meta['world_size']} rank(s), "
                         f"{key} asks for {ranks}: resume with {key}={meta['world_size']}, or set "
                         f"run.new_run=true to start a fresh folder")
    if step >= steps:
        if not export_complete(out, step, check_files=not storage.enabled):
            if not storage.enabled:  # the export is rebuilt from this checkpoint: it must be intact
                ckpt, meta, damaged, warning = choose_resume(out, ranks)
                if warning:
                    print(f"{job}: {warning}", flush=True)
                    settle_resume(out, ckpt, damaged)
                if ckpt is None or int(meta["step"]) < steps:
                    return RunRecord(cfg, out, int(meta["step"]) if meta else 0, fresh=ckpt is None, done=False)
            print(f"{job}: {out} trained to step {step} of {section}.steps={steps} but its export is missing or "
                  f"incomplete: exporting it from checkpoints/{_latest_name(out, step)}", flush=True)
            return RunRecord(cfg, out, step, fresh=False, done=False, export_only=True)
        print(f"{job}: nothing to train: {out} is at step {step} of {section}.steps={steps} (raise "
              f"{section}.steps to train on); its files are left as they are", flush=True)
        return RunRecord(cfg, out, step, fresh=False, done=True)
    return RunRecord(cfg, out, step, fresh=False, done=False)


def hold_run(cfg: DictConfig, job: str) -> tuple[RunRecord, Lease]:
    """``open_run`` under the lease of the folder it decides on (``run.lease``): refused in one line while
    another live run writes it. The caller releases the lease (``with lease:``) when the job ends."""
    section, _ = JOB_SECTIONS[job]
    out, storage = Path(cfg[section].output), Storage.of(cfg)
    lease = Lease(out, job, float(cfg.run.lease_expiry_s), storage).acquire()
    try:
        record = open_run(cfg, job)
        if record.out != out:  # run.new_run picked a fresh folder: that one is held instead
            fresh = Lease(record.out, job, float(cfg.run.lease_expiry_s), storage).acquire()
            lease.release()
            lease = fresh
    except BaseException:
        lease.release()
        raise
    return record, lease


def config_changes(old: dict, new: dict, job: str) -> list[str]:
    """``key: old -> new`` for every key of ``job``'s sections that differs and is not ``HARMLESS``. Keys
    only one side has (a config written by another version) are not compared; an old record's keys are
    read where they live now (``config.MOVED``), and its "0 / -1: follow that key" (``config.INHERITED``,
    before those defaults were interpolations) as that key's value."""
    _, sections = JOB_SECTIONS[job]
    flat_old = {MOVED.get(k, k): v for k, v in _flatten(old).items()}
    if flat_old.get("distill.grad_scope") == "jump":  # now experiments.grad_jump_only (it ignores grad_scope)
        flat_old.update({"distill.grad_scope": new.get("distill", {}).get("grad_scope"),
                         "experiments.grad_jump_only": True})
    for key, (source, legacy) in INHERITED.items():
        if key in flat_old and source in flat_old and flat_old[key] == legacy:
            flat_old[key] = flat_old[source]
    flat_old = {k: v for k, v in flat_old.items() if k.split(".")[0] in sections}
    flat_new = _flatten(new)
    changes = []
    for key in sorted(flat_old.keys() & flat_new.keys()):
        if key in HARMLESS:
            continue
        before, after = flat_old[key], flat_new[key]
        if key in PATH_KEYS:  # a folder inside the run's root counts by its place in it: a moved root resumes
            before = _in_root(before, flat_old.get("run.output_dir"))
            after = _in_root(after, flat_new.get("run.output_dir"))
        if before != after:
            changes.append(f"{key}: {flat_old[key]!r} -> {flat_new[key]!r}")
    return changes


def _in_root(path, root):
    """A local folder as ``<run.output_dir>/relative`` when it lies under ``root``, else absolute."""
    if not isinstance(path, str) or "://" in path:
        return path
    path = os.path.abspath(path)
    if isinstance(root, str) and "://" not in root:
        root = os.path.abspath(root)
        if path == root or path.startswith(root + os.sep):
            return os.path.join("<run.output_dir>", os.path.relpath(path, root))
    return path


def holds_run(out: Path) -> bool:
    """Whether ``out`` holds the record of an earlier run (its config or a checkpoint)."""
    return (out / "config.yaml").is_file() or (out / "checkpoints" / LATEST).is_file()


def next_free(out: Path) -> Path:
    """``<out>-2``, ``<out>-3``, ...: the first that does not exist yet."""
    n = 2
    while (candidate := out.with_name(f"{out.name}-{n}")).exists():
        n += 1
    return candidate


def resume_meta(out: Path, storage: Storage | None = None) -> dict | None:
    """meta.json of the checkpoint a resume starts from, read without verifying its files: the one
    ``latest`` names, or the newest step folder's when ``latest`` is gone (None: no checkpoint; {} when it
    is unreadable: the learners' checks then name the bad file and fall back). A checkpoint this node
    lacks is read from ``storage`` without fetching it: the learners fetch whole checkpoint folders, and
    a folder that exists with only its meta.json in it would look fetched to them."""
    stored = storage is not None and storage.enabled
    candidates, _ = resume_candidates(out, storage.list_names(out / "checkpoints") if stored else None)
    if not candidates:
        return None
    meta = state_dir(candidates[0]) / "meta.json"
    try:
        text = meta.read_text() if meta.is_file() or not stored else storage.read_text(meta)
        return json.loads(text) if text is not None else {}
    except (OSError, ValueError):
        return {}


def _latest_name(out: Path, step: int) -> str:
    marker = out / "checkpoints" / LATEST
    return marker.read_text().strip() if marker.is_file() else f"step-{step:06d}"


def _fetch_record(cfg: DictConfig, out: Path) -> None:
    """With ``run.storage``: the earlier run's config, export marker and checkpoint marker from storage."""
    storage = Storage.of(cfg)
    if not storage.enabled:
        return
    storage.fetch(out / "config.yaml", refresh=True)
    storage.fetch(out / EXPORT_MARKER, refresh=True)
    storage.fetch(out / "checkpoints" / LATEST, refresh=True)  # its meta.json is read in place: latest_meta


def _with_output(cfg: DictConfig, section: str, out: Path) -> DictConfig:
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain[section]["output"] = str(out)
    moved = OmegaConf.create(plain)
    OmegaConf.set_readonly(moved, True)
    return moved


def _read_yaml(path: Path) -> dict:
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except (yaml.YAMLError, ValueError) as err:
        raise RunRefused(f"{path} (the earlier run's config) is not readable YAML ({err}); move it aside or set "
                         f"run.new_run=true") from err
    return data if isinstance(data, dict) else {}


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
