#!/usr/bin/env bash
# Whether a store keeps its rate once its log is past log_retention_entries (2,000,000 by
# default): RUNS runs of `tandem bench --events 1000000 --identifiers 10000 --probes 4` in a row
# into the same PROXY_P -> AGG_P (or, with `pair`, the same `tandem up`), printing each run's
# events/s, the stores' resident memory and the size of their log on disk.
# Usage: [RUNS=7] bench/long-run.sh [single|pair]   (after cargo build --release)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
T=${TANDEM:-$here/../target/release/tandem}
mode=${1:-single}
runs=${RUNS:-7}
d=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$d"' EXIT
case $mode in
  single)
    # No gateway reports how far a peer has applied the log, so a lone store would keep it up
    # to log_max_entries: hold nothing for the peer, so that the log is trimmed at retention.
    sed 's/^data_dir = "agg_p".*/&\nlog_max_entries = 2000000/' "$here/../fixtures/pair.toml" > "$d/pair.toml"
    config=(--config "$d/pair.toml")
    "$T" "${config[@]}" store --name AGG_P --data-dir "$d" > "$d/agg_p.log" 2>&1 & pids+=($!)
    "$T" "${config[@]}" proxy --name PROXY_P --data-dir "$d" > "$d/proxy_p.log" 2>&1 & pids+=($!)
    sleep 1 ;;
  pair)
    config=()
    "$T" up --data-dir "$d" > "$d/up.log" 2>&1 & pids+=($!)
    sleep 3 ;;
  *) echo "usage: bench/long-run.sh [single|pair]" >&2; exit 2 ;;
esac
for p in "${pids[@]}"; do
  kill -0 "$p" 2>/dev/null || { echo "a component did not start (port taken?); see $d" >&2; exit 1; }
done
stores=$(pgrep -f -- "store --name .* --data-dir $d" || true)
for run in $(seq "$runs"); do
  rate=$("$T" "${config[@]}" bench --data-dir "$d" --events 1000000 --identifiers 10000 --probes 4 --json |
    python3 -c 'import json,sys; print(round(json.load(sys.stdin)["events_per_s"]))')
  rss=$(for p in $stores; do awk '/VmRSS/ {printf "%d MiB ", $2 / 1024}' "/proc/$p/status"; done)
  # The log keyspace's directory is the one with the most bytes.
  logs=$(for s in "$d"/*/keyspaces; do du -sm "$s"/* | sort -n | tail -1 | cut -f1; done | tr '\n' ' ')
  echo "run $run: $rate events/s; stores resident: ${rss}; largest keyspace: ${logs}MB"
done
