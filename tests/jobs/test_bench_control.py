"""The control-plane simulation: the real Stage-2 driver, buffer, registry and learner group with the model
replaced by sleeps. Behaviour only (books, per-step batches, the result's keys); no timing thresholds."""

import json
import math

import pytest
import ray
from ray import cloudpickle

from anyflow_ray.cli import main
from anyflow_ray.jobs import bench_control
from anyflow_ray.run.logger import read_metrics

ROW_KEYS = {"num_actors", "steps_per_s", "ideal_steps_per_s", "efficiency", "wall_s_per_step", "rank_step_s",
            "learner_call_s", "driver_s_per_step", "sync_s", "policy_lag", "steps", "warmup_steps", "buffer"}


def as_json_reads_it(value):
    """``value`` as ``json.loads(json.dumps(value))`` gives it back when nothing is lost: dict keys as the
    strings JSON writes (2 -> "2", True -> "true", None -> "null"), tuples as lists, every figure unchanged."""
    if isinstance(value, dict):
        return {k if isinstance(k, str) else json.dumps(k): as_json_reads_it(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_json_reads_it(v) for v in value]
    return value


def test_as_json_reads_it_is_what_a_lossless_round_trip_gives():
    value = {2: {"rates": (1.5, 2)}, True: None, "s": [1, "x"]}
    assert json.loads(json.dumps(value)) == as_json_reads_it(value) == {"2": {"rates": [1.5, 2]}, "true": None,
                                                                           "s": [1, "x"]}
    assert json.loads(json.dumps({"x": 1 / 3})) == as_json_reads_it({"x": 1 / 3})  # floats survive exactly
    assert as_json_reads_it({2: 1}) != {2: 1}  # an int key would not survive


@pytest.fixture(scope="module")
def ray_for_module():
    """This module's own local Ray, shut down at its end (the learner tests start theirs); one already
    running is used and left running."""
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False,
                 runtime_env={"env_vars": {"WANDB_MODE": "disabled"}})
    yield
    if started:
        ray.shutdown()


def test_two_sleeping_actors_feed_the_real_driver_and_the_books_balance(ray_for_module, tmp_path):
    result = bench_control.simulate(str(tmp_path), actor_counts=(2,), rollout_s=0.2, learner_s=0.05, window_s=0,
                                    min_steps=8, quiet=True)
    row = result["by_actors"][2]
    assert ROW_KEYS <= set(row) and row["steps"] == 8
    assert {"rollout_s", "learner_s", "max_policy_lag", "staleness_bound_steps_per_s", "learner_bound_steps_per_s",
            "efficiency"} <= set(result)
    assert math.isfinite(row["efficiency"]) and row["efficiency"] > 0 and result["efficiency"][2] == row["efficiency"]
    assert row["ideal_steps_per_s"] == pytest.approx(5.0)  # min(1 / 0.05, 2 actors / (0.2 s x 2 per step))
    assert result["max_policy_lag"] == 8  # twice the 4 versions published during one 0.2 s rollout
    written = json.dumps(result, allow_nan=False)  # bench.json: strict JSON (no NaN, no infinity), no TypeError
    assert json.loads(written) == as_json_reads_it(result), "a figure changes on its way through bench.json"

    out = tmp_path / "actors-2"
    s = json.loads((out / "pipeline_summary.json").read_text())
    assert s["accepted"] == s["taken"] + s["dropped_stale"] + s["dropped_at_end"] + s["depth"]
    assert s["taken"] == s["trained"] + s["lost"] + s["rejected"]
    assert s["trained"] == 16 and s["lost"] == s["rejected"] == 0
    assert row["buffer"]["trained"] == 16
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 9))
    assert all(r["distill/trained"] == 2 for r in records)  # one generator + one critic trajectory per step
    assert all(r["distill/policy_lag"] <= result["max_policy_lag"] for r in records)
    assert records[-1]["distill/version"] == 8
    assert sorted(s["loaded_versions"]) == ["rollout-0", "rollout-1"]  # the actors pulled published weights


def test_the_sleeps_travel_with_the_classes_to_other_processes():
    learner, actor = bench_control.sleep_classes(rollout_s=0.3, learner_s=0.07)
    assert cloudpickle.loads(cloudpickle.dumps(learner)).learner_s == 0.07
    assert cloudpickle.loads(cloudpickle.dumps(actor)).rollout_s == 0.3
    assert issubclass(actor, bench_control.SleepRolloutActor)


def test_ideal_rate_and_steady_window():
    assert bench_control.ideal_steps_per_s(1, 1.0, 0.25) == 0.5  # actors limit: 2 trajectories per step
    assert bench_control.ideal_steps_per_s(32, 1.0, 0.25) == 4.0  # the learner limits
    assert bench_control.policy_lag_for(1.0, 0.25) == 8
    records = [{"step": n, "time": 0.5 * n + (3.0 if n > 2 else 0.0), "distill/rank_step_s": 0.25,
                "distill/learner_step_s": 0.3} for n in range(1, 11)]  # a 3 s start-up before step 3
    rates = bench_control.steady_rates(records, warmup_steps=3)
    assert rates["measured_steps"] == 7 and rates["steps_per_s"] == pytest.approx(2.0)
    assert rates["driver_s_per_step"] == pytest.approx(0.25)


def test_bench_refuses_bad_actor_counts(capsys):
    assert main(["bench", "--actors", "4,x"]) == 2
    assert main(["bench", "--actors", "0"]) == 2
    assert "--actors" in capsys.readouterr().err
