# Shared by the benchmark scripts (sourced, not run): the tool venv, a work
# directory whose processes are stopped on exit, free ports, and waiting
# for a process's ready line with a deadline.

# bench_venv PACKAGE...: a venv at $venv (under $COVET_BENCH_HOME, default
# ~/.cache/covet/bench) holding the packages; sets $venv and $py.
bench_venv() {
  local home=${COVET_BENCH_HOME:-$HOME/.cache/covet/bench}
  venv=$home/pyvenv
  py=$venv/bin/python
  if [ ! -x "$venv/bin/pip" ]; then
    python3 -m venv "$venv" 2>/dev/null || {
      rm -rf "$venv"
      python3 -m venv --without-pip "$venv"
      python3 -m pip --python "$py" install -q pip
    }
  fi
  "$venv/bin/pip" install -q --disable-pip-version-check "$@"
}

# bench_work: a temp dir at $work; processes whose pids are added to the
# array `pids` are stopped, and the dir removed, when the script exits.
bench_work() {
  work=$(mktemp -d)
  pids=()
  trap bench_cleanup EXIT
}
bench_cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work" || true
}

# port: a loopback port free now.
port() { "$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# wait_line FILE TEXT: waits (30 s at most) until FILE holds TEXT.
wait_line() {
  for _ in $(seq 600); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.05; done
  echo "timed out waiting for '$2' in $1" >&2; cat "$1" >&2; exit 1
}
