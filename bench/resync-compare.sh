#!/usr/bin/env bash
# tandem's full resync against a Redis replica's full sync, on this machine, in one run:
#   1. tandem: 1,000,000 alerts from a store whose log was trimmed into an empty store
#      (`cargo bench -p tandem-gateway --bench resync`, TANDEM_BENCH_ONLY=full)
#   2. Redis: 1,000,000 hashes of the same fields into a fresh replica (bench/peers/redis-sync.sh)
#   3. Redis: 1,000,000 compact hashes (a summary of 60 bytes, so that Redis keeps them as
#      listpacks), the kind the reference figure was measured with
# Runs alternate ROUNDS times (default 3), so that the machine's drift hits them alike; the
# ratios use the medians. Needs redis-server (apt-get install redis-server).
# Usage: [ROUNDS=3] bench/resync-compare.sh [ALERTS]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/.."
N=${1:-1000000}
ROUNDS=${ROUNDS:-3}
cargo bench -q -p tandem-gateway --bench resync --no-run
log=$(mktemp)
trap 'rm -f "$log"' EXIT
secs() { sed -E 's/.* in ([0-9.]+) s.*/\1/'; }
median() { python3 -c 'import statistics,sys; print(statistics.median(float(x) for x in sys.argv[1:]))' "$@"; }
tandem=(); redis=(); compact=()
for round in $(seq "$ROUNDS"); do
  sync; sleep 2
  t=$(TANDEM_BENCH_ONLY=full TANDEM_BENCH_ALERTS=$N cargo bench -q -p tandem-gateway --bench resync 2> "$log" | grep "full resync:") ||
    { echo "tandem's resync bench gave no figure; its output:" >&2; cat "$log" >&2; exit 1; }
  echo "round $round: tandem $t"
  tandem+=("$(echo "$t" | secs)")
  sync; sleep 2
  r=$("$here/peers/redis-sync.sh" "$N")
  echo "round $round: $r (bench alert's fields)"
  redis+=("$(echo "$r" | secs)")
  sync; sleep 2
  c=$("$here/peers/redis-sync.sh" "$N" 60)
  echo "round $round: $c (compact hashes)"
  compact+=("$(echo "$c" | secs)")
done
echo "medians over $ROUNDS rounds:"
python3 - "$(median "${tandem[@]}")" "$(median "${redis[@]}")" "$(median "${compact[@]}")" <<'PY'
import sys
t, r, c = map(float, sys.argv[1:])
print(f"tandem full resync {t:.2f} s; Redis full sync {r:.2f} s (same fields), {c:.2f} s (compact hashes)")
print(f"Redis (same fields) / tandem = {r / t:.1f}x; Redis (compact) / tandem = {c / t:.1f}x  (target: tandem <= 2 s where compact Redis took 4-5 s)")
PY
