#!/usr/bin/env bash
# tandem against the tools operators would otherwise use, on this machine, in one run:
#   1. an rsyslog TCP relay moving 1,000,000 lines of 200 bytes (bench/peers/rsyslog-relay.sh)
#   2. Prometheus Alertmanager ingesting 1,000,000 alerts (bench/peers/alertmanager.sh)
#   3. tandem bench through PROXY_P into AGG_P (durable, acknowledged end to end)
#   4. the same with the full pair running (AGG_B, PROXY_B and the gateway replicating)
# Needs rsyslog and prometheus-alertmanager (apt-get install rsyslog prometheus-alertmanager)
# and a release build (cargo build --release). Usage: [ROUNDS=3] bench/compare.sh [EVENTS]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
T=${TANDEM:-$here/../target/release/tandem}
N=${1:-1000000}
work=$(mktemp -d)
pids=()
stop() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; pids=(); }
trap 'stop; rm -rf "$work"' EXIT
settle() { sync; sleep 2; }
# Each component must still be running after its start: one that could not take its port
# (something else listening there) would have the benchmark measure that something else.
alive() { sleep "$1"; for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null || { echo "a component did not start (port taken?); see $work" >&2; exit 1; }; done; }
rate() { python3 -c 'import json,sys; print(round(json.load(sys.stdin)["events_per_s"]))'; }

# Runs alternate (rsyslog, tandem alone, tandem as a pair), ROUNDS times (default 3), so that
# the machine's drift hits them alike; the ratios use the medians.
ROUNDS=${ROUNDS:-3}
median() { python3 -c 'import statistics,sys; print(round(statistics.median(float(x) for x in sys.argv[1:])))' "$@"; }
rs_rates=(); one_rates=(); pair_rates=()
for round in $(seq "$ROUNDS"); do
  settle
  rsyslog=$("$here/peers/rsyslog-relay.sh" "$N" 200 2>/dev/null | tail -1)
  echo "round $round: $rsyslog"
  rs_rates+=("$(echo "$rsyslog" | sed -E 's/.*: ([0-9]+) lines\/s/\1/')")

  settle
  mkdir "$work/primary-$round"
  "$T" store --name AGG_P --data-dir "$work/primary-$round" > "$work/primary-$round/agg_p.log" 2>&1 & pids+=($!)
  "$T" proxy --name PROXY_P --data-dir "$work/primary-$round" > "$work/primary-$round/proxy_p.log" 2>&1 & pids+=($!)
  alive 1
  one=$("$T" bench --data-dir "$work/primary-$round" --events "$N" --identifiers 10000 --probes 4 --json)
  echo "round $round: tandem, PROXY_P -> AGG_P: $one"
  one_rates+=("$(echo "$one" | rate)")
  stop
  # Each round starts from the same state: the rounds before leave no stores (and no page
  # cache of them) behind, as the rsyslog relay leaves none of its files.
  rm -rf "$work/primary-$round"

  settle
  mkdir "$work/pair-$round"
  "$T" up --data-dir "$work/pair-$round" > "$work/pair-$round/up.log" 2>&1 & pids+=($!)
  alive 3
  pair=$("$T" bench --data-dir "$work/pair-$round" --events "$N" --identifiers 10000 --probes 4 --json)
  echo "round $round: tandem, full pair with replication: $pair"
  pair_rates+=("$(echo "$pair" | rate)")
  stop
  rm -rf "$work/pair-$round"
done
settle
am=$("$here/peers/alertmanager.sh" "$N" 200 2>&1 | tail -1) || true
echo "$am"
case $am in *alerts/s*) ;; *) echo "Alertmanager did not run; its ratio is left out" >&2; am="0 alerts/s";; esac
am_rate=$(echo "$am" | sed -E 's/.*[: ]([0-9]+) alerts\/s.*/\1/')

rsyslog_rate=$(median "${rs_rates[@]}")
one_rate=$(median "${one_rates[@]}")
pair_rate=$(median "${pair_rates[@]}")
echo "medians over $ROUNDS rounds:"
python3 - "$rsyslog_rate" "$am_rate" "$one_rate" "$pair_rate" <<'PY'
import sys
rs, am, one, pair = map(float, sys.argv[1:])
print(f"tandem (PROXY_P -> AGG_P) / rsyslog relay     = {one:,.0f} / {rs:,.0f} = {one / rs:.2f}  (target >= 1)")
print(f"tandem (full pair) / tandem (PROXY_P -> AGG_P) = {pair:,.0f} / {one:,.0f} = {pair / one:.2f}  (target >= 0.7)")
if am > 0:
    print(f"tandem (PROXY_P -> AGG_P) / Alertmanager      = {one:,.0f} / {am:,.0f} = {one / am:.1f}  (target >= 10)")
PY
