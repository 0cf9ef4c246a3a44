#!/usr/bin/env bash
# Runs the benchmark scenarios against a local sluice (`make bench` calls this).
#
#   bash bench/run-all.sh                          every scenario in bench/scenarios
#   bash bench/run-all.sh bench/scenarios/mlp-spike.toml ...   just these
#
# Builds the release binaries, starts sluice on free 127.0.0.1 ports with the bundled
# model repository (./models, whose weights `make models` exports), runs each
# scenario (each is bounded: about 2 minutes in all), writes results and plots under
# bench/results/ (or $BENCH_RESULTS), and stops the server whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RESULTS=${BENCH_RESULTS:-$ROOT/bench/results}
# Upper bound for the whole scenario run, in seconds.
BENCH_TIMEOUT=${BENCH_TIMEOUT:-900}

# tch finds libtorch through the project's virtual environment (as the Makefile does).
export VIRTUAL_ENV=${VIRTUAL_ENV:-$ROOT/.venv}
export PATH=$VIRTUAL_ENV/bin:$PATH
export LIBTORCH_USE_PYTORCH=1

if [[ $# -gt 0 ]]; then scenarios=("$@"); else scenarios=(bench/scenarios/*.toml); fi
for m in models/mlp/1/model.pt models/cnn/1/model.pt; do
  [[ -f $m ]] || { echo "missing $m: run 'make models' first" >&2; exit 1; }
done

cargo build --release -p sluice -p sluice-bench

# Three free loopback ports: gRPC, HTTP, metrics.
read -r GRPC HTTP METRICS < <(python3 - <<'PY'
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
for s in socks:
    s.close()
PY
)

mkdir -p "$RESULTS"
LOG=$RESULTS/sluice.log
echo "starting sluice on 127.0.0.1 (gRPC $GRPC, HTTP $HTTP, metrics $METRICS); log: $LOG"
./target/release/sluice --model-repository models --host 127.0.0.1 \
  --grpc-port "$GRPC" --http-port "$HTTP" --metrics-port "$METRICS" >"$LOG" 2>&1 &
SERVER=$!
stop() {
  if kill -0 "$SERVER" 2>/dev/null; then
    kill "$SERVER" 2>/dev/null || true
    # Bounded wait for a graceful exit, then make sure.
    for _ in $(seq 50); do kill -0 "$SERVER" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$SERVER" 2>/dev/null || true
  fi
}
trap stop EXIT

ready() {
  python3 - "$HTTP" <<'PY'
import sys, urllib.request
try:
    urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/v2/health/ready", timeout=1)
except Exception:
    sys.exit(1)
PY
}
for _ in $(seq 120); do
  ready && break
  kill -0 "$SERVER" 2>/dev/null || { echo "sluice exited; see $LOG" >&2; tail -20 "$LOG" >&2; exit 1; }
  sleep 0.5
done
ready || { echo "sluice was not ready after 60 s; see $LOG" >&2; exit 1; }

timeout "$BENCH_TIMEOUT" ./target/release/sluice-bench run-scenario "${scenarios[@]}" \
  --url "127.0.0.1:$GRPC" --out-dir "$RESULTS"
echo "results and plots in $RESULTS"
