#!/usr/bin/env bash
# A backup catching up after an outage: AGG_P, PROXY_P and the gateway take EVENTS events from
# `tandem bench` while AGG_B is down; then AGG_B starts (empty) and the gateway replays the
# primary's log into it. Prints how long until AGG_B's LSN reaches the primary's (its start
# included, polled every 0.1 s) and the bytes the gateway wrote meanwhile, nearly all of them
# to AGG_B (`wchar` in /proc/PID/io): what the catch-up moves over the link between the sites.
# Usage: bench/catch-up.sh [EVENTS]   (after cargo build --release)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
T=${TANDEM:-$here/../target/release/tandem}
events=${1:-1000000}
d=$(mktemp -d)
declare -A pid
trap 'kill "${pid[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$d"' EXIT
start() { # start KIND NAME
  "$T" "$1" --name "$2" --data-dir "$d" > "$d/$2.log" 2>&1 &
  pid[$2]=$!
}
start store AGG_P; start proxy PROXY_P; start gateway GW
sleep 2
for name in "${!pid[@]}"; do
  kill -0 "${pid[$name]}" 2>/dev/null || { echo "$name did not start (port taken?):" >&2; cat "$d/$name.log" >&2; exit 1; }
done
"$T" bench --data-dir "$d" --events "$events" --identifiers 10000 --probes 4 --json > "$d/bench.json"
lsn_of() { # lsn_of STORE: its LSN as `tandem status` reports it (0 while it is down)
  "$T" status --data-dir "$d" --json 2>/dev/null | python3 -c '
import json, sys
stores = json.load(sys.stdin)["stores"]
print(next((s.get("lsn") or 0 for s in stores if s["name"] == sys.argv[1]), 0))' "$1" || echo 0
}
head=$(lsn_of AGG_P)
written() { awk '/^wchar/{print $2}' "/proc/${pid[GW]}/io"; }
before=$(written)
began=$(date +%s.%N)
start store AGG_B
lsn=0
for _ in $(seq 1200); do
  lsn=$(lsn_of AGG_B)
  [ "$lsn" -ge "$head" ] && break
  sleep 0.1
done
ended=$(date +%s.%N)
[ "$lsn" -ge "$head" ] || { echo "AGG_B reached LSN $lsn of $head within 2 minutes" >&2; exit 1; }
python3 -c 'import sys; b, e, w, n = map(float, sys.argv[1:]); print(f"AGG_B caught up on {n:,.0f} log entries in {e - b:.2f} s; the gateway wrote {w / 1e6:,.0f} MB")' \
  "$began" "$ended" "$(( $(written) - before ))" "$head"
