#!/usr/bin/env bash
# Triton's perf_analyzer against sluice, dynamic batching on vs off, in one run.
#
#   scripts/perf-analyzer-compare.sh [MODELS] [CONCURRENCIES]
#   scripts/perf-analyzer-compare.sh "mlp cnn" "1 8 16 32"
#
# Serves the bundled repository twice from the release binary: as committed (batching on)
# and a copy whose configs drop `dynamic_batching` (each request runs alone). For every
# model and concurrency it runs perf_analyzer on one server, then the other, and prints
# a Markdown table of throughput and latency. Needs `make build` first; perf_analyzer is
# run by PERF_ANALYZER (default scripts/tools/perf-analyzer, which installs it on first use).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
models=${1:-"mlp cnn"}
concurrencies=${2:-"1 8 16 32"}
pa=${PERF_ANALYZER:-$root/scripts/tools/perf-analyzer}
interval_ms=${MEASUREMENT_INTERVAL_MS:-3000}
bin=$root/target/release/sluice
[[ -x $bin ]] || { echo "build first: make build" >&2; exit 2; }

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

# The unbatched copy: same weights, configs without the dynamic_batching block.
mkdir -p "$work/unbatched"
for m in $models; do
  mkdir -p "$work/unbatched/$m/1"
  ln -s "$root/models/$m/1/model.pt" "$work/unbatched/$m/1/model.pt"
  python3 - "$root/models/$m/config.pbtxt" > "$work/unbatched/$m/config.pbtxt" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
start = text.index("dynamic_batching")
depth, i = 0, text.index("{", start)
while True:
    depth += {"{": 1, "}": -1}.get(text[i], 0)
    i += 1
    if depth == 0:
        break
print(text[:start] + text[i:])
PY
done

start_server() { # name repo port-base
  "$bin" --model-repository "$2" --grpc-port "$3" --http-port $(($3 + 1)) --metrics-port $(($3 + 2)) \
    --log-level warn > "$work/$1.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 300); do
    curl -sf "127.0.0.1:$(($3 + 1))/v2/health/ready" >/dev/null && return 0
    sleep 0.1
  done
  echo "server $1 did not become ready" >&2; cat "$work/$1.log" >&2; exit 1
}
start_server batched "$root/models" 38001
start_server unbatched "$work/unbatched" 38011

run_pa() { # port model concurrency -> "throughput p50 p99 overhead queue compute" (microseconds)
  local csv=$work/pa.csv
  "$pa" -m "$2" -u "127.0.0.1:$1" -i grpc --concurrency-range "$3" \
    --measurement-interval "$interval_ms" --stability-percentage "${STABILITY_PERCENTAGE:-20}" --max-trials 20 -f "$csv" > "$work/pa.out" 2>&1 \
    || { cat "$work/pa.out" >&2; return 1; }
  python3 - "$csv" "$work/pa.out" <<'PY'
import csv, re, sys
row = list(csv.DictReader(open(sys.argv[1])))[-1]
# Server side, from the server's own statistics: its overhead (receipt to answer minus
# queue and compute), queue wait and compute, averaged per request.
m = re.findall(r"overhead (\d+) usec \+ queue (\d+) usec .*? compute infer (\d+) usec", open(sys.argv[2]).read())
overhead, queue, compute = m[-1] if m else ("?", "?", "?")
print(f'{float(row["Inferences/Second"]):.0f} {int(row["p50 latency"])} {int(row["p99 latency"])} {overhead} {queue} {compute}')
PY
}

echo "| model | concurrency | batching | inferences/s | p50 ms | p99 ms | server overhead us | server queue us | compute us |"
echo "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
for m in $models; do
  for c in $concurrencies; do
    for mode in on off; do
      port=38001; [[ $mode == off ]] && port=38011
      read -r tput p50 p99 overhead queue compute < <(run_pa "$port" "$m" "$c")
      printf '| %s | %s | %s | %s | %.2f | %.2f | %s | %s | %s |\n' "$m" "$c" "$mode" "$tput" \
        "$(echo "$p50/1000" | bc -l)" "$(echo "$p99/1000" | bc -l)" "$overhead" "$queue" "$compute"
    done
  done
done
