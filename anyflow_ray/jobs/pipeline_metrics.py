"""Ray dashboard metrics of the Stage-2 pipeline through ``ray.util.metrics`` (Prometheus export)."""

from __future__ import annotations

import time

from ray.util.metrics import Gauge

NAMES = {
    "buffer_depth": "trajectories waiting in the buffer",
    "policy_lag": "largest weight-version lag of the last learner batch",
    "trajectories_per_s": "trajectories produced per second",
    "learner_steps_per_s": "learner steps per second",
    "weight_sync_s": "seconds of the last weight publication",
    "loss": "Stage-2 losses (tag: name)",
}


class PipelineMetrics:
    """A MetricsLogger sink: turns the driver's per-step values into Ray gauges."""

    def __init__(self):
        self.gauges = {name: Gauge(f"anyflow_{name}", description=desc, tag_keys=("name",) if name == "loss" else ())
                       for name, desc in NAMES.items()}
        self._last = (time.monotonic(), 0, 0)

    def record(self, step: int, values: dict) -> None:
        get = lambda key: values.get(f"distill/{key}")  # noqa: E731
        now = time.monotonic()
        then, last_step, last_produced = self._last
        produced = get("produced") or 0
        if now > then:
            self.gauges["trajectories_per_s"].set((produced - last_produced) / (now - then))
            self.gauges["learner_steps_per_s"].set((step - last_step) / (now - then))
        self._last = (now, step, produced)
        for key, gauge in (("buffer_depth", "buffer_depth"), ("policy_lag", "policy_lag"), ("sync_s", "weight_sync_s")):
            if get(key) is not None:
                self.gauges[gauge].set(float(get(key)))
        for name in ("loss", "dmd_loss", "real_loss", "critic_loss"):
            if get(name) is not None:
                self.gauges["loss"].set(float(get(name)), tags={"name": name})
