#!/usr/bin/env bash
# Where the CPU goes: each process's CPU seconds (user + system, from /proc/PID/stat) over one
# `tandem bench --events EVENTS --identifiers 10000 --probes 4` run, for PROXY_P -> AGG_P alone
# and for the full pair, each component its own process. The stores' and the gateway's figures
# also count the 4 s after the run (what replication had left to do). Runs alternate ROUNDS times.
# Usage: [ROUNDS=3] bench/cpu.sh [EVENTS]   (after cargo build --release)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
T=${TANDEM:-$here/../target/release/tandem}
N=${1:-1000000}
ROUNDS=${ROUNDS:-3}
work=$(mktemp -d)
declare -A pid
stop() { for p in "${pid[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; pid=(); }
trap 'stop; rm -rf "$work"' EXIT
ticks=$(getconf CLK_TCK)
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
start() { # start DIR NAME...: each named component, then check that all took their ports
  local d=$1; shift
  for name in "$@"; do
    case $name in AGG_*) kind=store;; PROXY_*) kind=proxy;; *) kind=gateway;; esac
    "$T" "$kind" --name "$name" --data-dir "$d" > "$d/$name.log" 2>&1 &
    pid[$name]=$!
  done
  sleep 2
  for name in "$@"; do
    kill -0 "${pid[$name]}" 2>/dev/null || { echo "$name did not start (port taken?):" >&2; cat "$d/$name.log" >&2; exit 1; }
  done
}
measure() { # measure LABEL DIR NAME...
  local label=$1 d=$2; shift 2
  start "$d" "$@"
  declare -A before
  for name in "$@"; do before[$name]=$(cpu "${pid[$name]}"); done
  local out="$d/bench.json" times="$d/bench.time"
  /usr/bin/time -f "%U %S" -o "$times" "$T" bench --data-dir "$d" --events "$N" \
    --identifiers 10000 --probes 4 --json > "$out"
  sleep 4
  local line
  line=$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1]))["events_per_s"]; print(f"{r:,.0f} events/s")' "$out")
  local total=0
  for name in "$@"; do
    local used=$(( $(cpu "${pid[$name]}") - ${before[$name]} ))
    total=$(( total + used ))
    line+=$(awk -v n="$name" -v u="$used" -v t="$ticks" 'BEGIN{printf "  %s %.2f", n, u / t}')
  done
  read -r user sys < "$times"
  line+=$(awk -v a="$user" -v b="$sys" -v u="$total" -v t="$ticks" 'BEGIN{printf "  bench %.2f  all %.2f CPU-s", a + b, u / t + a + b}')
  echo "$label: $line"
  stop
  rm -rf "$d"
}
for round in $(seq "$ROUNDS"); do
  sync; sleep 2
  mkdir "$work/one-$round"
  measure "round $round, PROXY_P -> AGG_P" "$work/one-$round" AGG_P PROXY_P
  sync; sleep 2
  mkdir "$work/pair-$round"
  measure "round $round, full pair" "$work/pair-$round" AGG_P AGG_B PROXY_P PROXY_B GW
done
