#!/usr/bin/env bash
# End-to-end benchmark over loopback: wrk against the axum app of
# examples/bench_server.rs, which serves one trivial handler directly at `/` and
# through `UpstreamGuardLayer::new()` (Router::layer) at `/guarded`.
#
# Two loads per path:
# - throughput: CONNECTIONS connections, the server saturated; requests/s, the
#   mean of ROUNDS runs of DURATION seconds per path;
# - latency: one connection, closed loop (what one request costs, not queueing);
#   p50 and p99, the median of LAT_ROUNDS runs of LAT_DURATION seconds per path
#   (short runs and a median, because on a small shared VM one stall can own a
#   whole run's p99).
# Paths alternate within each round (ABBA), so drift falls on both alike.
#
#   bash benches/e2e.sh                       # defaults below
#   DURATION=5 ROUNDS=1 bash benches/e2e.sh   # quicker
#
# Traffic goes to 127.0.0.1 only; every wrk run is bounded by DURATION, and the
# server stops by itself after the runs' total time plus two minutes.
set -euo pipefail

DURATION="${DURATION:-10}"       # seconds per measured run (each load, each path)
ROUNDS="${ROUNDS:-2}"            # each round runs both paths once
WARMUP="${WARMUP:-2}"            # seconds of unmeasured load per path first
LAT_ROUNDS="${LAT_ROUNDS:-10}"   # latency runs per path
LAT_DURATION="${LAT_DURATION:-2}" # seconds per latency run
CONNECTIONS="${CONNECTIONS:-16}" # for the throughput load
WRK_THREADS="${WRK_THREADS:-1}"
PIN="${PIN:-1}"                  # 1: server on CPU 0, wrk on CPU 1 (taskset, >= 2 CPUs)

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

if ! command -v wrk >/dev/null 2>&1; then
    echo "wrk not found: installing it with apt-get" >&2
    apt-get update -qq && apt-get install -y -qq wrk >/dev/null
fi

cargo build --release --example bench_server
bin="${CARGO_TARGET_DIR:-$root/target}/release/examples/bench_server"

work="$(mktemp -d)"
server_pid=""
cleanup() {
    if [ -n "$server_pid" ]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

server_cmd=("$bin")
wrk_cmd=(wrk)
pinned="no"
if [ "$PIN" = 1 ] && command -v taskset >/dev/null 2>&1 && [ "$(nproc)" -ge 2 ]; then
    server_cmd=(taskset -c 0 "$bin")
    wrk_cmd=(taskset -c 1 wrk)
    pinned="server on CPU 0, wrk on CPU 1"
fi

max_secs=$((2 * (ROUNDS * DURATION + LAT_ROUNDS * LAT_DURATION + WARMUP) + 120))
BENCH_SERVER_MAX_SECS="$max_secs" "${server_cmd[@]}" 127.0.0.1:0 >"$work/server.out" 2>&1 &
server_pid=$!
for _ in $(seq 100); do
    grep -q '^listening on ' "$work/server.out" && break
    sleep 0.1
done
base="$(sed -n 's/^listening on //p' "$work/server.out")"
case "$base" in
http://127.*) ;;
*)
    echo "server did not start on loopback:" >&2
    cat "$work/server.out" >&2
    exit 1
    ;;
esac

# wrk prints latencies like 412.00us, 1.23ms or 1.01s: print microseconds.
to_us() {
    awk -v v="$1" 'BEGIN {
        n = v + 0
        if (v ~ /us$/) print n
        else if (v ~ /ms$/) print n * 1000
        else if (v ~ /s$/) print n * 1000000
        else print n
    }'
}

# run PATH SECONDS CONNECTIONS: prints "REQUESTS_PER_SECOND P50_US P99_US".
run() {
    local out
    out="$("${wrk_cmd[@]}" -t"$WRK_THREADS" -c"$3" -d"$2s" --latency "$base$1")"
    if grep -qE 'Non-2xx|Socket errors' <<<"$out"; then
        echo "$out" >&2
        echo "errors on $1: not a valid measurement" >&2
        exit 1
    fi
    local rps p50 p99
    rps="$(awk '/^Requests\/sec:/ { print $2 }' <<<"$out")"
    p50="$(awk '$1 == "50%" { print $2 }' <<<"$out")"
    p99="$(awk '$1 == "99%" { print $2 }' <<<"$out")"
    echo "$rps $(to_us "$p50") $(to_us "$p99")"
}

echo "server $base; pinned: $pinned"
echo "throughput load: wrk -t$WRK_THREADS -c$CONNECTIONS -d${DURATION}s --latency, $ROUNDS runs per path"
echo "latency load:    wrk -t1 -c1 -d${LAT_DURATION}s --latency, $LAT_ROUNDS runs per path"
echo "warm-up: ${WARMUP}s per path"
run / "$WARMUP" "$CONNECTIONS" >/dev/null
run /guarded "$WARMUP" "$CONNECTIONS" >/dev/null

# order ROUND: the two paths, swapped every other round.
order() { if [ $(($1 % 2)) = 1 ]; then echo "/ /guarded"; else echo "/guarded /"; fi; }

echo "round path load requests/s p50_us p99_us"
: >"$work/results"
for round in $(seq "$ROUNDS"); do
    for path in $(order "$round"); do
        # (assigned first, so that a failed run stops the script under set -e)
        result="$(run "$path" "$DURATION" "$CONNECTIONS")"
        echo "$round $path throughput $result" | tee -a "$work/results"
    done
done
for round in $(seq "$LAT_ROUNDS"); do
    for path in $(order "$round"); do
        result="$(run "$path" "$LAT_DURATION" 1)"
        echo "$round $path latency $result" | tee -a "$work/results"
    done
done

# median / mean: of the numbers on stdin; field PATH LOAD COLUMN: from the results.
median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
field() { awk -v p="$1" -v l="$2" -v f="$3" '$2 == p && $3 == l { print $f }' "$work/results"; }
mean() { awk '{ s += $1; n++ } END { print s / n }'; }

d_rps="$(field / throughput 4 | mean)"
g_rps="$(field /guarded throughput 4 | mean)"
d_p50="$(field / latency 5 | median)"
g_p50="$(field /guarded latency 5 | median)"
d_p99="$(field / latency 6 | median)"
g_p99="$(field /guarded latency 6 | median)"

echo
awk -v c="$CONNECTIONS" -v dr="$d_rps" -v gr="$g_rps" -v d50="$d_p50" -v g50="$g_p50" \
    -v d99="$d_p99" -v g99="$g_p99" 'BEGIN {
    printf "| path | requests/s, %s connections (mean) | p50, 1 connection (median) | p99, 1 connection (median) |\n", c
    printf "|---|---:|---:|---:|\n"
    printf "| `/` (no guard) | %.0f | %.0f µs | %.0f µs |\n", dr, d50, d99
    printf "| `/guarded` | %.0f | %.0f µs | %.0f µs |\n", gr, g50, g99
    ratio = 100 * gr / dr
    added = g99 - d99
    printf "\nguarded/unguarded requests/s: %.1f %% (target >= 97 %%: %s)\n", \
        ratio, (ratio >= 97 ? "met" : "missed")
    printf "p50 added by the guard: %.0f µs\n", g50 - d50
    printf "p99 added by the guard: %.0f µs (target < 50 µs: %s)\n", \
        added, (added < 50 ? "met" : "missed")
}'
