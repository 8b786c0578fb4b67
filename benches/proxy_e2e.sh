#!/usr/bin/env bash
# End-to-end reverse-proxy benchmark over loopback, four proxies side by side in
# one run, all in front of the same upstream:
#
#   guarded    examples/gateway/ in proxy mode (hyper -> UpstreamGuardLayer -> hyper-util client)
#   unguarded  the same binary with --no-guard (same client, same header handling)
#   nginx      Debian's nginx, one worker
#   haproxy    Debian's HAProxy, one thread
#
# The upstream is examples/bench_server.rs (axum, `GET /` answers "ok"). wrk
# drives each proxy over HTTP/1.1 keep-alive; every proxy keeps HTTP/1.1
# keep-alive connections to the upstream.
#
# Placement (2 CPUs): the proxy under test alone on CPU 0; wrk and the upstream
# share CPU 1. The proxy is what is measured, so it gets a CPU of its own; the
# upstream goes beside wrk rather than beside the proxy, where it would take
# the same share of every proxy's CPU and so flatten the differences. Every
# proxy runs single-threaded (the gateway's runtime sees one CPU; nginx
# `worker_processes 1`; HAProxy `nbthread 1`).
#
# On two CPUs the load side is no free lunch: wrk and the upstream keep CPU 1
# busy too (the `CPU 1 busy` column; the `upstream (direct)` row, wrk straight
# at the upstream, is the most CPU 1 can drive), so requests/s measure the
# proxy and, partly, the load side's cost per request. The `requests per proxy
# CPU-s` column (requests/s divided by the CPU time, user + system, the proxy
# itself used) measures the proxy alone, and holds up better on a busy
# machine: each run also records the CPU time of processes this script did not
# start (`foreign`), which should be near 0 for the numbers to count.
#
# Two loads per proxy:
# - throughput: CONNECTIONS connections, the proxy saturated; requests/s is the
#   mean of ROUNDS runs of DURATION seconds, p50/p99 the median of the runs';
# - latency: one connection, closed loop (what one request costs, not
#   queueing); p50 and p99, the median of LAT_ROUNDS runs of LAT_DURATION s.
# Proxies alternate within each round (ABCD, then DCBA), so drift falls on all
# alike.
#
# The same failure settings for all three proxies that have them (the gateway's
# flags; nginx and HAProxy get the nearest equivalent):
#
# | gateway flag              | nginx                                        | HAProxy                               |
# |---------------------------|----------------------------------------------|---------------------------------------|
# | --attempt-timeout-ms 300  | proxy_connect_timeout 300ms,                 | timeout connect 300ms,                |
# |  (connect + response head)| proxy_read_timeout 300ms (between two reads) | timeout server 300ms (inactivity)     |
# | --deadline-ms 1000        | proxy_next_upstream_timeout 1s (no new try   | none: bounded by 3 x 300 ms of        |
# |  (whole request)          | after 1 s; a running one is not cut)         | attempts                              |
# | --max-attempts 3          | proxy_next_upstream_tries 3, the one server  | retries 2 (retries after the first)   |
# |                           | listed 3 times (nginx never retries a server |                                       |
# |                           | it has just tried)                           |                                       |
# | retried: connect errors,  | proxy_next_upstream error timeout http_502   | retry-on conn-failure empty-response  |
# |  resets, timeouts,        | http_503 http_504 (idempotent methods only,  | response-timeout 502 503 504          |
# |  502/503/504, idempotent  | as without non_idempotent)                   |                                       |
# | --failure-threshold 5,    | max_fails=5 fail_timeout=1s (5 failures      | none (a breaker needs health checks:  |
# |  --open-ms 1000 (breaker) | within 1 s take a server out for 1 s)        | `observe layer7`; one server anyway)  |
# | keep-alive to upstream    | proxy_http_version 1.1, Connection "",       | http-reuse always                     |
# |  (hyper-util's pool)      | upstream { keepalive 64 }                    |                                       |
#
# Request limits per connection are lifted (nginx `keepalive_requests`, both
# sides), as neither hyper nor HAProxy has one. The forwarding headers the
# gateway writes (X-Forwarded-For/-Proto/-Host, Forwarded, Host = the upstream)
# are written by nginx and HAProxy too, so all four do comparable header work.
# `option redispatch` is not needed: there is one server.
#
#   bash benches/proxy_e2e.sh                        # defaults below
#   DURATION=10 ROUNDS=3 bash benches/proxy_e2e.sh   # the published run
#   DURATION=5 ROUNDS=1 LAT_ROUNDS=3 PROXIES="guarded unguarded nginx" bash benches/proxy_e2e.sh
#
# nginx, HAProxy and wrk are installed with apt-get when missing. They run as
# plain foreground processes with configs written to a temporary directory (no
# systemd, no default site), listening on 127.0.0.1 only. Traffic goes to
# 127.0.0.1 only; every wrk run is bounded by its duration, and every process
# started here is stopped on exit (trap), the upstream also by its own timer.
set -euo pipefail

DURATION="${DURATION:-10}"         # seconds per measured throughput run
ROUNDS="${ROUNDS:-3}"              # each round runs every proxy once
WARMUP="${WARMUP:-2}"              # seconds of unmeasured load per proxy first
LAT_ROUNDS="${LAT_ROUNDS:-5}"      # latency runs per proxy
LAT_DURATION="${LAT_DURATION:-3}"  # seconds per latency run
CONNECTIONS="${CONNECTIONS:-32}"   # for the throughput load
WRK_THREADS="${WRK_THREADS:-1}"
PROXIES="${PROXIES:-guarded unguarded nginx haproxy}"
DIRECT="${DIRECT:-1}"              # 1: also measure the upstream without a proxy
# The guard's settings (the gateway's defaults but the deadline), mapped onto
# nginx and HAProxy as in the table above.
ATTEMPT_TIMEOUT_MS="${ATTEMPT_TIMEOUT_MS:-300}"
DEADLINE_MS="${DEADLINE_MS:-1000}"
MAX_ATTEMPTS="${MAX_ATTEMPTS:-3}"
FAILURE_THRESHOLD="${FAILURE_THRESHOLD:-5}"
OPEN_MS="${OPEN_MS:-1000}"

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

if [ "$(nproc)" -lt 2 ]; then
    echo "needs at least 2 CPUs (proxy on CPU 0, wrk and upstream on CPU 1)" >&2
    exit 1
fi

# --- tools ------------------------------------------------------------------

missing=()
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v nginx >/dev/null 2>&1 || missing+=(nginx)
command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing ${missing[*]} with apt-get" >&2
    apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
fi

work="$(mktemp -d)"
# nginx's worker drops root: let it reach its files.
chmod 755 "$work"
pids=()
cleanup() {
    local pid
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Builds the examples and copies the binaries out of the (possibly shared)
# target directory, so that another build cannot replace them mid-run.
build() {
    cargo build --release --example gateway --example bench_server \
        --message-format=json-render-diagnostics >"$work/build.json"
    local name path
    for name in gateway bench_server; do
        path="$(grep '"reason":"compiler-artifact"' "$work/build.json" |
            grep -o "\"executable\":\"[^\"]*/examples/$name\"" | head -n1 |
            sed 's/^"executable":"//; s/"$//')"
        if [ ! -x "$path" ]; then
            echo "cannot find the built $name example" >&2
            exit 1
        fi
        cp "$path" "$work/$name"
    done
}
build

# --- processes ----------------------------------------------------------------

# A free TCP port on 127.0.0.1 (for the proxies that cannot pick port 0).
free_port() {
    local port
    for _ in $(seq 200); do
        port=$((20000 + RANDOM % 30000))
        if [ -z "$(ss -Hltn "sport = :$port")" ]; then
            echo "$port"
            return
        fi
    done
    echo "no free port found" >&2
    exit 1
}

# wait_http URL: until it answers 200 (at most 10 s).
wait_http() {
    for _ in $(seq 100); do
        if [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$1")" = 200 ]; then
            return
        fi
        sleep 0.1
    done
    echo "$1 did not answer 200 within 10 s; the logs:" >&2
    tail -n 20 "$work"/*.out "$work"/nginx/*.log "$work"/nginx/out "$work"/haproxy/out >&2 2>/dev/null || true
    exit 1
}

# wait_listening FILE: prints ADDR from the `listening on http://ADDR` line an
# example writes to FILE (at most 20 s).
wait_listening() {
    for _ in $(seq 200); do
        if grep -q '^listening on http://127\.' "$1"; then
            sed -n 's|^listening on http://||p' "$1"
            return
        fi
        sleep 0.1
    done
    echo "no 'listening on' line in $1:" >&2
    cat "$1" >&2
    exit 1
}

declare -A url main_pid

# The upstream outlives every run (five targets at most) by five minutes.
max_secs=$((5 * (WARMUP + ROUNDS * (DURATION + 1) + LAT_ROUNDS * (LAT_DURATION + 1)) + 300))
BENCH_SERVER_MAX_SECS="$max_secs" taskset -c 1 "$work/bench_server" 127.0.0.1:0 \
    >"$work/upstream.out" 2>&1 &
pids+=($!)
main_pid[direct]=$!
upstream="$(wait_listening "$work/upstream.out")"
upstream_port="${upstream##*:}"
url[direct]="http://$upstream/"

start_gateway() { # NAME FLAGS...
    local name="$1"
    shift
    taskset -c 0 "$work/gateway" --listen 127.0.0.1:0 --upstream "http://$upstream" \
        --attempt-timeout-ms "$ATTEMPT_TIMEOUT_MS" --deadline-ms "$DEADLINE_MS" \
        --max-attempts "$MAX_ATTEMPTS" --failure-threshold "$FAILURE_THRESHOLD" \
        --open-ms "$OPEN_MS" "$@" >"$work/$name.out" 2>&1 &
    pids+=($!)
    main_pid[$name]=$!
    url[$name]="http://$(wait_listening "$work/$name.out")/"
}

start_nginx() {
    local dir="$work/nginx" port servers="" i
    port="$(free_port)"
    mkdir -p "$dir"
    # fail_timeout is in whole seconds.
    local fail_timeout=$(((OPEN_MS + 999) / 1000))
    for i in $(seq "$MAX_ATTEMPTS"); do
        servers+="        server 127.0.0.1:$upstream_port max_fails=$FAILURE_THRESHOLD fail_timeout=${fail_timeout}s;"$'\n'
    done
    cat >"$dir/nginx.conf" <<EOF
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $dir/client_body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
    keepalive_requests 1000000000;
    keepalive_timeout 75s;
    upstream bench_upstream {
$servers        keepalive 64;
        keepalive_requests 1000000000;
    }
    server {
        listen 127.0.0.1:$port;
        location / {
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host 127.0.0.1:$upstream_port;
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto http;
            proxy_set_header X-Forwarded-Host \$http_host;
            proxy_set_header Forwarded "for=\$remote_addr;host=\"\$http_host\";proto=http";
            proxy_connect_timeout ${ATTEMPT_TIMEOUT_MS}ms;
            proxy_read_timeout ${ATTEMPT_TIMEOUT_MS}ms;
            proxy_send_timeout ${ATTEMPT_TIMEOUT_MS}ms;
            proxy_next_upstream error timeout http_502 http_503 http_504;
            proxy_next_upstream_tries $MAX_ATTEMPTS;
            proxy_next_upstream_timeout ${DEADLINE_MS}ms;
        }
    }
}
EOF
    nginx -q -t -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf"
    taskset -c 0 nginx -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf" -g 'daemon off;' \
        >"$dir/out" 2>&1 &
    pids+=($!)
    main_pid[nginx]=$!
    url[nginx]="http://127.0.0.1:$port/"
}

start_haproxy() {
    local dir="$work/haproxy" port
    port="$(free_port)"
    mkdir -p "$dir"
    cat >"$dir/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn 4096

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect ${ATTEMPT_TIMEOUT_MS}ms
    timeout server ${ATTEMPT_TIMEOUT_MS}ms
    timeout client 75s
    timeout http-keep-alive 75s
    retries $((MAX_ATTEMPTS - 1))
    retry-on conn-failure empty-response response-timeout 502 503 504

frontend bench_front
    bind 127.0.0.1:$port
    option forwardfor
    http-request set-header X-Forwarded-Proto http
    http-request set-header X-Forwarded-Host %[req.hdr(host)]
    http-request set-header Forwarded "for=%[src];host=\"%[req.hdr(host)]\";proto=http"
    http-request set-header Host 127.0.0.1:$upstream_port
    default_backend bench_back

backend bench_back
    server upstream 127.0.0.1:$upstream_port
EOF
    haproxy -c -q -f "$dir/haproxy.cfg"
    taskset -c 0 haproxy -db -f "$dir/haproxy.cfg" >"$dir/out" 2>&1 &
    pids+=($!)
    main_pid[haproxy]=$!
    url[haproxy]="http://127.0.0.1:$port/"
}

for proxy in $PROXIES; do
    case "$proxy" in
    guarded) start_gateway guarded ;;
    unguarded) start_gateway unguarded --no-guard ;;
    nginx) start_nginx ;;
    haproxy) start_haproxy ;;
    *)
        echo "unknown proxy '$proxy' (guarded, unguarded, nginx, haproxy)" >&2
        exit 1
        ;;
    esac
done
measured="$PROXIES"
if [ "$DIRECT" = 1 ]; then
    measured="$measured direct"
fi
for proxy in $measured; do
    wait_http "${url[$proxy]}"
    body="$(curl -s --max-time 2 "${url[$proxy]}")"
    if [ "$body" != ok ]; then
        echo "$proxy answered '$body', not the upstream's 'ok'" >&2
        exit 1
    fi
done

# --- measuring ------------------------------------------------------------------

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

# The machine may be shared: besides the proxy's throughput, each run records
# the CPU time the proxy itself used, and the CPU time used by processes this
# script did not start (`foreign`, in % of one CPU, summed over CPUs 0 and 1;
# user + system time, so the loopback's softirq time counts as nobody's).
# Requests per proxy CPU-second hold up under such noise better than requests/s.

# proc_ticks PID...: user + system time of the processes and of their children
# they have waited for, in clock ticks.
proc_ticks() {
    local pid
    for pid in "$@"; do
        cat "/proc/$pid/stat" 2>/dev/null || true
    done | awk '{ sub(/^.*\) /, ""); s += $12 + $13 + $14 + $15 } END { print s + 0 }'
}

# with_children PID...: the processes and their children (nginx's worker).
with_children() {
    local pid
    for pid in "$@"; do
        echo "$pid"
        pgrep -P "$pid" || true
    done
}

# "USER_SYSTEM BUSY TOTAL" ticks of CPU 1 and then of CPU 0: user + system
# time, all time not idle (softirq included), all time.
cpu_ticks() {
    awk '$1 == "cpu0" || $1 == "cpu1" {
        total = 0
        for (i = 2; i <= NF; i++) total += $i
        line[$1] = sprintf("%d %d %d", $2 + $3 + $4, total - $5 - $6, total)
    } END { print line["cpu1"], line["cpu0"] }' /proc/stat
}

# run PROXY SECONDS CONNECTIONS: prints
# "REQUESTS_PER_SECOND P50_US P99_US PROXY_CPU_% FOREIGN_CPU_% CPU1_BUSY_%".
# CPU 1 (wrk and the upstream) must stay below 100 % busy for the proxy on
# CPU 0 to be what limits the run.
run() {
    local out proxy_pids our_pids ours_before cpu_before proxy_before
    mapfile -t proxy_pids < <(with_children "${main_pid[$1]}")
    # Ours: every process started here (their children included) and this
    # shell, whose waited-for children include the wrk run.
    mapfile -t our_pids < <(with_children "${pids[@]}")
    our_pids+=("$BASHPID")
    proxy_before="$(proc_ticks "${proxy_pids[@]}")"
    ours_before="$(proc_ticks "${our_pids[@]}")"
    cpu_before="$(cpu_ticks)"
    out="$(taskset -c 1 wrk -t"$WRK_THREADS" -c"$3" -d"$2s" --latency "${url[$1]}")"
    local proxy_used ours_used cpu_after
    proxy_used=$(($(proc_ticks "${proxy_pids[@]}") - proxy_before))
    ours_used=$(($(proc_ticks "${our_pids[@]}") - ours_before))
    cpu_after="$(cpu_ticks)"
    if grep -qE 'Non-2xx|Socket errors' <<<"$out"; then
        echo "$out" >&2
        echo "errors through $1: not a valid measurement" >&2
        exit 1
    fi
    local rps p50 p99
    rps="$(awk '/^Requests\/sec:/ { print $2 }' <<<"$out")"
    p50="$(awk '$1 == "50%" { print $2 }' <<<"$out")"
    p99="$(awk '$1 == "99%" { print $2 }' <<<"$out")"
    echo "$cpu_before $cpu_after" | awk -v rps="$rps" -v p50="$(to_us "$p50")" -v p99="$(to_us "$p99")" \
        -v proxy="$proxy_used" -v ours="$ours_used" '{
        # $1-$6: before (CPU 1 user+system, busy, total; CPU 0 the same), $7-$12: after.
        ticks = ($9 - $3 + $12 - $6) / 2
        foreign = ($7 - $1) + ($10 - $4) - ours
        if (foreign < 0) foreign = 0
        printf "%s %s %s %.0f %.0f %.0f\n", rps, p50, p99, 100 * proxy / ticks, 100 * foreign / ticks, \
            100 * ($8 - $2) / ($9 - $3)
    }'
}

# order ROUND: the proxies as listed in odd rounds, reversed in even ones.
order() {
    if [ $(($1 % 2)) = 1 ]; then
        echo "$measured"
    else
        echo "$measured" | awk '{ for (i = NF; i > 0; i--) printf "%s%s", $i, (i > 1 ? " " : "\n") }'
    fi
}

echo "upstream http://$upstream (bench_server, CPU 1); proxies on CPU 0; wrk on CPU 1"
for proxy in $measured; do
    echo "  $proxy: ${url[$proxy]}"
done
echo "throughput load: wrk -t$WRK_THREADS -c$CONNECTIONS -d${DURATION}s --latency, $ROUNDS runs each"
echo "latency load:    wrk -t1 -c1 -d${LAT_DURATION}s --latency, $LAT_ROUNDS runs each"
echo "warm-up: ${WARMUP}s each; load average: $(cut -d' ' -f1-3 /proc/loadavg)"
for proxy in $measured; do
    run "$proxy" "$WARMUP" "$CONNECTIONS" >/dev/null
done

echo "round proxy load requests/s p50_us p99_us proxy_cpu_% foreign_cpu_% cpu1_busy_%"
: >"$work/results"
for round in $(seq "$ROUNDS"); do
    for proxy in $(order "$round"); do
        # (assigned first, so that a failed run stops the script under set -e)
        result="$(run "$proxy" "$DURATION" "$CONNECTIONS")"
        echo "$round $proxy throughput $result" | tee -a "$work/results"
    done
done
for round in $(seq "$LAT_ROUNDS"); do
    for proxy in $(order "$round"); do
        result="$(run "$proxy" "$LAT_DURATION" 1)"
        echo "$round $proxy latency $result" | tee -a "$work/results"
    done
done
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"

# --- the table ------------------------------------------------------------------

median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
mean() { awk '{ s += $1; n++ } END { print s / n }'; }
field() { awk -v p="$1" -v l="$2" -v f="$3" '$2 == p && $3 == l { print $f }' "$work/results"; }
# Requests per CPU-second of the proxy, per throughput run.
per_cpu_second() { awk -v p="$1" '$2 == p && $3 == "throughput" && $7 > 0 { print 100 * $4 / $7 }' "$work/results"; }
# ratio A B FORMAT: A / B, or "—" when either is missing.
ratio() {
    if [ -z "$1" ] || [ -z "$2" ]; then
        echo "—"
    else
        awk -v a="$1" -v b="$2" -v f="$3" 'BEGIN { printf f, a / b }'
    fi
}

declare -A rps per_cpu
for proxy in $measured; do
    rps[$proxy]="$(field "$proxy" throughput 4 | mean)"
    per_cpu[$proxy]="$(per_cpu_second "$proxy" | mean)"
done

echo
echo "| proxy | requests/s, $CONNECTIONS conns (mean) | vs nginx | guarded/unguarded | requests per proxy CPU-s (vs nginx) | p50 / p99, $CONNECTIONS conns | p50 / p99, 1 conn | CPU 1 busy |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
for proxy in $measured; do
    label="$proxy" vs_nginx="—" vs_unguarded="—" cpu_vs_nginx="—"
    if [ "$proxy" = direct ]; then
        label="upstream (direct, no proxy)"
    else
        vs_nginx="$(ratio "${rps[$proxy]}" "${rps[nginx]:-}" "%.2f×")"
        cpu_vs_nginx="$(ratio "${per_cpu[$proxy]}" "${per_cpu[nginx]:-}" "%.2f×")"
    fi
    if [ "$proxy" = guarded ]; then
        vs_unguarded="$(ratio "${rps[guarded]}" "${rps[unguarded]:-}" "%.3f")"
    fi
    awk -v label="$label" -v r="${rps[$proxy]}" -v n="$vs_nginx" -v u="$vs_unguarded" \
        -v c="${per_cpu[$proxy]}" -v cn="$cpu_vs_nginx" \
        -v t50="$(field "$proxy" throughput 5 | median)" -v t99="$(field "$proxy" throughput 6 | median)" \
        -v l50="$(field "$proxy" latency 5 | median)" -v l99="$(field "$proxy" latency 6 | median)" \
        -v busy="$(field "$proxy" throughput 9 | median)" \
        'BEGIN { printf "| %s | %.0f | %s | %s | %.0f (%s) | %.0f / %.0f µs | %.0f / %.0f µs | %.0f %% |\n", label, r, n, u, c, cn, t50, t99, l50, l99, busy }'
done
echo
echo "foreign CPU (processes not started here, % of one CPU over CPUs 0-1) per run: mean $(awk '{ print $8 }' "$work/results" | mean) %, max $(awk '{ print $8 }' "$work/results" | sort -g | tail -n1) %"
if [ -n "${rps[guarded]:-}" ] && [ -n "${rps[unguarded]:-}" ]; then
    awk -v g="${rps[guarded]}" -v u="${rps[unguarded]}" 'BEGIN {
        ratio = 100 * g / u
        printf "guarded/unguarded requests/s: %.1f %% (target >= 97 %%: %s)\n", ratio, (ratio >= 97 ? "met" : "missed")
    }'
fi
