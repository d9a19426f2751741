#!/usr/bin/env bash
# Started by ../shared/bench/compare.sh as the proxy under test:
#   sidekey-proxy.sh PORT WORKDIR UPSTREAM_CA
# Writes a policy that routes the bench host (localhost) to the bench nginx
# over verified TLS with an injected bearer key, then execs sidekey.
set -euo pipefail
port=$1 workdir=$2 upstream_ca=$3
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${SIDEKEY_PYTHON:-$repo/.venv/bin/python}
# SIDEKEY_BENCH_TOP / SIDEKEY_BENCH_PROVIDER: extra policy lines (top level / in the provider),
# e.g. SIDEKEY_BENCH_PROVIDER='    limits: {requests_per_second: 1000000}'
cat > "$workdir/p.yaml" <<YAML
version: 1
unmatched: deny
${SIDEKEY_BENCH_TOP:-}
providers:
  bench:
    hosts: [localhost]
    upstream: https://localhost:8443
    auth: {type: bearer, secret: env:BENCH_API_KEY}
    tls: {ca_bundle: $upstream_ca}
${SIDEKEY_BENCH_PROVIDER:-}
YAML
export BENCH_API_KEY=test BENCH_API_KEY_B=test-b  # B: the second key of a two-key pool (bench/features/full.env)
cd "$repo"
# SIDEKEY_BENCH_ARGS: extra flags, e.g. "--admin off" (word-split on purpose);
# SIDEKEY_BENCH_AUDIT=1: the audit log to $workdir/audit.jsonl
audit=()
[ -n "${SIDEKEY_BENCH_AUDIT:-}" ] && audit=(--audit "$workdir/audit.jsonl")
# shellcheck disable=SC2086
exec "$py" -m proxy run --listen "127.0.0.1:$port" --policies "$workdir/p.yaml" \
  --certs "$workdir/certs" --log-level "${SIDEKEY_BENCH_LOG:-WARNING}" "${audit[@]}" ${SIDEKEY_BENCH_ARGS:-}
