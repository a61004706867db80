"""One metrics fan-out: JSONL file, wandb (offline unless WANDB_MODE says otherwise), extra sinks.

Jobs that run under Ray add a sink that forwards to ``ray.util.metrics``; the core never imports Ray.

A resumed run heals its record: the records after the step it resumes from (the steps it trains again,
written by a run that died before its next checkpoint, or one that fell back to an older checkpoint) are
moved from ``metrics.jsonl`` to ``metrics.superseded.jsonl``, each marked with ``superseded_at``, so
``metrics.jsonl`` holds every step once. wandb resumes the same run: its id is kept in the run folder
(``wandb_run_id``) and passed back with ``resume="allow"``. wandb ignores steps below the last one it
holds, so in its charts a repeated step keeps the first run's value (equal to the new one where the run
is deterministic); ``metrics.jsonl`` has the new one.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from anyflow_ray.run.storage import Storage


class MetricsLogger:
    """Appends to ``<out>/metrics.jsonl`` (a resumed run continues its record). With ``run.storage`` set
    the record is fetched first when this node lacks it, and ``sync``/``close`` upload it (and the
    wandb folder) to storage; the driver is its one writer."""

    def __init__(self, out_dir: str | Path, job: str, cfg: DictConfig | None = None, use_wandb: bool = True,
                 start: int | None = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / "metrics.jsonl"
        self.storage = Storage.of(cfg) if cfg is not None else Storage("", self.out_dir)
        self.storage.fetch(self.path)
        if start is not None and (moved := supersede_after(self.path, start)):
            print(f"{job}: {moved} metric record(s) after step {start} (steps this run trains again) moved to "
                  f"{self.path.with_name(SUPERSEDED).name}", flush=True)
            self.storage.upload(self.path.with_name(SUPERSEDED))
        self._file = self.path.open("a")
        self._sinks: list[Callable[[int, dict], None]] = []
        self._wandb = None
        self._start = time.time()
        if use_wandb and cfg is not None:
            self._wandb = _start_wandb(self.out_dir, job, cfg)

    def add_sink(self, sink: Callable[[int, dict], None]) -> None:
        self._sinks.append(sink)

    def log(self, step: int, values: dict) -> None:
        record = {"step": step, "time": round(time.time() - self._start, 3), **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log(values, step=step)
        for sink in self._sinks:
            sink(step, values)

    def sync(self) -> None:
        """Upload the record so far to ``run.storage`` (after each checkpoint; nothing when storage is off)."""
        self._file.flush()
        if self.storage.enabled:
            self.storage.upload(self.path)

    def close(self) -> None:
        """Idempotent: drivers call it on success and again on the way out of a failed run."""
        if self._file.closed:
            return
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self.storage.enabled:
            self.storage.upload(self.path)
            if self.path.with_name(SUPERSEDED).is_file():
                self.storage.upload(self.path.with_name(SUPERSEDED))
            if (self.out_dir / "wandb").is_dir():
                self.storage.upload(self.out_dir / "wandb")


SUPERSEDED = "metrics.superseded.jsonl"
WANDB_ID = "wandb_run_id"


def supersede_after(path: Path, step: int) -> int:
    """Move the records of ``path`` after ``step`` (and a torn last line) to ``metrics.superseded.jsonl``,
    marked ``superseded_at: step``; ``path`` is rewritten atomically. Returns how many were moved."""
    if not path.is_file():
        return 0
    kept, moved = [], []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = {"unreadable": line}
        (kept if isinstance(record.get("step"), int) and record["step"] <= step else moved).append(record)
    if not moved:
        return 0
    with path.with_name(SUPERSEDED).open("a") as f:
        f.writelines(json.dumps({**r, "superseded_at": step}) + "\n" for r in moved)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)
    return len(moved)


def _start_wandb(out_dir: Path, job: str, cfg: DictConfig):
    mode = os.environ.get("WANDB_MODE", cfg.run.wandb_mode)
    if mode == "disabled":
        return None
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    storage = Storage.of(cfg)
    id_file = out_dir / WANDB_ID
    storage.fetch(id_file)
    run_id = id_file.read_text().strip() if id_file.is_file() else ""
    if not run_id:
        run_id = uuid.uuid4().hex[:8]  # wandb's own ids are 8 characters of [a-z0-9]
        id_file.write_text(run_id + "\n")
        storage.upload(id_file)
    return wandb.init(project=cfg.run.wandb_project, name=f"{job}-{out_dir.name}", dir=str(out_dir), mode=mode,
                      id=run_id, resume="allow", config=OmegaConf.to_container(cfg, resolve=True),
                      reinit="finish_previous")


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
