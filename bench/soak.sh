#!/usr/bin/env bash
# The soak (#16 item 3): sidekey under mixed load for DURATION, sampled every
# 10 s, judged, plotted. See bench/soak/harness.py and docs/reliability.md.
#   bench/soak.sh 60m --out docs/soak
#   bench/soak.sh 30s --interval 2 --out /tmp/soak-quick
# Needs nginx (Debian nginx-light), go (golang-go, builds mixload offline), openssl,
# and the repo's venv with the bench extra (matplotlib).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
py=${SIDEKEY_PYTHON:-$repo/.venv/bin/python}
for tool in nginx go openssl; do
  command -v "$tool" >/dev/null 2>&1 || { echo "soak.sh: $tool not found (apt-get install nginx-light golang-go openssl)" >&2; exit 2; }
done
bin=${SOAK_BIN:-/tmp/sidekey-soak-bin}
mixload=$bin/mixload
if [ ! -x "$mixload" ] || [ -n "$(find "$here/soak/mixload" -newer "$mixload" -name '*.go' -print -quit)" ]; then
  mkdir -p "$bin"
  # GOPROXY=off: stdlib only, nothing downloaded; a private cache so parallel builds do not collide
  (cd "$here/soak/mixload" && env GOPROXY=off GOFLAGS=-mod=mod GOCACHE="$bin/gocache" GOPATH="$bin/gopath" \
     CGO_ENABLED=0 go build -trimpath -o "$mixload.tmp.$$" . && mv "$mixload.tmp.$$" "$mixload")
fi
export SOAK_MIXLOAD=$mixload
cd "$repo"
exec "$py" "$here/soak/harness.py" "$@"
