#!/usr/bin/env bash
# Submit an anyflow-ray command to a running cluster with its auth token.
#   cluster/submit.sh http://HEAD:8265 distill --config configs/wan2.1-t2v-1.3b.yaml
# The token comes from RAY_AUTH_TOKEN, or the file `ray get-auth-token` prints on the head node.
set -euo pipefail
address="$1"; shift
export RAY_AUTH_MODE=token
: "${RAY_AUTH_TOKEN:?set RAY_AUTH_TOKEN to the cluster token (on the head: ray get-auth-token)}"
exec ray job submit --address "$address" --working-dir . --runtime-env cluster/runtime_env.yaml -- anyflow-ray "$@"
