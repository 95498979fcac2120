#!/usr/bin/env bash
# CPU flamegraphs of a single-node broker and of the benchmark client while
# `covet bench pub` runs one case, written as SVGs into docs/perf/ (or --out).
#
#   bash scripts/profile.sh [--out DIR] [--name NAME] -- BENCH-PUB-ARGS...
#   bash scripts/profile.sh --name window256 -- --in-flight 256 --linger-ms 0 --records 2000000
#
# Needs perf (Debian's linux-perf) and inferno (installed here with cargo if
# missing). Samples on the cpu-clock event, which works in VMs without
# hardware counters. The release profile keeps line-level debug info
# (Cargo.toml), so frames have names.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$here/docs/perf"
name="profile"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --name) name="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "profile.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

command -v perf >/dev/null || { apt-get update -qq && apt-get install -y -qq linux-perf; }
command -v inferno-flamegraph >/dev/null || cargo install inferno --locked
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/covet/target}"
cargo build --release --locked -p covet-broker --manifest-path "$here/Cargo.toml"
covet="$CARGO_TARGET_DIR/release/covet"

work="$(mktemp -d /tmp/covet-profile.XXXXXX)"
broker_pid=""
cleanup() {
  [[ -n "$broker_pid" ]] && kill "$broker_pid" 2>/dev/null && wait "$broker_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

"$covet" broker --data-dir "$work/data" --listen 127.0.0.1:0 >"$work/broker.log" 2>&1 &
broker_pid=$!
for _ in $(seq 1 100); do
  addr="$(sed -n 's/.*listening on \([0-9.:]*\).*/\1/p' "$work/broker.log" | head -1)"
  [[ -n "$addr" ]] && break
  sleep 0.1
done
[[ -n "${addr:-}" ]] || { echo "profile.sh: broker did not start" >&2; cat "$work/broker.log" >&2; exit 1; }

mkdir -p "$out"
perf record -F 2000 -e cpu-clock -g -p "$broker_pid" -o "$work/broker.data" >/dev/null 2>&1 &
perf_pid=$!
perf record -F 2000 -e cpu-clock -g -o "$work/client.data" -- \
  "$covet" bench pub --broker "$addr" "$@" | tee "$out/$name.json"
kill -INT "$perf_pid"
wait "$perf_pid" || true

for side in broker client; do
  perf script -i "$work/$side.data" 2>/dev/null | inferno-collapse-perf >"$work/$side.folded"
  inferno-flamegraph --title "covet $side: bench pub $*" <"$work/$side.folded" >"$out/$name-$side.svg"
  echo "wrote $out/$name-$side.svg"
done
