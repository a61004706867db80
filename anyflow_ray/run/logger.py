"""One metrics fan-out: JSONL file, wandb (offline unless WANDB_MODE says otherwise), extra sinks.

Jobs that run under Ray add a sink that forwards to ``ray.util.metrics``; the core never imports Ray.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from anyflow_ray.run.storage import Storage


class MetricsLogger:
    """Appends to ``<out>/metrics.jsonl`` (a resumed run continues its record). With ``run.storage`` set
    the record is fetched first when this node lacks it, and ``sync``/``close`` upload it (and the
    wandb folder) to storage; the driver is its one writer."""

    def __init__(self, out_dir: str | Path, job: str, cfg: DictConfig | None = None, use_wandb: bool = True):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / "metrics.jsonl"
        self.storage = Storage.of(cfg) if cfg is not None else Storage("", self.out_dir)
        self.storage.fetch(self.path)
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
            if (self.out_dir / "wandb").is_dir():
                self.storage.upload(self.out_dir / "wandb")


def _start_wandb(out_dir: Path, job: str, cfg: DictConfig):
    mode = os.environ.get("WANDB_MODE", cfg.run.wandb_mode)
    if mode == "disabled":
        return None
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(project=cfg.run.wandb_project, name=f"{job}-{out_dir.name}", dir=str(out_dir), mode=mode,
                      config=OmegaConf.to_container(cfg, resolve=True), reinit="finish_previous")


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
