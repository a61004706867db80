#!/usr/bin/env bash
# The GPU path the CPU test suite cannot run: Stage 2 on 2 learner ranks in bf16 (DeepSpeed ZeRO-2 on
# nccl), 2 rollout actors on GPUs of their own, weights broadcast over nccl (distill.weight_sync=
# torch_dist), on the tiny model. Needs one node with >= 4 GPUs (or 2 with COLOCATE=1: actors share the
# learners' GPUs, object-store sync, since nccl refuses two ranks on one GPU), and the project installed.
#   cluster/gpu_smoke.sh [OUT]            OUT defaults to /tmp/anyflow-gpu-smoke (deleted first)
# Prints the pipeline summary and exits non-zero when a check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-/tmp/anyflow-gpu-smoke}"
PY="${PY:-python}"
rm -rf "$OUT"
COMMON=("run.output_dir=$OUT" "run.precision=bf16" "run.threads=4" "learner.zero_stage=2" "learner.cpus_per_rank=2"
        "distill.num_ranks=2" "rollout.num_actors=2" "rollout.cpus_per_actor=1" "distill.steps=20"
        "distill.save_every=10" "distill.log_every=5" "data.num_train=256" "data.num_heldout=16")
if [[ "${COLOCATE:-0}" == 1 ]]; then
    COMMON+=("rollout.colocate=true" "distill.weight_sync=object_store")
else
    COMMON+=("distill.weight_sync=torch_dist" "distill.sync_backend=nccl")
fi
"$PY" -c 'import torch, sys; n = torch.cuda.device_count(); print(f"{n} GPU(s):", torch.cuda.get_device_name(0) if n else "-"); sys.exit(n == 0)'
# the tiny model, synthetic data, untrained teacher and Stage-1 folders (the jobs' own code)
"$PY" -c 'import sys; from anyflow_ray.run.config import load_config; from anyflow_ray.jobs.data import scaffold_untrained_run; scaffold_untrained_run(load_config("configs/tiny.yaml", sys.argv[1:]))' "${COMMON[@]}"
time "$PY" -m anyflow_ray.cli distill --config configs/tiny.yaml "${COMMON[@]}"
"$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1]) / "stage2"
s = json.loads((out / "pipeline_summary.json").read_text())
print(json.dumps({k: s[k] for k in ("accepted", "taken", "trained", "lost", "rejected", "weight_sync",
                                     "learner_steps_per_s", "actor_versions")}, indent=1))
assert s["accepted"] == s["taken"] + s["dropped_stale"] + s["dropped_at_end"] + s["depth"], "buffer books"
assert s["trained"] == 20 * 2 * 2, s["trained"]
assert s["actor_versions"] == [20, 20], s["actor_versions"]
records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
assert all(r["distill/loss"] == r["distill/loss"] for r in records), "NaN loss"
print("gpu smoke OK:", s["weight_sync"])
PY
