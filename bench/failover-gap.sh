#!/usr/bin/env bash
# The longest wait for an acknowledgement when a member dies under load: the full pair, each
# component its own process; `tandem bench` at RATE events/s; VICTIM (PROXY_P or AGG_P) SIGKILLed
# 4 s in. Prints the benchmark's JSON (max_ack_gap_ms is the figure). With `none`, nothing is
# killed: the longest wait the pair has anyway at that rate, the baseline a failover adds to.
# Usage: bench/failover-gap.sh PROXY_P|AGG_P|none [RATE] [EVENTS]   (after cargo build --release)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
T=${TANDEM:-$here/../target/release/tandem}
victim=${1:?usage: bench/failover-gap.sh PROXY_P|AGG_P|none [RATE] [EVENTS]}
rate=${2:-100000}
events=${3:-1000000}
d=$(mktemp -d)
declare -A pid
trap 'kill -9 "${pid[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$d"' EXIT
for c in "store AGG_P" "store AGG_B" "proxy PROXY_P" "proxy PROXY_B" "gateway GW"; do
  read -r kind name <<< "$c"
  "$T" "$kind" --name "$name" --data-dir "$d" > "$d/$name.log" 2>&1 &
  pid[$name]=$!
done
sleep 2
for name in "${!pid[@]}"; do
  kill -0 "${pid[$name]}" 2>/dev/null || { echo "$name did not start (port taken?):" >&2; cat "$d/$name.log" >&2; exit 1; }
done
"$T" bench --data-dir "$d" --events "$events" --identifiers 10000 --probes 4 \
  --rate "$rate" --json > "$d/bench.json" &
bench=$!
sleep 4
[ "$victim" = none ] || kill -9 "${pid[$victim]}"
wait "$bench"
cat "$d/bench.json"
