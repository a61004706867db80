#!/usr/bin/env bash
# Submit an anyflow-ray command to a running cluster, with its auth token and cluster/runtime_env.yaml.
#   cluster/submit.sh http://HEAD:8265 distill --config configs/wan2.1-t2v-1.3b.yaml
#   cluster/submit.sh http://HEAD:8265 --no-wait --submission-id s2-run1 -- distill --config ...
# Flags before a `--` go to `ray job submit`; the rest is the anyflow-ray command line. The token comes
# from RAY_AUTH_TOKEN (on the head: `ray get-auth-token`). Run from anywhere: the working dir shipped is
# this repository.
set -euo pipefail
if [[ $# -lt 2 ]]; then
    echo "usage: $0 http://HEAD:8265 [ray job submit flags --] <anyflow-ray command> [args...]" >&2
    exit 2
fi
address="$1"; shift
submit_flags=()
if [[ " $* " == *" -- "* ]]; then
    while [[ "$1" != "--" ]]; do submit_flags+=("$1"); shift; done
    shift
fi
export RAY_AUTH_MODE=token
: "${RAY_AUTH_TOKEN:?set RAY_AUTH_TOKEN to the cluster token (on the head: ray get-auth-token)}"
cd "$(dirname "$0")/.."
exec ray job submit --address "$address" --working-dir . --runtime-env cluster/runtime_env.yaml \
    "${submit_flags[@]}" -- anyflow-ray "$@"
