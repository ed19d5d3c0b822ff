#!/usr/bin/env bash
# A backup catching up after an outage: AGG_P, PROXY_P and the gateway take EVENTS events from
# `tandem bench` while AGG_B is down; then AGG_B starts (empty) and the gateway replays the
# primary's log into it. Prints how long until the gateway reports AGG_B at the primary's LSN
# (AGG_B's start included, polled every 0.1 s) and the bytes the gateway wrote meanwhile,
# nearly all of them to AGG_B (`wchar` in /proc/PID/io): what the catch-up moves over the link
# between the sites.
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
status() { # status PYTHON-EXPRESSION: evaluated over `tandem status --json` as `s`; 0 if unknown
  "$T" status --data-dir "$d" --json 2>/dev/null | python3 -c "
import json, sys
try:
    s = json.load(sys.stdin)
    print(int($1))
except Exception:
    print(0)" 2>/dev/null || echo 0
}
head=$(status 'next(x["lsn"] for x in s["stores"] if x["name"] == "AGG_P")')
[ "$head" -gt 0 ] || { echo "cannot read AGG_P's LSN from tandem status" >&2; exit 1; }
# The primary's LSN the backup has applied, as the gateway reports it.
applied='max([d["cursor"] for g in s["gateways"] for d in (g.get("directions") or []) if d["from"] == "AGG_P" and d["to"] == "AGG_B"] or [0])'
written() { awk '/^wchar/{print $2}' "/proc/${pid[GW]}/io"; }
before=$(written)
began=$(date +%s.%N)
start store AGG_B
sleep 0.2
kill -0 "${pid[AGG_B]}" 2>/dev/null || { echo "AGG_B did not start (port taken?):" >&2; cat "$d/AGG_B.log" >&2; exit 1; }
deadline=$((SECONDS + 120))
cursor=0
while [ "$SECONDS" -lt "$deadline" ]; do
  cursor=$(status "$applied")
  [ "$cursor" -ge "$head" ] && break
  sleep 0.1
done
ended=$(date +%s.%N)
[ "$cursor" -ge "$head" ] || { echo "AGG_B had applied AGG_P's log up to $cursor of $head after 2 minutes" >&2; exit 1; }
python3 -c 'import sys; b, e, w, n = map(float, sys.argv[1:]); print(f"AGG_B caught up on {n:,.0f} log entries in {e - b:.2f} s; the gateway wrote {w / 1e6:,.0f} MB")' \
  "$began" "$ended" "$(( $(written) - before ))" "$head"
