#!/usr/bin/env bash
# Proxy instructions per request, counted by callgrind: repeatable on a machine whose
# wall-clock numbers are not. Runs sidekey under valgrind twice (N1 and N2 requests through
# loadgen -c 4) and prints (Ir(N2) - Ir(N1)) / (N2 - N1): start-up and imports cancel out.
#
#   bench/callgrind.sh chat                  # POST the bench chat payload (1 KB JSON answer)
#   bench/callgrind.sh small                 # GET 200 B
#   bench/callgrind.sh chat full             # with the feature set bench/features/full.env
#   SIDEKEY_BENCH_PROVIDER='    limits: {requests_per_minute: 100000000, tokens_per_minute: 1000000000}' \
#     bench/callgrind.sh chat                # the same with local limits
#
# Needs ../shared/bench/setup.sh to have run (loadgen, /tmp/bench-ca) and valgrind. Starts the
# bench nginx on :8443 from the shared templates unless something already listens there.
# Env: N1 (200), N2 (1200), SIDEKEY_BENCH_PROVIDER / SIDEKEY_BENCH_TOP / SIDEKEY_BENCH_ARGS /
# SIDEKEY_BENCH_AUDIT (as in sidekey-proxy.sh), SIDEKEY_BENCH_LOAD (extra loadgen flags,
# word-split), SIDEKEY_PYTHON. A feature set (second argument) sets some of these. Takes a few minutes: callgrind runs ~50x slower.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
shared=${SIDEKEY_SHARED_BENCH:-$repo/../shared/bench}
py=${SIDEKEY_PYTHON:-$repo/.venv/bin/python}
kind=${1:-chat}
features=${2:-}
if [ -n "$features" ]; then
  set -a
  # shellcheck disable=SC1090
  . "$here/features/$features.env"
  set +a
fi
n1=${N1:-200} n2=${N2:-1200}
work=$(mktemp -d /tmp/sidekey-callgrind.XXXXXX)
loadgen=/tmp/bench-bin/loadgen
case $kind in
  chat) load=(-url https://localhost:8443/v1/chat/completions -m POST -ct application/json
              -body "$shared/payloads/chat-request.json") ;;
  small) load=(-url https://localhost:8443/small) ;;
  *) echo "usage: $0 chat|small [FEATURES]" >&2; exit 2 ;;
esac
# shellcheck disable=SC2206
load+=(${SIDEKEY_BENCH_LOAD:-})

if ! (exec 3<>/dev/tcp/127.0.0.1/8443) 2>/dev/null; then
  ng=$work/nginx
  mkdir -p "$ng"/{client_body,proxy_temp,fastcgi_temp,uwsgi_temp,scgi_temp,www}
  head -c 1048576 /dev/urandom > "$ng/www/big"
  for pair in nginx.conf.tmpl:nginx.conf locations.conf:locations.conf; do
    sed -e "s#@RUN@#$ng#g" -e "s#@CA_DIR@#/tmp/bench-ca#g" -e "s#@HTTPS_PORT@#8443#g" \
        -e "s#@HTTP_PORT@#8081#g" "$shared/lib/${pair%%:*}" > "$ng/${pair##*:}"
  done
  nginx -e "$ng/error.log" -p "$ng" -c "$ng/nginx.conf" &
  nginx_pid=$!
  trap 'kill $nginx_pid 2>/dev/null || true' EXIT
  sleep 1
fi

# Total instructions of one sidekey process that served $1 requests, kept running until
# its load has lasted $2 seconds (when given) before it is stopped.
count() {
  local n=$1 hold=${2:-0} dir=$work/run-$1 port
  mkdir -p "$dir"
  port=$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  printf '#!/bin/sh\nexec valgrind --tool=callgrind --callgrind-out-file=%s/cg.out %s "$@"\n' "$dir" "$py" > "$dir/py"
  chmod +x "$dir/py"
  SIDEKEY_PYTHON=$dir/py "$here/sidekey-proxy.sh" "$port" "$dir" /tmp/bench-ca/ca.pem > "$dir/proxy.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 600); do
    kill -0 $pid 2>/dev/null || { echo "sidekey exited; see $dir/proxy.log" >&2; exit 1; }
    curl -s -o /dev/null --max-time 5 --cacert "$dir/certs/sidekey-ca.pem" -x "http://127.0.0.1:$port" \
      https://localhost:8443/small 2>/dev/null && break
    sleep 0.5
  done
  "$loadgen" "${load[@]}" -c 4 -n "$((n - 1))" -d 600s -timeout 120s -cacert "$dir/certs/sidekey-ca.pem" \
    -proxy "http://127.0.0.1:$port" > "$dir/load.json"
  local rest
  rest=$("$py" -c "import json; print(max(0.0, $hold - json.load(open('$dir/load.json'))['elapsed_s']))")
  sleep "$rest"
  kill -TERM $pid; wait $pid || true
  "$py" -c "import json, sys; ok = json.load(open('$dir/load.json'))['ok']; sys.exit(ok != $n - 1)" \
    || { echo "not every request succeeded; see $dir/load.json" >&2; exit 1; }
  grep -E '^(summary|totals):' "$dir/cg.out" | head -1 | awk '{print $2}'
}

# Work that runs by the clock (pool upkeep every second, the audit flush, watchers) does not
# cancel out by itself: under valgrind a request takes ~30 ms, on a loaded machine several
# times that, so the N2 run lasts longer and its timers added 30-130k "per request" that
# came and went with the machine's load. So N2 runs first and the N1 process then idles
# until its run has lasted as long: the timers' share is the same in both and cancels.
b=$(count "$n2")
elapsed=$("$py" -c "import json; print(json.load(open('$work/run-$n2/load.json'))['elapsed_s'])")
a=$(count "$n1" "$elapsed")
echo "$kind${features:+ $features}: $(( (b - a) / (n2 - n1) )) instructions per request (Ir $a at N=$n1, $b at N=$n2, both ${elapsed%.*} s of load; $work)"
