#!/usr/bin/env bash
# Run the full test suite N times in a row (default 3) while two CPU burners
# (`yes > /dev/null`) load both cores; stop at the first failing run.
#
#   tests/stress.sh [N] [extra pytest args...]
#
# The burners are this script's own children and are killed on exit (trap),
# whatever way the script ends. Each run's wall time and result are printed;
# the pytest output of run i is kept in ${STRESS_LOG_DIR:-/tmp}/sidekey-stress-<i>.log.
set -u
cd "$(dirname "$0")/.."

runs=${1:-3}
shift $(( $# > 0 ? 1 : 0 ))
logdir=${STRESS_LOG_DIR:-/tmp}
burners=()

stop_burners() {
    for pid in "${burners[@]}"; do
        kill "$pid" 2>/dev/null
    done
    for pid in "${burners[@]}"; do
        wait "$pid" 2>/dev/null
    done
    burners=()
}
trap stop_burners EXIT
trap 'exit 130' INT TERM

for _ in 1 2; do
    yes > /dev/null &
    burners+=("$!")
done
echo "burners: ${burners[*]}; load average: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) cores"

for i in $(seq 1 "$runs"); do
    log="$logdir/sidekey-stress-$i.log"
    start=$(date +%s.%N)
    .venv/bin/python -m pytest -q -p no:cacheprovider "$@" > "$log" 2>&1
    rc=$?
    wall=$(echo "$(date +%s.%N) - $start" | bc)
    summary=$(grep -E '^(=+ )?[0-9]+ (passed|failed|error)' "$log" | tail -1 | tr -d '=')
    printf 'run %d/%d: %s %6.1f s  load %s  %s\n' "$i" "$runs" "$([ $rc -eq 0 ] && echo PASS || echo FAIL)" \
        "$wall" "$(cut -d' ' -f1 /proc/loadavg)" "${summary# }"
    if [ $rc -ne 0 ]; then
        grep -E '^(FAILED|ERROR) ' "$log"
        echo "run $i failed (rc $rc); full output: $log"
        exit "$rc"
    fi
done
echo "all $runs runs passed"
