#!/usr/bin/env bash
# Adaptive concurrency, end to end over loopback: a real upstream of fixed
# capacity on 127.0.0.1, the gateway example in front of it with no limit,
# badly chosen static limits, the right static limit (known here only because
# the upstream is ours), and --adaptive-concurrency, one after another in one
# run, each under the same open-loop load at LOAD_FACTOR times the capacity.
#
# The upstream and the load generator are benches/adaptive_e2e.rs (one
# process, on CPU 1); the gateway runs alone on CPU 0. The upstream serves
# CAPACITY requests at once, SERVICE_MS each, and queues the rest; it never
# refuses work, so without a limit the queue grows with the load.
#
#   bash benches/adaptive_e2e.sh                       # defaults below
#   CAPACITY=32 SERVICE_MS=20 DURATION=30 bash benches/adaptive_e2e.sh
#   VARIANTS='adaptive=--adaptive-concurrency' bash benches/adaptive_e2e.sh
#
# Every process started here is stopped on exit; traffic stays on 127.0.0.1;
# each run is bounded by DURATION plus the client's 10 s timeout.
set -euo pipefail

export CAPACITY="${CAPACITY:-16}"        # requests the upstream serves at once
export SERVICE_MS="${SERVICE_MS:-50}"    # each, in milliseconds
export LOAD_FACTOR="${LOAD_FACTOR:-4}"   # offered load, times the capacity
export DURATION="${DURATION:-20}"        # seconds per gateway configuration
export WARMUP="${WARMUP:-5}"             # first seconds of each, not counted

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

if [ "$(nproc)" -lt 2 ]; then
    echo "needs at least 2 CPUs (gateway on CPU 0, upstream and load on CPU 1)" >&2
    exit 1
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# Builds the gateway and the load side, and copies them out of the (possibly
# shared) target directory, so that another build cannot replace them mid-run.
cargo build --release --example gateway --message-format=json-render-diagnostics >"$work/gateway.json"
cargo bench --bench adaptive_e2e --no-run --message-format=json-render-diagnostics >"$work/bench.json"
executable() { # FILE NAME: the path of the built NAME in cargo's JSON output
    grep '"reason":"compiler-artifact"' "$1" |
        grep -o "\"executable\":\"[^\"]*/$2[^\"/]*\"" | head -n1 |
        sed 's/^"executable":"//; s/"$//'
}
gateway="$(executable "$work/gateway.json" examples/gateway)"
load="$(executable "$work/bench.json" deps/adaptive_e2e-)"
for path in "$gateway" "$load"; do
    if [ ! -x "$path" ]; then
        echo "cannot find a built binary ($path)" >&2
        exit 1
    fi
done
cp "$gateway" "$work/gateway"
cp "$load" "$work/adaptive_e2e"

echo "machine: $(nproc) CPUs, $(lscpu | sed -n 's/^Model name: *//p')"
GATEWAY="$work/gateway" GATEWAY_CPU=0 taskset -c 1 "$work/adaptive_e2e"
