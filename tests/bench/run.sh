#!/usr/bin/env bash
# sluice benchmark, three scenarios. "surge": the emulated legacy server hit directly, through
# sluice, through HAProxy and through nginx, plus memory per idle client connection for each
# proxy. "restart": steady keep-alive load at 90 % of capacity while the backend crashes for 3 s
# and comes back cold, through sluice and HAProxy. "slowdown": steady keep-alive load at 80 % of
# capacity while the backend's capacity halves for 20 s and recovers, through sluice (defaults),
# sluice with admission.adaptive = true, and HAProxy; writes its own results file and plots.
# See tests/bench/README.md. Usage: bash tests/bench/run.sh
#
# Environment overrides (defaults in brackets):
#   BENCH_SCENARIOS ["surge,restart"]  which scenarios (comma or space separated): surge,
#                            restart, slowdown
#   BENCH_SLOWDOWN_TARGETS ["sluice sluice-adaptive haproxy"]
#   BENCH_SLOWDOWN_OF ["service-time workers"]  how the slowdown halves capacity: the service
#                            time doubles, and/or half the workers go (one run of each)
#   BENCH_SLOWDOWN_RATE [0.8 x measured ceiling]  offered tx/s in the slowdown scenario
#   BENCH_SLOWDOWN_OUT [tests/bench/RESULTS-slowdown.md]  its results; the plots
#                            (slowdown-<how>.svg) are written next to it. A run of the slowdown
#                            alone leaves BENCH_OUT as it is
#   BENCH_SECONDS [20]       length of the surge's offered load per target, seconds
#   BENCH_RUNS [2]           repetitions of the surge (run 2 goes through the targets in reverse)
#   BENCH_TARGETS ["direct sluice sluice-noramp haproxy nginx"]; sluice-noramp is sluice with
#                            --slow-start 0s (skipped if this sluice has no such flag)
#   BENCH_IDLE_CONNS [2000]  idle client connections for the memory measurement (0 = skip)
#   BENCH_RESTART_TARGETS ["sluice haproxy"]; also possible: "haproxy-noredispatch" (without
#                            option redispatch) and "direct" (no proxy)
#   BENCH_RESTART_RUNS [$BENCH_RUNS]  repetitions of the restart scenario with steady arrivals
#                            (terminal start times spread over one firing interval)
#   BENCH_RESTART_BURST_RUNS [1]  repetitions with all terminals starting at once (lock-step bursts)
#   BENCH_RESTART_RATE [0.9 x measured ceiling]  offered tx/s in the restart scenario
#   BENCH_OUT [tests/bench/RESULTS.md]
#   BENCH_BIN [target/release]  directory of the release sluice, legacy-emu and terminals
#   BENCH_SKIP_BUILD [0]     1 = use the binaries already in BENCH_BIN (no cargo build)
#   BENCH_SLUICE_BEFORE [unset]  a directory holding an earlier release sluice binary (e.g. a
#                            copy of target/release from before a change): adds the target
#                            sluice-before, the sluice target (same flags, config, fresh
#                            emulator) run with that binary, to the surge targets, the memory
#                            measurement and the restart targets (after sluice in the default
#                            lists; an explicit BENCH_TARGETS / BENCH_RESTART_TARGETS is taken as
#                            given), so a change is measured before and after in one run; the
#                            report adds "sluice / sluice-before" ratios
#   BENCH_KEEP_TMP [0]       1 = keep the work directory (configs, logs, raw JSON)
set -euo pipefail
export PATH=$PATH:/usr/sbin:/sbin # haproxy and nginx live in /usr/sbin

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/../.." && pwd)
BENCH_BIN=${BENCH_BIN:-$ROOT/target/release}
BIN=$BENCH_BIN
BENCH_SLUICE_BEFORE=${BENCH_SLUICE_BEFORE:-}

BENCH_SCENARIOS=${BENCH_SCENARIOS:-surge,restart}
BENCH_SCENARIOS=${BENCH_SCENARIOS//,/ }
BENCH_SECONDS=${BENCH_SECONDS:-20}
BENCH_RUNS=${BENCH_RUNS:-2}
# With BENCH_SLUICE_BEFORE, the default lists run sluice-before right after sluice.
BEFORE_DEFAULT=${BENCH_SLUICE_BEFORE:+" sluice-before"}
BENCH_TARGETS=${BENCH_TARGETS:-"direct sluice$BEFORE_DEFAULT sluice-noramp haproxy nginx"}
BENCH_IDLE_CONNS=${BENCH_IDLE_CONNS:-2000}
BENCH_OUT=${BENCH_OUT:-$BENCH_DIR/RESULTS.md}
BENCH_SKIP_BUILD=${BENCH_SKIP_BUILD:-0}
BENCH_KEEP_TMP=${BENCH_KEEP_TMP:-0}
BENCH_RESTART_TARGETS=${BENCH_RESTART_TARGETS:-"sluice$BEFORE_DEFAULT haproxy"}
BENCH_RESTART_RUNS=${BENCH_RESTART_RUNS:-$BENCH_RUNS}
BENCH_RESTART_RATE=${BENCH_RESTART_RATE:-}
BENCH_RESTART_BURST_RUNS=${BENCH_RESTART_BURST_RUNS:-1}
BENCH_SLOWDOWN_TARGETS=${BENCH_SLOWDOWN_TARGETS:-"sluice sluice-adaptive haproxy"}
BENCH_SLOWDOWN_OF=${BENCH_SLOWDOWN_OF:-"service-time workers"}
BENCH_SLOWDOWN_RATE=${BENCH_SLOWDOWN_RATE:-}
BENCH_SLOWDOWN_OUT=${BENCH_SLOWDOWN_OUT:-$BENCH_DIR/RESULTS-slowdown.md}

# The surge scenario (fixed; change here, not per run, so results stay comparable).
TERMINALS=2000          # all start at once
RATE=2400               # offered tx/s = 1.5 x capacity
CLIENT_TIMEOUT=15s      # per transaction, client side
WORKERS=32              # emulator: 32 workers x 20 ms = 1,600 tx/s
SERVICE_TIME=20ms
LOCKUP_ABOVE=64         # locks up when more than 64 requests are inside ...
LOCKUP_DURATION=3s      # ... for 3 s
CAPACITY=1600
MAX_INFLIGHT=32         # every proxy: at most 32 requests (and connections) at the backend
MAX_QUEUE=4000
QUEUE_TIMEOUT=10s
PROXY_THREADS=2
CEILING_SECONDS=10      # calibration: 32 keep-alive clients, closed loop, straight at the emulator

# The restart scenario (fixed, like the surge): 600 keep-alive terminals offer 90 % of what the
# emulator really serves (measured ceiling) for 30 s; at t = 10 s the emulator crashes (listener
# closed, every connection dropped), stays down 3 s, and comes back cold: 10 % of its workers,
# ramping to 100 % over 10 s. Same workers, service time and lock-up as above.
RS_TERMINALS=600
RS_SECONDS=30
RS_LOAD_FRACTION=0.9    # of the measured ceiling (BENCH_RESTART_RATE overrides)
RS_CLIENT_TIMEOUT=15s
RS_OUTAGE_AT=10s        # on the emulator's clock, started (SIGUSR1) just before the load
RS_OUTAGE_FOR=3s
RS_COLD_FRACTION=0.1
RS_COLD_DURATION=10s
RS_HEALTH_INTERVAL=250ms # both proxies: active HTTP check GET / every 250 ms ...
RS_HEALTH_TIMEOUT=500ms
RS_RISE=2                # ... up after 2 passes, down after 2 failures
RS_FALL=2
RS_SLOW_START=10s        # both proxies ramp the backend's cap back up over 10 s
RS_SLOW_START_INITIAL=3  # sluice: from 3 (= the emulator's 10 % of 32); HAProxy ramps from 1
RS_WARM_TIMEOUT=40       # s: wait for the emulator's initial cold start and the proxy's ramp

# The slowdown scenario (fixed, like the others): 600 keep-alive terminals offer 80 % of what the
# emulator really serves (measured ceiling) for 45 s, their start times spread over one firing
# interval (steady arrivals). The emulator is warm (no cold start); at t = 10 s on its clock
# (started with the load) its capacity halves for 20 s (--slowdown 10s:20s:2, the service time
# doubled or half the workers gone), then recovers. Same workers, service time and lock-up as the
# surge. Every target: a fresh emulator and proxy, the same static cap of 32, and warm (sluice's
# start-up ramp over) before the load starts. Every 100 ms the proxy's view (sluice: /status on
# the admin listener, effective limit included; HAProxy: show stat) and the emulator's stats
# (requests inside, workers) are sampled.
SD_TERMINALS=600
SD_SECONDS=45
SD_LOAD_FRACTION=0.8    # of the measured ceiling (BENCH_SLOWDOWN_RATE overrides)
SD_CLIENT_TIMEOUT=15s
SD_SLOW_AT=10s
SD_SLOW_FOR=20s
SD_FACTOR=2
SD_SAMPLE_MS=100
SD_WARM_TIMEOUT=20       # s: wait for sluice's start-up ramp to reach the cap

for v in BENCH_SECONDS BENCH_RUNS BENCH_IDLE_CONNS BENCH_RESTART_RUNS BENCH_RESTART_BURST_RUNS; do
    [[ ${!v} =~ ^[0-9]+$ ]] || { echo "run.sh: $v must be a whole number, got '${!v}'" >&2; exit 2; }
done
((BENCH_SECONDS >= 1 && BENCH_RUNS >= 1)) || { echo "run.sh: BENCH_SECONDS and BENCH_RUNS must be >= 1" >&2; exit 2; }
for t in $BENCH_TARGETS; do
    case $t in direct | sluice | sluice-before | sluice-noramp | haproxy | nginx) ;; *) echo "run.sh: unknown target '$t'" >&2; exit 2 ;; esac
done
for t in $BENCH_RESTART_TARGETS; do
    case $t in direct | sluice | sluice-before | haproxy | haproxy-noredispatch) ;; *) echo "run.sh: unknown restart target '$t' (direct, sluice, sluice-before, haproxy, haproxy-noredispatch)" >&2; exit 2 ;; esac
done
if [[ -z $BENCH_SLUICE_BEFORE && " $BENCH_TARGETS $BENCH_RESTART_TARGETS " == *" sluice-before "* ]]; then
    echo "run.sh: target sluice-before needs BENCH_SLUICE_BEFORE=DIR (a directory holding the earlier sluice binary)" >&2; exit 2
fi
if [[ -n $BENCH_SLUICE_BEFORE && ! -x $BENCH_SLUICE_BEFORE/sluice ]]; then
    echo "run.sh: BENCH_SLUICE_BEFORE=$BENCH_SLUICE_BEFORE holds no executable sluice" >&2; exit 2
fi
for t in $BENCH_SLOWDOWN_TARGETS; do
    case $t in sluice | sluice-adaptive | haproxy) ;; *) echo "run.sh: unknown slowdown target '$t' (sluice, sluice-adaptive, haproxy)" >&2; exit 2 ;; esac
done
for o in $BENCH_SLOWDOWN_OF; do
    case $o in service-time | workers) ;; *) echo "run.sh: unknown BENCH_SLOWDOWN_OF '$o' (service-time, workers)" >&2; exit 2 ;; esac
done
RUN_SURGE=0 RUN_RESTART=0 RUN_SLOWDOWN=0
for s in $BENCH_SCENARIOS; do
    case $s in surge) RUN_SURGE=1 ;; restart) RUN_RESTART=1 ;; slowdown) RUN_SLOWDOWN=1 ;; *) echo "run.sh: unknown scenario '$s' (surge, restart, slowdown)" >&2; exit 2 ;; esac
done
((RUN_SURGE || RUN_RESTART || RUN_SLOWDOWN)) || { echo "run.sh: BENCH_SCENARIOS is empty" >&2; exit 2; }
if [[ -n $BENCH_RESTART_RATE ]] && ! [[ $BENCH_RESTART_RATE =~ ^[0-9]+$ && $BENCH_RESTART_RATE -ge 1 ]]; then
    echo "run.sh: BENCH_RESTART_RATE must be a whole number >= 1, got '$BENCH_RESTART_RATE'" >&2; exit 2
fi
if [[ -n $BENCH_SLOWDOWN_RATE ]] && ! [[ $BENCH_SLOWDOWN_RATE =~ ^[0-9]+$ && $BENCH_SLOWDOWN_RATE -ge 1 ]]; then
    echo "run.sh: BENCH_SLOWDOWN_RATE must be a whole number >= 1, got '$BENCH_SLOWDOWN_RATE'" >&2; exit 2
fi
((RUN_SURGE)) || BENCH_TARGETS=""
((RUN_RESTART)) || BENCH_RESTART_TARGETS=""
((RUN_SLOWDOWN)) || BENCH_SLOWDOWN_TARGETS=""
((CEILING_SECONDS > BENCH_SECONDS)) && CEILING_SECONDS=$BENCH_SECONDS

log() { printf '[bench %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------- processes and cleanup

WORK=$(mktemp -d /tmp/sluice-bench.XXXXXX)
RES=$WORK/results
mkdir -p "$RES"
PIDS=()

# alive PID: the process exists and is not a zombie.
alive() {
    local s
    s=$(sed -E 's/.*\) (.).*/\1/' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $s && $s != Z ]]
}

# stop_pid PID [SIGNAL] [TIMEOUT_S]: signal the process group PID leads (every child is started
# with setsid), wait until it is gone (bounded), then SIGKILL the group.
stop_pid() {
    local pid=$1 sig=${2:-TERM} timeout=${3:-10} i
    if alive "$pid"; then
        kill -s "$sig" -- "-$pid" 2>/dev/null || kill -s "$sig" "$pid" 2>/dev/null || true
        for ((i = 0; i < timeout * 20; i++)); do
            alive "$pid" || break
            sleep 0.05
        done
    fi
    kill -s KILL -- "-$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$? pid
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do alive "$pid" && kill -s TERM -- "-$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do stop_pid "$pid" TERM 3; done
    # Keep the logs after a failure (not after an interruption), or when asked to.
    if [[ $BENCH_KEEP_TMP == 1 ]] || ((rc != 0 && rc != 130 && rc != 143)); then
        log "work directory kept: $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start_bg NAME CMD...: run CMD in its own session (so its whole process tree can be signalled),
# stdout/stderr to $WORK/NAME.{out,err}. Sets BG_PID.
start_bg() {
    local name=$1
    shift
    setsid "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" </dev/null &
    BG_PID=$!
    PIDS+=("$BG_PID")
}

free_port() {
    python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'
}

# wait_port PORT PID NAME [TIMEOUT_S]: poll a TCP connect until it succeeds; fail early if PID died.
wait_port() {
    local port=$1 pid=$2 name=$3 timeout=${4:-15} i
    for ((i = 0; i < timeout * 20; i++)); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
        alive "$pid" || { cat "$WORK/$name.err" >&2 || true; die "$name exited before listening on $port"; }
        sleep 0.05
    done
    cat "$WORK/$name.err" >&2 || true
    die "$name not listening on 127.0.0.1:$port after ${timeout}s"
}

# http ADDR METHOD PATH: tiny HTTP client for the emulator's control paths.
http() {
    python3 - "$@" <<'EOF'
import sys, urllib.request
addr, method, path = sys.argv[1:4]
req = urllib.request.Request(f"http://{addr}{path}", method=method, data=b"" if method == "POST" else None)
with urllib.request.urlopen(req, timeout=10) as r:
    sys.stdout.write(r.read().decode())
EOF
}

proc_tree() { python3 "$BENCH_DIR/proc_tree.py" "$1"; }

# ---------------------------------------------------------------- emulator and proxies

# start_emu NAME [EXTRA_ARGS...]: fresh emulator on a free port. Sets EMU_PID, EMU_ADDR.
start_emu() {
    local name=$1 i
    shift
    start_bg "$name" "$BIN/legacy-emu" --listen 127.0.0.1:0 --workers "$WORKERS" \
        --service-time "$SERVICE_TIME" --lockup-above "$LOCKUP_ABOVE" --lockup-duration "$LOCKUP_DURATION" "$@"
    EMU_PID=$BG_PID
    EMU_ADDR=
    for ((i = 0; i < 200; i++)); do
        EMU_ADDR=$(sed -n '1s/^listening on //p' "$WORK/$name.out" 2>/dev/null || true)
        [[ -n $EMU_ADDR ]] && break
        alive "$EMU_PID" || { cat "$WORK/$name.err" >&2; die "emulator $name exited"; }
        sleep 0.05
    done
    [[ -n $EMU_ADDR ]] || die "emulator $name did not report its address"
}

# start_haproxy NAME DIR PORT BACKEND_ADDR [STATS_SOCKET]: HAProxy on 127.0.0.1:PORT with the same
# static cap as sluice (server maxconn = MAX_INFLIGHT, a queue of MAX_QUEUE for QUEUE_TIMEOUT),
# its configuration checked first; an operator-level stats socket if asked for. Sets BG_PID.
start_haproxy() {
    local name=$1 dir=$2 port=$3 backend=$4 stats=${5:-}
    cat >"$dir/haproxy.cfg" <<EOF
global
    maxconn $HAPROXY_MAXCONN
    nbthread $PROXY_THREADS
$([[ -n $stats ]] && echo "    stats socket $stats mode 600 level operator" || true)

defaults
    mode http
    maxconn $HAPROXY_MAXCONN
    option http-keep-alive
    http-reuse always
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout queue $QUEUE_TIMEOUT
    timeout http-request 60s
    timeout http-keep-alive 60s

frontend terminals
    bind 127.0.0.1:$port
    default_backend legacy

backend legacy
    server legacy $backend maxconn $MAX_INFLIGHT maxqueue $MAX_QUEUE
EOF
    haproxy -c -q -f "$dir/haproxy.cfg" >"$WORK/$name.check" 2>&1 ||
        { cat "$WORK/$name.check" >&2; die "haproxy config check failed"; }
    start_bg "$name" haproxy -db -f "$dir/haproxy.cfg"
}

# sluice_bin TARGET: the sluice binary a target runs: the earlier build's for sluice-before
# (BENCH_SLUICE_BEFORE), else this one's.
sluice_bin() {
    if [[ $1 == sluice-before ]]; then echo "$BIN_BEFORE/sluice"; else echo "$BIN/sluice"; fi
}

# start_proxy KIND NAME BACKEND_ADDR [SLUICE_BIN]: fresh proxy on a free port; a sluice KIND runs
# SLUICE_BIN (default $BIN/sluice). Sets PROXY_PID, PROXY_ADDR, PROXY_STOP_SIG.
start_proxy() {
    local kind=$1 name=$2 backend=$3 sluice=${4:-$BIN/sluice} port dir
    port=$(free_port)
    dir=$WORK/$name
    mkdir -p "$dir"
    case $kind in
    sluice | sluice-noramp | sluice-lean)
        cat >"$dir/sluice.toml" <<EOF
[proxy]
listen = "127.0.0.1:$port"
$([[ $kind == sluice-lean ]] && echo "client_write_buffer_bytes = 0" || true)

[admission]
max_inflight = $MAX_INFLIGHT
max_queue = $MAX_QUEUE
queue_timeout = "$QUEUE_TIMEOUT"

[[backend]]
name = "legacy"
address = "$backend"

[server]
threads = $PROXY_THREADS
pid_file = "$dir/sluice.pid"
upgrade_sock = "$dir/sluice_upgrade.sock"
EOF
        local extra=()
        # Newer sluice has an admin listener (default 127.0.0.1:9090): give it a free port so
        # runs never collide with anything else on the machine.
        ((SLUICE_HAS_ADMIN)) && extra+=(--admin-listen "127.0.0.1:$(free_port)")
        [[ $kind == sluice-noramp ]] && extra+=(--slow-start 0s)
        start_bg "$name" "$sluice" run --config "$dir/sluice.toml" --listen "127.0.0.1:$port" \
            --backend "$backend" --max-inflight "$MAX_INFLIGHT" --max-queue "$MAX_QUEUE" \
            --queue-timeout "$QUEUE_TIMEOUT" --threads "$PROXY_THREADS" "${extra[@]}"
        "$sluice" check --config "$dir/sluice.toml" --listen "127.0.0.1:$port" --backend "$backend" \
            --max-inflight "$MAX_INFLIGHT" --max-queue "$MAX_QUEUE" --queue-timeout "$QUEUE_TIMEOUT" \
            --threads "$PROXY_THREADS" "${extra[@]}" >"$dir/check.txt" 2>&1 ||
            { cat "$dir/check.txt" >&2; die "sluice check failed"; }
        echo "sluice run --config sluice.toml --listen 127.0.0.1:$port --backend $backend --max-inflight $MAX_INFLIGHT --max-queue $MAX_QUEUE --queue-timeout $QUEUE_TIMEOUT --threads $PROXY_THREADS ${extra[*]}" >"$dir/command.txt"
        PROXY_STOP_SIG=INT # fast shutdown; SIGTERM would wait for the grace period
        ;;
    haproxy)
        start_haproxy "$name" "$dir" "$port" "$backend"
        PROXY_STOP_SIG=TERM # hard stop
        ;;
    nginx)
        mkdir -p "$dir/logs"
        # max_conns is per worker process unless the upstream lives in shared memory: the zone
        # makes max_conns=32 a global cap, as the other proxies have. backlog=4096 matches the
        # accept queue the other two get (somaxconn); nginx's default is 511.
        cat >"$dir/nginx.conf" <<EOF
worker_processes $PROXY_THREADS;
worker_rlimit_nofile 20000;
pid $dir/nginx.pid;
error_log $dir/logs/error.log warn;

events {
    worker_connections 10000;
}

http {
    access_log off;
    client_body_temp_path $dir/client_body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
    keepalive_timeout 60s;

    upstream legacy {
        zone legacy 64k;
        server $backend max_conns=$MAX_INFLIGHT;
        keepalive $MAX_INFLIGHT;
    }

    server {
        listen 127.0.0.1:$port backlog=4096;
        location / {
            proxy_pass http://legacy;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
        nginx -t -q -p "$dir" -e "$dir/logs/error.log" -c "$dir/nginx.conf" >"$WORK/$name.check" 2>&1 ||
            { cat "$WORK/$name.check" >&2; die "nginx config check failed"; }
        start_bg "$name" nginx -p "$dir" -e "$dir/logs/error.log" -c "$dir/nginx.conf" -g 'daemon off;'
        PROXY_STOP_SIG=TERM # fast shutdown
        ;;
    esac
    PROXY_PID=$BG_PID
    PROXY_ADDR=127.0.0.1:$port
    wait_port "$port" "$PROXY_PID" "$name"
}

# ---------------------------------------------------------------- measurements

# run_terminals NAME ADDR OUT_JSON ARGS...: the load generator, bounded in time (LOAD_LIMIT
# seconds if set, else the surge's length + 90 s).
run_terminals() {
    local name=$1 addr=$2 out=$3 pid
    shift 3
    start_bg "$name" timeout -k 5 "${LOAD_LIMIT:-$((BENCH_SECONDS + 90))}" "$BIN/terminals" --target "$addr" --json "$@"
    pid=$BG_PID
    wait "$pid" || die "load generator $name failed (exit $?): $(tail -3 "$WORK/$name.err")"
    cp "$WORK/$name.out" "$out"
}

# Calibration: what the emulator really serves with 32 busy keep-alive connections on this
# machine (timer granularity and loopback round trips make it a bit less than 1,600/s).
run_ceiling() {
    local run=$1 tag=r$1-ceiling
    log "run $run: calibration, 32 keep-alive clients straight at the emulator for ${CEILING_SECONDS}s"
    start_emu "emu-$tag"
    http "$EMU_ADDR" POST /__emu/reset >/dev/null
    run_terminals "load-$tag" "$EMU_ADDR" "$RES/$tag.terminals.json" --terminals "$MAX_INFLIGHT" \
        --conn-mode keep-alive --http 1.1 --duration "${CEILING_SECONDS}s" --timeout "$CLIENT_TIMEOUT"
    http "$EMU_ADDR" GET /__emu/stats >"$RES/$tag.emu.json"
    stop_pid "$EMU_PID" INT
}

run_surge() {
    local run=$1 target=$2 tag=r$1-$2 addr proxy_pid= before after emu_before
    log "run $run: surge through $target (${TERMINALS} terminals, ${RATE} tx/s offered, ${BENCH_SECONDS}s)"
    start_emu "emu-$tag"
    if [[ $target == direct ]]; then
        addr=$EMU_ADDR
    else
        start_proxy "${target%-before}" "$tag" "$EMU_ADDR" "$(sluice_bin "$target")"
        addr=$PROXY_ADDR
        proxy_pid=$PROXY_PID
    fi
    http "$EMU_ADDR" POST /__emu/reset >/dev/null
    before=$( [[ -n $proxy_pid ]] && proc_tree "$proxy_pid" || echo null)
    emu_before=$(proc_tree "$EMU_PID")
    run_terminals "load-$tag" "$addr" "$RES/$tag.terminals.json" --terminals "$TERMINALS" \
        --conn-mode per-transaction --http mixed --rate "$RATE" --duration "${BENCH_SECONDS}s" \
        --timeout "$CLIENT_TIMEOUT"
    http "$EMU_ADDR" GET /__emu/stats >"$RES/$tag.emu.json"
    after=$( [[ -n $proxy_pid ]] && proc_tree "$proxy_pid" || echo null)
    printf '{"proxy_before": %s, "proxy_after": %s, "emu_before": %s, "emu_after": %s}\n' \
        "$before" "$after" "$emu_before" "$(proc_tree "$EMU_PID")" >"$RES/$tag.meta.json"
    if [[ -n $proxy_pid ]]; then stop_pid "$proxy_pid" "$PROXY_STOP_SIG"; fi
    stop_pid "$EMU_PID" INT
    python3 - "$RES/$tag.terminals.json" "$RES/$tag.emu.json" <<'EOF' >&2
import json, sys
t = json.load(open(sys.argv[1])); e = json.load(open(sys.argv[2]))
print(f"    ok {t['ok']} goodput {t['goodput']:.0f}/s status {t['by_status']} "
      f"errors c/io/t {t['errors_connect']}/{t['errors_io']}/{t['errors_timeout']} "
      f"| backend max_inside {e['max_inside']} lockups {e['lockups']} conns {e['accepted_connections']}")
EOF
}

# wait_rss_stable PID: poll the tree's RSS until two readings 250 ms apart agree within 64 KiB
# (bounded: 5 s). Prints the last proc_tree JSON.
wait_rss_stable() {
    local pid=$1 i prev=-1 cur json
    for ((i = 0; i < 20; i++)); do
        json=$(proc_tree "$pid")
        cur=$(sed -E 's/.*"rss_kib": ([0-9]+).*/\1/' <<<"$json")
        if ((prev >= 0 && cur - prev < 64 && prev - cur < 64)); then break; fi
        prev=$cur
        sleep 0.25
    done
    echo "$json"
}

# open_idle NAME: idle_conns.py opening $BENCH_IDLE_CONNS keep-alive connections through
# PROXY_ADDR (16 requests at a time) and holding them, in the background; waits (at most 120 s)
# for its "ready" line. Sets BG_PID and READY.
open_idle() {
    local name=$1 i
    start_bg "$name" python3 "$BENCH_DIR/idle_conns.py" --target "$PROXY_ADDR" -n "$BENCH_IDLE_CONNS" \
        --concurrency 16 --hold-max 300
    READY=
    for ((i = 0; i < 2400; i++)); do
        READY=$(grep '^ready' "$WORK/$name.out" 2>/dev/null || true)
        [[ -n $READY ]] && break
        alive "$BG_PID" || break
        sleep 0.05
    done
    [[ -n $READY ]] || die "idle connections $name never got ready: $(cat "$WORK/$name.err")"
}

run_memory() {
    local run=$1 kind=$2 tag=r$1-mem-$2 n=$BENCH_IDLE_CONNS before after settled warm idle_pid idle2_pid ready ready2
    log "run $run: memory per idle client connection, $kind, $n connections"
    start_emu "emu-$tag"
    start_proxy "${kind%-before}" "$tag" "$EMU_ADDR" "$(sluice_bin "$kind")"
    # Warm-up: a few connections and requests, closed again, so pools, threads and the upstream
    # connections exist before the baseline is taken.
    timeout 60 python3 "$BENCH_DIR/idle_conns.py" --target "$PROXY_ADDR" -n 64 --concurrency 16 --no-hold \
        >"$WORK/warm-$tag.out" 2>&1 || die "warm-up through $kind failed: $(cat "$WORK/warm-$tag.out")"
    before=$(wait_rss_stable "$PROXY_PID")
    open_idle "idle-$tag"
    idle_pid=$BG_PID ready=$READY
    after=$(wait_rss_stable "$PROXY_PID")
    # The same again in the now warm process: N more idle connections, opened once the first N
    # have idled past sluice's park delay (100 ms). This is the steady-state cost of one more
    # idle terminal; the first figure also holds what the allocator kept from the streams of the
    # connections opened last.
    sleep 3
    settled=$(wait_rss_stable "$PROXY_PID")
    open_idle "idle2-$tag"
    idle2_pid=$BG_PID ready2=$READY
    sleep 3
    warm=$(wait_rss_stable "$PROXY_PID")
    stop_pid "$idle2_pid" TERM 30
    stop_pid "$idle_pid" TERM 30
    python3 - "$kind" "$n" "$ready" "$(grep '^done' "$WORK/idle-$tag.out" || true)" "$before" "$after" \
        "$settled" "$warm" "$ready2" >"$RES/$tag.json" <<'EOF2'
import json, sys
kind, n, ready, done, before, after, settled, warm, ready2 = sys.argv[1:10]
print(json.dumps({"kind": kind, "n": int(n), "ready": ready, "done": done,
                  "before": json.loads(before), "after": json.loads(after),
                  "settled": json.loads(settled), "warm": json.loads(warm), "ready2": ready2}))
EOF2
    stop_pid "$PROXY_PID" "$PROXY_STOP_SIG"
    stop_pid "$EMU_PID" INT
    python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print("    %s; RSS %d -> %d KiB = %.2f KiB/conn; next %d: %d -> %d KiB = %.2f KiB/conn" % (d["ready"], d["before"]["rss_kib"], d["after"]["rss_kib"], (d["after"]["rss_kib"]-d["before"]["rss_kib"])/d["n"], d["n"], d["settled"]["rss_kib"], d["warm"]["rss_kib"], (d["warm"]["rss_kib"]-d["settled"]["rss_kib"])/d["n"]))' "$RES/$tag.json" >&2
}

# ---------------------------------------------------------------- restart scenario

# start_restart_proxy KIND NAME BACKEND_ADDR [SLUICE_BIN]: a proxy tuned for the restart scenario
# (fast health checks, slow start on recovery), on free ports; sluice runs SLUICE_BIN (default
# $BIN/sluice). Sets PROXY_PID, PROXY_ADDR, PROXY_STOP_SIG and PROBE_WHERE (sluice's admin address
# or HAProxy's stats socket).
start_restart_proxy() {
    local kind=$1 name=$2 backend=$3 sluice=${4:-$BIN/sluice} port aport dir
    port=$(free_port)
    dir=$WORK/$name
    mkdir -p "$dir"
    case $kind in
    sluice)
        aport=$(free_port)
        while [[ $aport == "$port" ]]; do aport=$(free_port); done
        cat >"$dir/sluice.toml" <<EOF
[proxy]
listen = "127.0.0.1:$port"

[admission]
max_inflight = $MAX_INFLIGHT
max_queue = $MAX_QUEUE
queue_timeout = "$QUEUE_TIMEOUT"

[slow_start]
duration = "$RS_SLOW_START"
initial = $RS_SLOW_START_INITIAL

[health]
check = "http"
interval = "$RS_HEALTH_INTERVAL"
timeout = "$RS_HEALTH_TIMEOUT"
rise = $RS_RISE
fall = $RS_FALL
passive_failures = 1

[admin]
listen = "127.0.0.1:$aport"

[log]
access = "off"

[[backend]]
name = "legacy"
address = "$backend"

[server]
threads = $PROXY_THREADS
pid_file = "$dir/sluice.pid"
upgrade_sock = "$dir/sluice_upgrade.sock"
EOF
        local args=(--config "$dir/sluice.toml" --max-inflight "$MAX_INFLIGHT" --max-queue "$MAX_QUEUE"
            --queue-timeout "$QUEUE_TIMEOUT" --threads "$PROXY_THREADS")
        "$sluice" check "${args[@]}" >"$dir/check.txt" 2>&1 ||
            { cat "$dir/check.txt" >&2; die "sluice check failed"; }
        echo "sluice run --config sluice.toml ${args[*]:2}" >"$dir/command.txt"
        start_bg "$name" "$sluice" run "${args[@]}"
        PROXY_STOP_SIG=INT
        PROBE_WHERE=127.0.0.1:$aport
        ;;
    haproxy | haproxy-noredispatch)
        local redispatch="option redispatch"
        [[ $kind == haproxy-noredispatch ]] && redispatch="# no option redispatch (HAProxy's default)"
        # retries 3 is HAProxy's default; with the default "retry-on conn-failure" HAProxy only
        # re-sends a request whose connection could not be established, i.e. one that never
        # reached the server, so a POST is never sent twice. With a single server, redispatch
        # can only pick the same server again, but it also lets requests queued on a server that
        # goes down wait in the backend's queue instead of failing; a careful operator sets it.
        cat >"$dir/haproxy.cfg" <<EOF
global
    maxconn $HAPROXY_MAXCONN
    nbthread $PROXY_THREADS
    stats socket $dir/haproxy.sock mode 600 level operator

defaults
    mode http
    maxconn $HAPROXY_MAXCONN
    option http-keep-alive
    http-reuse always
    $redispatch
    retries 3
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout queue $QUEUE_TIMEOUT
    timeout check $RS_HEALTH_TIMEOUT
    timeout http-request 60s
    timeout http-keep-alive 60s

frontend terminals
    bind 127.0.0.1:$port
    default_backend legacy

backend legacy
    # The emulator answers 403 at / (as IIS 6 does on an ISAPI-only site); like sluice's
    # default, count any answer below 500 as alive.
    option httpchk GET /
    http-check expect status 200-499
    server legacy $backend maxconn $MAX_INFLIGHT maxqueue $MAX_QUEUE check inter $RS_HEALTH_INTERVAL fall $RS_FALL rise $RS_RISE slowstart $RS_SLOW_START
EOF
        haproxy -c -q -f "$dir/haproxy.cfg" >"$WORK/$name.check" 2>&1 ||
            { cat "$WORK/$name.check" >&2; die "haproxy config check failed"; }
        start_bg "$name" haproxy -db -f "$dir/haproxy.cfg"
        PROXY_STOP_SIG=TERM
        PROBE_WHERE=$dir/haproxy.sock
        ;;
    esac
    PROXY_PID=$BG_PID
    PROXY_ADDR=127.0.0.1:$port
    wait_port "$port" "$PROXY_PID" "$name"
}

# wait_warm EMU_ADDR KIND PROBE_WHERE: wait (bounded) until the emulator has all its workers
# (its cold start also applies at the first start) and the proxy sees the backend up at its full
# cap (sluice's slow start also runs at its own start).
wait_warm() {
    timeout $((RS_WARM_TIMEOUT + 5)) python3 - "$@" "$WORKERS" "$MAX_INFLIGHT" "$RS_WARM_TIMEOUT" "$BENCH_DIR" <<'EOF' ||
import json, sys, time, urllib.request
emu, kind, where, workers, cap, limit, bench_dir = sys.argv[1:8]
sys.path.insert(0, bench_dir)
import proxy_probe
deadline = time.monotonic() + float(limit)
last = None
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(f"http://{emu}/__emu/stats", timeout=2) as r:
            e = json.load(r)
        ok = e["workers_now"] == int(workers)
        last = f"emulator workers_now {e['workers_now']}"
        if ok and kind == "sluice":
            s = proxy_probe.poll("sluice", where)
            ok = s["state"] == "up" and s["limit"] == int(cap)
            last += f", sluice {s}"
        elif ok and kind == "haproxy":
            r = proxy_probe.haproxy_rows(where).get("legacy", {})
            ok = r.get("status") == "UP" and not r.get("throttle")
            last += f", haproxy status {r.get('status')} throttle {r.get('throttle')!r}"
        if ok:
            sys.exit(0)
    except Exception as ex:
        last = f"{type(ex).__name__}: {ex}"
    time.sleep(0.25)
print(f"not warm after {limit}s: {last}", file=sys.stderr)
sys.exit(1)
EOF
        die "restart scenario: backend/proxy not ready"
}

# run_restart KEY TARGET: KEY is r<n> (steady arrivals: terminal starts spread over one firing
# interval) or b<n> (all terminals start at once: lock-step bursts).
run_restart() {
    local key=$1 target=$2 tag=restart-$1-$2 addr proxy_pid= probe_pid= ramp=() shape="all at once" kind
    # What kind of proxy the probes talk to: sluice-before is a sluice, haproxy-noredispatch a HAProxy.
    kind=${target%-noredispatch}
    kind=${kind%-before}
    if [[ $key == r* ]]; then
        ramp=(--ramp "${RS_RAMP_MS}ms")
        shape="starts spread over ${RS_RAMP_MS} ms"
    fi
    log "restart $key: $target (${RS_TERMINALS} keep-alive terminals, $shape, ${RS_RATE} tx/s, ${RS_SECONDS}s; crash at ${RS_OUTAGE_AT} for ${RS_OUTAGE_FOR}, cold restart)"
    start_emu "emu-$tag" --cold-start-fraction "$RS_COLD_FRACTION" --cold-start-duration "$RS_COLD_DURATION" \
        --outage-at "$RS_OUTAGE_AT" --outage-for "$RS_OUTAGE_FOR" --clock sigusr1 \
        --timeline "$RES/$tag.timeline.jsonl" --transactions-out "$RES/$tag.txns.txt"
    if [[ $target == direct ]]; then
        addr=$EMU_ADDR
        wait_warm "$EMU_ADDR" direct -
    else
        start_restart_proxy "${target%-before}" "$tag" "$EMU_ADDR" "$(sluice_bin "$target")"
        addr=$PROXY_ADDR
        proxy_pid=$PROXY_PID
        wait_warm "$EMU_ADDR" "$kind" "$PROBE_WHERE"
        start_bg "probe-$tag" python3 "$BENCH_DIR/proxy_probe.py" "$kind" "$PROBE_WHERE" "$RES/$tag.probe.jsonl"
        probe_pid=$BG_PID
    fi
    http "$EMU_ADDR" POST /__emu/reset >/dev/null
    # Starts the emulator's clock (outage at +10 s, timeline) together with the load.
    kill -USR1 "$EMU_PID"
    LOAD_LIMIT=$((RS_SECONDS + 90)) run_terminals "load-$tag" "$addr" "$RES/$tag.terminals.json" \
        --terminals "$RS_TERMINALS" --conn-mode keep-alive --http 1.1 --method post --rate "$RS_RATE" \
        --duration "${RS_SECONDS}s" --timeout "$RS_CLIENT_TIMEOUT" --record-ids "${ramp[@]}"
    http "$EMU_ADDR" GET /__emu/stats >"$RES/$tag.emu.json"
    if [[ -n $proxy_pid ]]; then
        python3 "$BENCH_DIR/proxy_probe.py" "$kind" "$PROBE_WHERE" - --once >"$RES/$tag.proxy.json" ||
            log "warning: could not read $target's counters"
        stop_pid "$probe_pid" TERM 5
        stop_pid "$proxy_pid" "$PROXY_STOP_SIG"
        head -c 2000000 "$WORK/$tag.err" >"$RES/$tag.proxy.err" || true
    fi
    stop_pid "$EMU_PID" INT # writes the transaction ids and the timeline's last line
    cp "$WORK/emu-$tag.err" "$RES/$tag.emu.err" || true
    python3 - "$RES" "$tag" <<'EOF' >&2
import json, os, sys
res, tag = sys.argv[1:3]
t = json.load(open(os.path.join(res, tag + ".terminals.json")))
e = json.load(open(os.path.join(res, tag + ".emu.json")))
failed = t["sent"] - t["ok"]
ids = open(os.path.join(res, tag + ".txns.txt")).read().split()
print(f"    sent {t['sent']} ok {t['ok']} failed {failed} ({100.0 * failed / max(t['sent'], 1):.2f} %) "
      f"status {t['by_status']} errors c/io/t {t['errors_connect']}/{t['errors_io']}/{t['errors_timeout']} "
      f"| backend max_inside {e['max_inside']} lockups {e['lockups']} "
      f"| backend arrivals {len(ids)} distinct {len(set(ids))}")
EOF
}

# ---------------------------------------------------------------- slowdown scenario

# start_slowdown_proxy KIND NAME BACKEND_ADDR: sluice (defaults; sluice-adaptive adds
# admission.adaptive = true) or HAProxy with the same static cap, on free ports, with an admin
# listener / stats socket to sample. Sets PROXY_PID, PROXY_ADDR, PROXY_STOP_SIG, PROBE_WHERE.
start_slowdown_proxy() {
    local kind=$1 name=$2 backend=$3 port aport dir
    port=$(free_port)
    dir=$WORK/$name
    mkdir -p "$dir"
    case $kind in
    sluice | sluice-adaptive)
        aport=$(free_port)
        while [[ $aport == "$port" ]]; do aport=$(free_port); done
        cat >"$dir/sluice.toml" <<EOF
[proxy]
listen = "127.0.0.1:$port"

[admission]
max_inflight = $MAX_INFLIGHT
max_queue = $MAX_QUEUE
queue_timeout = "$QUEUE_TIMEOUT"
$([[ $kind == sluice-adaptive ]] && echo "adaptive = true" || true)

[admin]
listen = "127.0.0.1:$aport"

[log]
access = "off"

[[backend]]
name = "legacy"
address = "$backend"

[server]
threads = $PROXY_THREADS
pid_file = "$dir/sluice.pid"
upgrade_sock = "$dir/sluice_upgrade.sock"
EOF
        local args=(--config "$dir/sluice.toml")
        "$BIN/sluice" check "${args[@]}" >"$dir/check.txt" 2>&1 ||
            { cat "$dir/check.txt" >&2; die "sluice check failed"; }
        echo "sluice run --config sluice.toml" >"$dir/command.txt"
        start_bg "$name" "$BIN/sluice" run "${args[@]}"
        PROXY_STOP_SIG=INT
        PROBE_WHERE=127.0.0.1:$aport
        ;;
    haproxy)
        start_haproxy "$name" "$dir" "$port" "$backend" "$dir/haproxy.sock"
        PROXY_STOP_SIG=TERM
        PROBE_WHERE=$dir/haproxy.sock
        ;;
    esac
    PROXY_PID=$BG_PID
    PROXY_ADDR=127.0.0.1:$port
    wait_port "$port" "$PROXY_PID" "$name"
}

# wait_sluice_at_cap ADMIN: wait (bounded) until sluice's effective limit is the cap (its
# start-up ramp is over), so the scenario measures the slowdown, not the start.
wait_sluice_at_cap() {
    timeout $((SD_WARM_TIMEOUT + 5)) python3 - "$1" "$MAX_INFLIGHT" "$SD_WARM_TIMEOUT" "$BENCH_DIR" <<'EOF' ||
import sys, time
where, cap, limit, bench_dir = sys.argv[1:5]
sys.path.insert(0, bench_dir)
import proxy_probe
deadline = time.monotonic() + float(limit)
last = None
while time.monotonic() < deadline:
    try:
        last = proxy_probe.poll("sluice", where)
        if last["state"] == "up" and last["limit"] == int(cap):
            sys.exit(0)
    except Exception as ex:
        last = f"{type(ex).__name__}: {ex}"
    time.sleep(0.1)
print(f"sluice not at its cap after {limit}s: {last}", file=sys.stderr)
sys.exit(1)
EOF
        die "slowdown scenario: sluice did not reach its cap"
}

# run_slowdown HOW TARGET: HOW is service-time or workers.
run_slowdown() {
    local how=$1 target=$2 tag=slowdown-$1-$2 probe_pid kind
    kind=${target%-adaptive}
    log "slowdown ($how x$SD_FACTOR at $SD_SLOW_AT for $SD_SLOW_FOR): $target (${SD_TERMINALS} keep-alive terminals, ${SD_RATE} tx/s, ${SD_SECONDS}s)"
    start_emu "emu-$tag" --slowdown "$SD_SLOW_AT:$SD_SLOW_FOR:$SD_FACTOR" --slowdown-of "$how" \
        --clock sigusr1 --timeline "$RES/$tag.timeline.jsonl" --timeline-interval "${SD_SAMPLE_MS}ms"
    start_slowdown_proxy "$target" "$tag" "$EMU_ADDR"
    if [[ $kind == sluice ]]; then wait_sluice_at_cap "$PROBE_WHERE"; fi
    start_bg "probe-$tag" python3 "$BENCH_DIR/proxy_probe.py" "$kind" "$PROBE_WHERE" "$RES/$tag.probe.jsonl" \
        --interval "$(python3 -c "print($SD_SAMPLE_MS / 1000)")"
    probe_pid=$BG_PID
    http "$EMU_ADDR" POST /__emu/reset >/dev/null
    # Starts the emulator's clock (slowdown at +10 s, timeline) together with the load.
    kill -USR1 "$EMU_PID"
    LOAD_LIMIT=$((SD_SECONDS + 90)) run_terminals "load-$tag" "$PROXY_ADDR" "$RES/$tag.terminals.json" \
        --terminals "$SD_TERMINALS" --conn-mode keep-alive --http 1.1 --rate "$SD_RATE" \
        --duration "${SD_SECONDS}s" --timeout "$SD_CLIENT_TIMEOUT" --ramp "${SD_RAMP_MS}ms"
    http "$EMU_ADDR" GET /__emu/stats >"$RES/$tag.emu.json"
    python3 "$BENCH_DIR/proxy_probe.py" "$kind" "$PROBE_WHERE" - --once >"$RES/$tag.proxy.json" ||
        log "warning: could not read $target's counters"
    stop_pid "$probe_pid" TERM 5
    stop_pid "$PROXY_PID" "$PROXY_STOP_SIG"
    stop_pid "$EMU_PID" INT # writes the timeline's last line
    cp "$WORK/emu-$tag.err" "$RES/$tag.emu.err" || true
    for f in sluice.toml haproxy.cfg command.txt check.txt; do
        if [[ -f $WORK/$tag/$f ]]; then cp "$WORK/$tag/$f" "$RES/$tag.$f"; fi
    done
    python3 - "$RES" "$tag" <<'EOF' >&2
import json, os, sys
res, tag = sys.argv[1:3]
t = json.load(open(os.path.join(res, tag + ".terminals.json")))
e = json.load(open(os.path.join(res, tag + ".emu.json")))
failed = t["sent"] - t["ok"]
lat = t["latency_ok"]
print(f"    sent {t['sent']} ok {t['ok']} failed {failed} ({100.0 * failed / max(t['sent'], 1):.2f} %) "
      f"status {t['by_status']} errors c/io/t {t['errors_connect']}/{t['errors_io']}/{t['errors_timeout']} "
      f"| p50 {lat['p50_ms']:.1f} p99 {lat['p99_ms']:.1f} ms "
      f"| backend max_inside {e['max_inside']} lockups {e['lockups']}")
EOF
}

# ---------------------------------------------------------------- main

START_TS=$(date +%s)
log "work directory $WORK"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
(($(ulimit -n) >= 12000)) || log "warning: open-file limit $(ulimit -n) is low for 2,000 terminals"
# HAProxy refuses to start unless it can get 2 x maxconn + a few file descriptors.
HAPROXY_MAXCONN=$(( $(ulimit -n) / 2 - 50 ))
((HAPROXY_MAXCONN > 10000)) && HAPROXY_MAXCONN=10000

missing=()
for p in haproxy nginx; do
    case " $BENCH_TARGETS $BENCH_RESTART_TARGETS $BENCH_SLOWDOWN_TARGETS " in *" $p"*) command -v "$p" >/dev/null || missing+=("$p") ;; esac
done
if ((${#missing[@]})); then
    log "installing ${missing[*]} (Debian packages haproxy, nginx-light)"
    pkgs=()
    for p in "${missing[@]}"; do [[ $p == nginx ]] && pkgs+=(nginx-light) || pkgs+=(haproxy); done
    export DEBIAN_FRONTEND=noninteractive
    timeout 600 apt-get install -y "${pkgs[@]}" >"$WORK/apt.log" 2>&1 ||
        { timeout 600 apt-get update >>"$WORK/apt.log" 2>&1 && timeout 600 apt-get install -y "${pkgs[@]}" >>"$WORK/apt.log" 2>&1; } ||
        die "apt-get install ${pkgs[*]} failed, see $WORK/apt.log"
    # The Debian packages start a system service; this benchmark runs its own instances.
    for p in "${missing[@]}"; do
        command -v systemctl >/dev/null && systemctl stop "$p" >/dev/null 2>&1 || true
    done
fi
command -v python3 >/dev/null || die "python3 is required"

if [[ $BENCH_SKIP_BUILD != 1 ]]; then
    [[ $BIN -ef $ROOT/target/release ]] || log "warning: building into $ROOT/target/release, but BENCH_BIN=$BIN"
    log "building release binaries (cargo build --release -p sluice -p sluice-tests)"
    (cd "$ROOT" && timeout 3600 cargo build --release -p sluice -p sluice-tests) >"$WORK/build.log" 2>&1 ||
        { tail -30 "$WORK/build.log" >&2; die "build failed"; }
fi
# Run private copies: target/release may be rebuilt by someone else while the benchmark runs,
# and every target must be measured with the same binaries.
mkdir -p "$WORK/bin"
for b in sluice legacy-emu terminals; do
    [[ -x $BIN/$b ]] || die "$BIN/$b missing"
    cp -p "$BIN/$b" "$WORK/bin/$b" # -p: keeps the build time shown in the report
done
BIN=$WORK/bin
BIN_BEFORE=
if [[ -n $BENCH_SLUICE_BEFORE ]]; then
    mkdir -p "$WORK/bin-before"
    cp -p "$BENCH_SLUICE_BEFORE/sluice" "$WORK/bin-before/sluice"
    BIN_BEFORE=$WORK/bin-before
    cmp -s "$BIN/sluice" "$BIN_BEFORE/sluice" &&
        log "warning: BENCH_SLUICE_BEFORE's sluice is the same binary as $BENCH_BIN/sluice"
fi
SLUICE_HELP=$("$BIN/sluice" run --help 2>&1 || true)
SLUICE_HAS_ADMIN=0
grep -q -- '--admin-listen' <<<"$SLUICE_HELP" && SLUICE_HAS_ADMIN=1
SLUICE_HAS_SLOW_START=0
grep -q -- '--slow-start' <<<"$SLUICE_HELP" && SLUICE_HAS_SLOW_START=1
SLUICE_HAS_WRITE_BUFFER=0
grep -q client_write_buffer_bytes "$ROOT/conf/sluice.toml" 2>/dev/null && SLUICE_HAS_WRITE_BUFFER=1
if ((!SLUICE_HAS_SLOW_START)) && [[ " $BENCH_TARGETS " == *" sluice-noramp "* ]]; then
    log "this sluice has no --slow-start flag: skipping target sluice-noramp"
    BENCH_TARGETS=$(sed 's/ *sluice-noramp//' <<<"$BENCH_TARGETS")
fi

LOAD_AT_START=$(cut -d' ' -f1-3 /proc/loadavg)
targets=($BENCH_TARGETS)
SURGE_RUNS=$BENCH_RUNS
((RUN_SURGE)) || SURGE_RUNS=0
for ((run = 1; run <= SURGE_RUNS; run++)); do
    run_ceiling "$run"
    order=("${targets[@]}")
    if ((run % 2 == 0)); then # alternate the order, so no target always runs first or last
        order=()
        for ((i = ${#targets[@]} - 1; i >= 0; i--)); do order+=("${targets[i]}"); done
    fi
    for t in "${order[@]}"; do run_surge "$run" "$t"; done
    if ((BENCH_IDLE_CONNS > 0)); then
        # Memory per idle connection does not depend on the ramp: measure sluice once.
        for t in "${order[@]}"; do
            case $t in direct | sluice-noramp) ;; *) run_memory "$run" "$t" ;; esac
        done
        # And sluice without a client write buffer (proxy.client_write_buffer_bytes = 0), the
        # memory-lean setting, where this sluice has it.
        if [[ " ${order[*]} " == *" sluice "* ]] && ((SLUICE_HAS_WRITE_BUFFER)); then
            run_memory "$run" sluice-lean
        fi
    fi
done

SURGE_END_TS=$(date +%s)
RS_RATE=0 RS_CEILING=0 RS_RATE_SOURCE= RS_RAMP_MS=0
if ((RUN_RESTART)); then
    # Offer 90 % of what the emulator really serves here (the calibration of this script run),
    # not of the nominal 1,600/s: the emulator delivers a few percent less, and a load of
    # 0.9 x 1,600 would leave almost no headroom to work off the backlog of the outage.
    ((RUN_SURGE)) || run_ceiling 1
    RS_CEILING=$(python3 -c 'import glob, json, sys
v = [json.load(open(f))["goodput"] for f in sorted(glob.glob(sys.argv[1] + "/r*-ceiling.terminals.json"))]
print(round(sum(v) / len(v)) if v else 0)' "$RES")
    if [[ -n $BENCH_RESTART_RATE ]]; then
        RS_RATE=$BENCH_RESTART_RATE RS_RATE_SOURCE=BENCH_RESTART_RATE
    else
        ((RS_CEILING > 0)) || die "no calibration result to derive the restart scenario's rate from"
        RS_RATE=$(python3 -c "print(round($RS_LOAD_FRACTION * $RS_CEILING))") RS_RATE_SOURCE=ceiling
    fi
    # Terminal start times. All at once, the 600 terminals fire in lock-step: a burst of 600
    # every 600/rate s, which queues ~570 of them at every burst, so what the crash finds (most
    # terminals parked in the proxy's queue, or most of them idle and about to fire into a
    # backend that is down) depends on the burst's phase at t = 10 s, i.e. on the exact rate.
    # Spread over one firing interval (the main runs), arrivals are steady, as "90 % of
    # capacity" means; the burst runs keep the all-at-once load for comparison.
    RS_RAMP_MS=$(python3 -c "print(round(1000 * $RS_TERMINALS / $RS_RATE))")
    log "restart scenario: offering $RS_RATE tx/s (measured ceiling $RS_CEILING ok/s, source: $RS_RATE_SOURCE)"
    rtargets=($BENCH_RESTART_TARGETS)
    keys=()
    for ((run = 1; run <= BENCH_RESTART_RUNS; run++)); do keys+=("r$run"); done
    for ((run = 1; run <= BENCH_RESTART_BURST_RUNS; run++)); do keys+=("b$run"); done
    for ((k = 0; k < ${#keys[@]}; k++)); do
        order=("${rtargets[@]}")
        if ((k % 2 == 1)); then # alternate the order, so no target always runs first or last
            order=()
            for ((i = ${#rtargets[@]} - 1; i >= 0; i--)); do order+=("${rtargets[i]}"); done
        fi
        for t in "${order[@]}"; do run_restart "${keys[k]}" "$t"; done
    done
fi
RESTART_END_TS=$(date +%s)
SD_RATE=0 SD_CEILING=0 SD_RATE_SOURCE= SD_RAMP_MS=0
if ((RUN_SLOWDOWN)); then
    # 80 % of what the emulator really serves here (this script run's calibration), as for the
    # restart scenario.
    ((RUN_SURGE || RUN_RESTART)) || run_ceiling 1
    SD_CEILING=$(python3 -c 'import glob, json, sys
v = [json.load(open(f))["goodput"] for f in sorted(glob.glob(sys.argv[1] + "/r*-ceiling.terminals.json"))]
print(round(sum(v) / len(v)) if v else 0)' "$RES")
    if [[ -n $BENCH_SLOWDOWN_RATE ]]; then
        SD_RATE=$BENCH_SLOWDOWN_RATE SD_RATE_SOURCE=BENCH_SLOWDOWN_RATE
    else
        ((SD_CEILING > 0)) || die "no calibration result to derive the slowdown scenario's rate from"
        SD_RATE=$(python3 -c "print(round($SD_LOAD_FRACTION * $SD_CEILING))") SD_RATE_SOURCE=ceiling
    fi
    # Terminal start times spread over one firing interval: steady arrivals.
    SD_RAMP_MS=$(python3 -c "print(round(1000 * $SD_TERMINALS / $SD_RATE))")
    log "slowdown scenario: offering $SD_RATE tx/s (measured ceiling $SD_CEILING ok/s, source: $SD_RATE_SOURCE)"
    sdtargets=($BENCH_SLOWDOWN_TARGETS)
    k=0
    for how in $BENCH_SLOWDOWN_OF; do
        order=("${sdtargets[@]}")
        if ((k % 2 == 1)); then # alternate the order, so no target always runs first or last
            order=()
            for ((i = ${#sdtargets[@]} - 1; i >= 0; i--)); do order+=("${sdtargets[i]}"); done
        fi
        for t in "${order[@]}"; do run_slowdown "$how" "$t"; done
        k=$((k + 1))
    done
fi
END_TS=$(date +%s)
LOAD_AT_END=$(cut -d' ' -f1-3 /proc/loadavg)

first_line() { "$@" 2>&1 | head -1 || true; }
export P_DATE P_NPROC P_CPU P_KERNEL P_HAPROXY P_NGINX P_SLUICE P_SLUICE_BEFORE P_RUSTC
P_DATE=$(date -u '+%Y-%m-%d %H:%M:%S UTC')
P_NPROC=$(nproc)
P_CPU=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1 || true)
P_KERNEL=$(uname -srm)
P_HAPROXY=$(first_line haproxy -v)
P_NGINX=$(first_line nginx -v)
# describe_sluice BINARY: its version, checksum and build time.
describe_sluice() {
    echo "$(first_line "$1" --version) (binary sha256 $(sha256sum "$1" | cut -c1-12), built $(date -u -r "$1" '+%Y-%m-%d %H:%M UTC'))"
}
P_SLUICE=$(describe_sluice "$BIN/sluice")
P_SLUICE_BEFORE=
[[ -n $BIN_BEFORE ]] && P_SLUICE_BEFORE="$(describe_sluice "$BIN_BEFORE/sluice"), from $BENCH_SLUICE_BEFORE"
P_RUSTC=$(first_line rustc --version)
python3 - "$RES/params.json" <<EOF
import json, os, sys
e = os.environ
p = {
    "date": e["P_DATE"], "nproc": e["P_NPROC"], "cpu": e["P_CPU"], "kernel": e["P_KERNEL"],
    "haproxy": e["P_HAPROXY"] or "n/a", "nginx": e["P_NGINX"] or "n/a",
    "sluice": e["P_SLUICE"] or "n/a", "rustc": e["P_RUSTC"] or "n/a",
    "sluice_before": e["P_SLUICE_BEFORE"] or None,
    "load_at_start": "$LOAD_AT_START",
    "load_at_end": "$LOAD_AT_END",
    "wall_seconds": $((END_TS - START_TS)),
    "bench_seconds": $BENCH_SECONDS,
    "runs": $SURGE_RUNS,
    "targets": "$BENCH_TARGETS",
    "scenarios": "$BENCH_SCENARIOS",
    "surge_seconds_wall": $((SURGE_END_TS - START_TS)),
    "restart_seconds_wall": $((RESTART_END_TS - SURGE_END_TS)),
    "slowdown_seconds_wall": $((END_TS - RESTART_END_TS)),
    "slowdown": {
        "targets": "$BENCH_SLOWDOWN_TARGETS",
        "of": "$( ((RUN_SLOWDOWN)) && echo "$BENCH_SLOWDOWN_OF" || true)",
        "terminals": $SD_TERMINALS,
        "seconds": $SD_SECONDS,
        "rate": $SD_RATE,
        "rate_source": "$SD_RATE_SOURCE",
        "ramp_ms": $SD_RAMP_MS,
        "load_fraction": $SD_LOAD_FRACTION,
        "ceiling": $SD_CEILING,
        "client_timeout": "$SD_CLIENT_TIMEOUT",
        "slow_at": "$SD_SLOW_AT",
        "slow_for": "$SD_SLOW_FOR",
        "factor": $SD_FACTOR,
        "sample_ms": $SD_SAMPLE_MS,
        "max_inflight": $MAX_INFLIGHT,
    },
    "restart": {
        "runs": $((RUN_RESTART ? BENCH_RESTART_RUNS : 0)),
        "burst_runs": $((RUN_RESTART ? BENCH_RESTART_BURST_RUNS : 0)),
        "targets": "$BENCH_RESTART_TARGETS",
        "terminals": $RS_TERMINALS,
        "seconds": $RS_SECONDS,
        "rate": $RS_RATE,
        "rate_source": "$RS_RATE_SOURCE",
        "ramp_ms": $RS_RAMP_MS,
        "load_fraction": $RS_LOAD_FRACTION,
        "ceiling": $RS_CEILING,
        "client_timeout": "$RS_CLIENT_TIMEOUT",
        "outage_at": "$RS_OUTAGE_AT",
        "outage_for": "$RS_OUTAGE_FOR",
        "cold_fraction": $RS_COLD_FRACTION,
        "cold_duration": "$RS_COLD_DURATION",
        "health_interval": "$RS_HEALTH_INTERVAL",
        "health_timeout": "$RS_HEALTH_TIMEOUT",
        "rise": $RS_RISE,
        "fall": $RS_FALL,
        "slow_start": "$RS_SLOW_START",
        "slow_start_initial": $RS_SLOW_START_INITIAL,
    },
    "terminals": $TERMINALS,
    "rate": $RATE,
    "client_timeout": "$CLIENT_TIMEOUT",
    "workers": $WORKERS,
    "service_time": "$SERVICE_TIME",
    "lockup_above": $LOCKUP_ABOVE,
    "lockup_duration": "$LOCKUP_DURATION",
    "capacity": $CAPACITY,
    "max_inflight": $MAX_INFLIGHT,
    "max_queue": $MAX_QUEUE,
    "queue_timeout": "$QUEUE_TIMEOUT",
    "proxy_threads": $PROXY_THREADS,
    "haproxy_maxconn": $HAPROXY_MAXCONN,
    "ceiling_seconds": $CEILING_SECONDS,
    "idle_conns": $BENCH_IDLE_CONNS,
    "sluice_has_slow_start": $SLUICE_HAS_SLOW_START,
}
json.dump(p, open(sys.argv[1], "w"), indent=2)
EOF
# Keep the configurations that were used next to the results.
for f in "$WORK"/r1-sluice/sluice.toml "$WORK"/r1-haproxy/haproxy.cfg "$WORK"/r1-nginx/nginx.conf; do
    if [[ -f $f ]]; then cp "$f" "$RES/"; fi
done
for t in sluice sluice-noramp sluice-before; do
    if [[ -f $WORK/r1-$t/command.txt ]]; then cp "$WORK/r1-$t/command.txt" "$RES/$t.command.txt"; fi
    if [[ -f $WORK/r1-$t/check.txt ]]; then cp "$WORK/r1-$t/check.txt" "$RES/$t.check.txt"; fi
done
# The restart scenario's, from its first run (r1, else b1).
for d in "$WORK"/restart-r1-sluice "$WORK"/restart-b1-sluice; do
    if [[ -f $d/sluice.toml ]]; then
        cp "$d/sluice.toml" "$RES/restart-sluice.toml"
        cp "$d/command.txt" "$RES/restart-sluice.command.txt"
        cp "$d/check.txt" "$RES/restart-sluice.check.txt"
        break
    fi
done
for d in "$WORK"/restart-r1-sluice-before "$WORK"/restart-b1-sluice-before; do
    if [[ -f $d/check.txt ]]; then cp "$d/check.txt" "$RES/restart-sluice-before.check.txt" && break; fi
done
for d in "$WORK"/restart-r1-haproxy "$WORK"/restart-b1-haproxy; do
    if [[ -f $d/haproxy.cfg ]]; then cp "$d/haproxy.cfg" "$RES/restart-haproxy.cfg" && break; fi
done
outs=()
if ((RUN_SLOWDOWN)); then
    python3 "$BENCH_DIR/report_slowdown.py" "$RES" "$BENCH_SLOWDOWN_OUT"
    outs+=("$BENCH_SLOWDOWN_OUT")
fi
# A run of the slowdown alone leaves the surge and restart results as they are.
if ((RUN_SURGE || RUN_RESTART)); then
    python3 "$BENCH_DIR/report.py" "$RES" "$BENCH_OUT"
    outs+=("$BENCH_OUT")
fi
log "done in $((END_TS - START_TS)) s; results in ${outs[*]}"
