#!/usr/bin/env bash
# sidekey vs a direct connection vs mitmdump (and squid), one run, same machine,
# through the shared harness (../shared/bench): keep-alive HTTPS through CONNECT,
# TLS verified against sidekey's CA, proxy pinned to its own core.
#
#   bench/run.sh                                  # chat POSTs + small GETs, c=1 and 32
#   bench/run.sh --scenarios https-big --concurrency 1,32
#   bench/run.sh --out bench/results-$(date +%F).md
# Extra arguments go to compare.sh (see ../shared/bench/README.md).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
shared=${SIDEKEY_SHARED_BENCH:-$repo/../shared/bench}
py=${SIDEKEY_PYTHON:-$repo/.venv/bin/python}
export SIDEKEY_PYTHON=$py
exec "$shared/compare.sh" \
  --proxies "${BENCH_PROXIES:-direct,mitmdump}" \
  --scenarios "${BENCH_SCENARIOS:-https-chat,https-small,http-small}" \
  --concurrency "${BENCH_CONCURRENCY:-1,32}" \
  --proxy-cmd "$here/sidekey-proxy.sh {port} {workdir} {upstream_ca}" \
  --ca '{workdir}/certs/sidekey-ca.pem' --name sidekey \
  --version-cmd "$py -m proxy --version" \
  "$@"
