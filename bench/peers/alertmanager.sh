#!/usr/bin/env bash
# Prometheus Alertmanager's ingest, the figure tandem's throughput is held against: POST
# /api/v2/alerts with batches of 1,000 alerts over 10,000 label sets from 4 connections.
# Prints alerts/s accepted (HTTP 200) over the whole run.
# Usage: bench/peers/alertmanager.sh [ALERTS] [BYTES]
#   (needs Alertmanager: apt-get install prometheus-alertmanager)
set -euo pipefail
ALERTS=${1:-1000000}
BYTES=${2:-200}
AM=$(command -v prometheus-alertmanager || command -v alertmanager) || { echo "Alertmanager not found: apt-get install prometheus-alertmanager" >&2; exit 1; }
work=$(mktemp -d)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$work/am.yml" <<CONF
route:
  receiver: none
receivers:
  - name: none
CONF
"$AM" --config.file="$work/am.yml" --storage.path="$work/data" \
  --web.listen-address="127.0.0.1:$port" --cluster.listen-address="" \
  --log.level=warn > "$work/am.log" 2>&1 &
pid=$!

python3 - "$port" "$ALERTS" "$BYTES" <<'PY'
import http.client, json, sys, threading, time
port, total, size = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
BATCH, CONNS, IDS = 1000, 4, 10000
text = ("filesystem /var is 91% full (threshold 90%), growth 1.2 GiB/h; " * 8)[:size]
bodies = [json.dumps([
    {"labels": {"alertname": "DiskFull", "instance": f"host{(b * BATCH + i) % IDS:05}", "severity": "minor"},
     "annotations": {"summary": text}}
    for i in range(BATCH)]).encode() for b in range(IDS // BATCH)]
for _ in range(200):
    try:
        c = http.client.HTTPConnection("127.0.0.1", port); c.request("GET", "/-/ready")
        if c.getresponse().status == 200: break
    except OSError:
        pass
    time.sleep(0.05)
posts = total // BATCH
lock, state = threading.Lock(), {"next": 0, "ok": 0, "bad": 0}
def worker():
    conn = http.client.HTTPConnection("127.0.0.1", port)
    while True:
        with lock:
            n = state["next"]; state["next"] += 1
        if n >= posts: return
        conn.request("POST", "/api/v2/alerts", bodies[n % len(bodies)], {"Content-Type": "application/json"})
        r = conn.getresponse(); r.read()
        with lock:
            state["ok" if r.status == 200 else "bad"] += 1
start = time.monotonic()
threads = [threading.Thread(target=worker) for _ in range(CONNS)]
for t in threads: t.start()
for t in threads: t.join()
took = time.monotonic() - start
n = state["ok"] * BATCH
print(f"alertmanager: {n} of {posts * BATCH} alerts accepted in {took:.2f} s: {n / took:.0f} alerts/s ({state['bad']} posts failed)")
PY
