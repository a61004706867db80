"""The Stage-2 control plane measured apart from the model (`anyflow-ray bench`, section ``control_plane_sim``).

The real driver loop (``jobs/distill.run``), TrajectoryBuffer, WeightRegistry, LearnerGroup and weight
sync run unchanged; only the model work is replaced by calibrated sleeps: a rollout actor sleeps
``rollout_s`` per trajectory and a learner rank ``learner_s`` per step. Refs still travel through the
object store (each rank fetches the payloads it is handed; each actor pulls the newest weights), and
actors take no CPU (``rollout.cpus_per_actor=0``), so 32 of them fit on a laptop.

A step needs one generator and one critic trajectory per learner rank, so M actors sustain at most
``M / (2 * ranks * rollout_s)`` steps/s and the learner at most ``1 / learner_s``: the ideal is the
smaller of the two, and ``efficiency = measured / ideal`` shows what the driver, buffer and Ray calls
lose, and whether that grows with M. Staleness must not be what caps the rate: a trajectory is made
over ``rollout_s`` while the learner publishes a version per step, so it is at least
``rate * rollout_s`` versions old when taken; ``max_policy_lag`` is set to twice that at the learner's
top rate, so the staleness bound ``(lag + 1) / rollout_s`` lies well above the ideal.

This module's top level imports only Ray and the standard library: every sleep actor's process imports it.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import ray

from learners.ranks import every_rank, rank_zero

PAYLOAD_BYTES = 4096  # a small trajectory: object-store traffic without model-sized copies
WEIGHTS_BYTES = 4096


# -- the stand-ins ------------------------------------------------------------------------------------
class SleepLearner:
    """A learner rank without DeepSpeed: ``train_step`` fetches its slice of the refs like the real rank,
    sleeps ``learner_s`` and reports the counts; checkpoints and exports write nothing."""

    learner_s = 0.25

    def __init__(self, cfg: dict, job: str, rank: int, world_size: int):
        self.timeout = float(cfg["learner"]["timeouts"]["step"])
        self.rank, self.world_size = rank, world_size
        self.weights = bytes(WEIGHTS_BYTES)

    @rank_zero
    def rendezvous_address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), 0

    @every_rank
    def setup(self, master_addr: str, master_port: int, board=None) -> dict:
        return {"rank": self.rank, "device": "cpu", "dtype": "sleep", "gpu_ids": [],
                "node_id": ray.get_runtime_context().get_node_id(), "trainable": 0, "total": 0}

    @every_rank
    def load_latest(self, root: str) -> int:
        return 0

    @rank_zero
    def checkpoint_meta(self, root: str) -> None:
        return None

    @every_rank
    def train_step(self, step: int, generator_refs: list = (), critic_refs: list = ()) -> dict:
        start = time.perf_counter()
        trained = lost = rejected = 0
        for kind, refs in (("generator", generator_refs), ("critic", critic_refs)):
            for wrapped in list(refs)[self.rank::self.world_size]:
                try:
                    payload = ray.get(wrapped[0], timeout=self.timeout)
                except (ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError, ray.exceptions.GetTimeoutError):
                    lost += 1
                    continue
                if payload.get("kind") != kind:
                    rejected += 1
                    continue
                trained += 1
        fetch_s = time.perf_counter() - start
        time.sleep(self.learner_s)
        return {"loss": 0.0, "fetch_s": fetch_s, "rank_step_s": time.perf_counter() - start, "trained": trained,
                "lost": lost, "rejected": rejected}

    @every_rank
    def save(self, root: str, step: int, **kwargs) -> str:
        return root

    @every_rank
    def publish_weights(self, full: bool = False) -> list | None:
        return [ray.put({"weights": self.weights})] if self.rank == 0 else None  # every rank is called

    @every_rank
    def export_pipeline(self, out: str, step: int | None = None) -> str:
        return out

    @every_rank
    def shutdown(self) -> None:
        pass


class SleepRolloutActor:
    """A rollout actor without a model: pulls the newest weights like the real one, sleeps ``rollout_s``,
    puts a small payload and pushes its ref into the buffer (awaiting space)."""

    rollout_s = 1.0

    def __init__(self, cfg: dict, actor_id: str, buffer: str, registry: str):
        self.actor_id, self.buffer, self.registry = actor_id, ray.get_actor(buffer), ray.get_actor(registry)
        self.version = -1
        self.load_latest_weights()
        ray.get(self.registry.report_started.remote(actor_id, self.version))

    @ray.method(concurrency_group="weights")
    def current_version(self) -> int:
        return self.version

    def load_latest_weights(self) -> int:
        version, wrapped = ray.get(self.registry.latest.remote())
        if wrapped is not None and version > self.version:
            ray.get(wrapped[0])
            self.version = version
            ray.get(self.registry.report_loaded.remote(self.actor_id, version))
        return self.version

    def rollout(self, kind: str, seed: int) -> dict:
        self.load_latest_weights()
        start = time.perf_counter()
        version = self.version
        time.sleep(self.rollout_s)
        payload = {"kind": kind, "seed": seed, "version": version, "data": bytes(PAYLOAD_BYTES)}
        accepted = ray.get(self.buffer.put.remote([ray.put(payload)], version, kind, self.actor_id))
        return {"actor": self.actor_id, "kind": kind, "version": version, "num_steps": 0, "k": 0,
                "seconds": time.perf_counter() - start, "closed": not accepted}


def sleep_classes(rollout_s: float, learner_s: float) -> tuple[type, type]:
    """(learner, actor) classes with the sleeps baked in. Made at run time they are not importable by
    name, so Ray pickles them by value (their class attributes travel with them to every process),
    which works in a Ray instance someone else started, unlike env vars set through ``ray.init``."""
    learner = type("SleepLearnerSim", (SleepLearner,), {"learner_s": float(learner_s)})
    actor = type("SleepRolloutActorSim", (SleepRolloutActor,), {"rollout_s": float(rollout_s)})
    return learner, actor


# -- the bench ----------------------------------------------------------------------------------------
def ideal_steps_per_s(num_actors: int, rollout_s: float, learner_s: float, ranks: int = 1) -> float:
    return min(1.0 / learner_s, num_actors / (rollout_s * 2 * ranks))


def policy_lag_for(rollout_s: float, learner_s: float) -> int:
    """Twice the versions the learner publishes during one rollout at its top rate (at least 1)."""
    return max(1, math.ceil(2 * rollout_s / learner_s))


def steps_for(ideal: float, window_s: float, min_steps: int = 20) -> int:
    return max(min_steps, round(ideal * window_s))


def steady_rates(records: list[dict], warmup_steps: int) -> dict:
    """Learner steps/s and per-step seconds over the steps after ``warmup_steps`` (metrics.jsonl records,
    one per step: ``time`` is seconds since the logger started, ``learner_step_s`` the driver's wall time
    on the learner group's ``train_step`` call, ``rank_step_s`` the rank's own time inside it).
    ``driver_s_per_step`` is the wall time per step that the learner rank did not spend stepping: the
    driver's work and waits, and the Ray call's round trip."""
    records = sorted(records, key=lambda r: r["step"])
    first = min(max(warmup_steps, 1), len(records) - 2)  # at least two steps measured
    window = records[first:]
    steps = window[-1]["step"] - records[first - 1]["step"]
    wall = window[-1]["time"] - records[first - 1]["time"]
    mean = lambda key: sum(float(r.get(f"distill/{key}", 0.0)) for r in window) / len(window)  # noqa: E731
    per_step = wall / steps if steps else float("nan")
    return {"measured_steps": steps, "steps_per_s": steps / wall if wall > 0 else float("nan"),
            "wall_s_per_step": per_step, "learner_call_s": mean("learner_step_s"),
            "rank_step_s": mean("rank_step_s"), "learner_fetch_s": mean("fetch_s"), "sync_s": mean("sync_s"),
            "driver_s_per_step": per_step - mean("rank_step_s"), "policy_lag": mean("policy_lag")}


ACTOR_COUNTS = (1, 4, 16, 32)


def sim_overrides(num_actors: int, steps: int, max_policy_lag: int, out: str, ranks: int = 1) -> list[str]:
    """The Stage-2 settings of one simulated run: actors that take no CPU, ``ranks`` learner ranks, a record
    of every step, one checkpoint call at the end, object-store weight sync after every step."""
    return [f"rollout.num_actors={num_actors}", "rollout.cpus_per_actor=0", "rollout.gpus_per_actor=0",
            "rollout.colocate=false", "learner.cpus_per_rank=0.01", "learner.gpus_per_rank=0",
            f"distill.num_ranks={ranks}", f"distill.real_batch={8 * ranks}", "distill.resume=false",
            f"distill.steps={steps}", "distill.log_every=1",
            f"distill.save_every={steps}", "distill.sync_every=1", "distill.weight_sync=object_store",
            f"distill.max_policy_lag={max_policy_lag}", "distill.buffer_capacity=0", "run.wandb_mode=disabled",
            f"distill.output={out}"]


def simulate(out_root: str, actor_counts=ACTOR_COUNTS, rollout_s: float = 1.0, learner_s: float = 0.25,
             window_s: float = 20.0, min_steps: int = 20, max_policy_lag: int | None = None,
             overrides: list[str] = (), quiet: bool = False) -> dict:
    """Run the real Stage-2 driver with the sleep stand-ins once per actor count, in one Ray instance (the
    one running, else a local one), each run in ``<out_root>/actors-<M>``. About ``window_s`` of steps per
    count (at least ``min_steps``); the first steps, until the last actor is up, are left out."""
    learner_cls, actor_cls = sleep_classes(rollout_s, learner_s)
    lag = policy_lag_for(rollout_s, learner_s) if max_policy_lag is None else max_policy_lag
    rows = {}
    for count in actor_counts:
        ideal = ideal_steps_per_s(count, rollout_s, learner_s)
        steps = steps_for(ideal, window_s, min_steps)
        run_overrides = [f"run.output_dir={out_root}", *overrides,
                         *sim_overrides(count, steps, lag, f"{out_root}/actors-{count}")]
        rows[count] = {"num_actors": count, "ideal_steps_per_s": ideal, "steps": steps,
                       **measure_run(run_overrides, learner_cls, actor_cls, ideal)}
    result = {"rollout_s": rollout_s, "learner_s": learner_s, "learner_ranks": 1, "max_policy_lag": lag,
              "staleness_bound_steps_per_s": (lag + 1) / rollout_s, "learner_bound_steps_per_s": 1.0 / learner_s,
              "by_actors": rows, "efficiency": {count: row["efficiency"] for count, row in rows.items()}}
    if not quiet:
        print_table(result)
    return result


def measure_run(overrides: list[str], learner_cls: type, actor_cls: type, ideal: float) -> dict:
    """One run of the real driver with the stand-ins; its steady rates, efficiency and buffer books."""
    from anyflow_ray.run.config import load_config
    from anyflow_ray.jobs import distill
    from anyflow_ray.jobs.ray_runtime import init_ray
    from anyflow_ray.run.logger import read_metrics

    cfg = load_config(None, overrides)
    shutil.rmtree(cfg.distill.output, ignore_errors=True)  # metrics.jsonl appends: one run per folder
    init_ray(cfg)  # joins the running instance; started once otherwise
    started = time.perf_counter()
    out = Path(distill.run(cfg, worker_cls=learner_cls, actor_cls=actor_cls))
    run_s = time.perf_counter() - started
    summary = json.loads((out / "pipeline_summary.json").read_text())
    # steady state: after the last actor came up (the version it loaded first = learner steps done by then)
    warmup = max([version for _, version in summary["versions_at_start"]] + [0]) + 2
    rates = steady_rates(read_metrics(out / "metrics.jsonl"), warmup)
    return {**rates, "efficiency": rates["steps_per_s"] / ideal, "warmup_steps": warmup, "run_s": run_s,
            "summary_steps_per_s": summary["learner_steps_per_s"],
            "buffer": {key: summary[key] for key in ("accepted", "taken", "trained", "lost", "rejected",
                                                     "dropped_stale", "dropped_at_end", "refused_full", "depth")}}


def print_table(result: dict) -> None:
    print(f"Stage-2 control plane, model replaced by sleeps ({result['rollout_s']:g} s per trajectory, "
          f"{result['learner_s']:g} s per learner step, 1 learner rank, object-store weight sync):")
    print(f"  ideal = min(learner {result['learner_bound_steps_per_s']:.2f} steps/s, actors M / (2 x "
          f"{result['rollout_s']:g} s)); max_policy_lag {result['max_policy_lag']} keeps the staleness bound "
          f"(lag + 1) / rollout_s = {result['staleness_bound_steps_per_s']:.1f} steps/s above it")
    print(f"  {'actors':>6} {'steps/s':>8} {'ideal':>6} {'efficiency':>10} {'wall/step':>10} {'rank step':>10} "
          f"{'driver/step':>11} {'publish':>8} {'lag':>5} {'dropped stale':>13}")
    for count, row in result["by_actors"].items():
        print(f"  {count:>6d} {row['steps_per_s']:8.2f} {row['ideal_steps_per_s']:6.2f} {row['efficiency']:10.2f} "
              f"{row['wall_s_per_step'] * 1e3:8.0f}ms {row['rank_step_s'] * 1e3:8.0f}ms "
              f"{row['driver_s_per_step'] * 1e3:9.0f}ms {row['sync_s'] * 1e3:6.1f}ms {row['policy_lag']:5.1f} "
              f"{row['buffer']['dropped_stale']:>13d}")
    print("  driver/step: wall per step minus the rank's own step (fetch + sleep): the driver's work, Ray call "
          "round trips and, when actors are the limit, the wait for trajectories")
    if any(row["efficiency"] > 1 for row in result["by_actors"].values()):
        print("  (an efficiency above 1 is the window's edge: trajectories already in stock when it opened)")
