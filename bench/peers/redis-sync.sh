#!/usr/bin/env bash
# A Redis replica's full sync, the figure tandem's full resync is held against: a master holding
# ALERTS hashes shaped like the resync bench's alerts (keyed by identifier; node, alert key and
# group, manager, summary, severity, tally, times, inserting store), a fresh replica told
# `REPLICAOF`, timed until it reports the link up with no sync in progress and holds every key.
# Redis's defaults (diskless sync from the master, the replica loading through its disk), but
# no persistence of their own and no 5 s wait for more replicas before the master's transfer
# starts (`repl-diskless-sync-delay 0`), which would only measure the wait.
# SUMMARY is the summary's length in bytes: the default is the resync bench's (76). At 64 or
# less Redis keeps each hash in its compact encoding (a listpack, a third of the memory), which
# is the kind of hash the "4-5 s for 1,000,000 hashes" reference figure was measured with.
# Prints "redis full sync: N hashes in S s (R hashes/s)".
# Usage: bench/peers/redis-sync.sh [ALERTS] [SUMMARY]   (needs Redis: apt-get install redis-server)
set -euo pipefail
ALERTS=${1:-1000000}
SUMMARY=${2:-76}
command -v redis-server > /dev/null || { echo "Redis not found: apt-get install redis-server" >&2; exit 1; }
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
start() { # name port
  mkdir "$work/$1"
  redis-server --bind 127.0.0.1 --port "$2" --dir "$work/$1" --save "" --appendonly no \
    --protected-mode no --repl-diskless-sync-delay 0 > "$work/$1/log" 2>&1 &
  pids+=($!)
  for _ in $(seq 200); do redis-cli -p "$2" ping > /dev/null 2>&1 && return; sleep 0.05; done
  echo "redis-server on port $2 did not start; see $work/$1/log" >&2; exit 1
}
master=$(free_port); start master "$master"
replica=$(free_port); start replica "$replica"

python3 - "$ALERTS" "$SUMMARY" <<'PY' | redis-cli -p "$master" --pipe > "$work/load.log"
import sys
out = sys.stdout.buffer
def command(*args):
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a.encode() if isinstance(a, str) else a
        parts.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(parts)
buf = []
size = int(sys.argv[2])
for i in range(int(sys.argv[1])):
    host = f"host{i:07}"
    summary = (f"filesystem /var on {host} is 91% full (threshold 90%), growth 1.2 GiB/h " * 4)[:size]
    buf.append(command("HSET", f"{host}:disk:/var", "node", host, "alert_key", "/var",
        "alert_group", "disk", "manager", "bench",
        "summary", summary,
        "severity", "3", "tally", "1", "first_occurrence", str(1_700_000_000_000 + i),
        "last_occurrence", str(1_700_000_000_000 + i), "server_name", "AGG_P",
        "server_serial", str(i + 1)))
    if len(buf) == 10000:
        out.write(b"".join(buf)); buf.clear()
out.write(b"".join(buf))
PY
keys=$(redis-cli -p "$master" dbsize)
[ "$keys" = "$ALERTS" ] || { echo "the master holds $keys keys, not $ALERTS" >&2; exit 1; }

python3 - "$master" "$replica" "$ALERTS" <<'PY'
import socket, sys, time
master, replica, want = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
s = socket.create_connection(("127.0.0.1", replica))
f = s.makefile("rb")
def call(*args):
    s.sendall(b"".join([b"*%d\r\n" % len(args)] + [b"$%d\r\n%s\r\n" % (len(a), a.encode()) for a in args]))
    line = f.readline()
    if line[:1] in (b"-", b""):
        sys.exit(f"the replica answered {args[0]} with {line.decode().strip() or 'nothing (closed)'}")
    if line[:1] == b"$":
        n = int(line[1:])
        return f.read(n + 2)[:-2].decode()
    return line[1:].strip().decode()
start = time.monotonic()
call("REPLICAOF", "127.0.0.1", str(master))
deadline = start + 600
while time.monotonic() < deadline:
    info = call("INFO", "replication")
    if "master_link_status:up" in info and "master_sync_in_progress:0" in info and int(call("DBSIZE")) == want:
        took = time.monotonic() - start
        print(f"redis full sync: {want} hashes in {took:.2f} s ({want / took:.0f} hashes/s)")
        sys.exit(0)
    time.sleep(0.005)
sys.exit("the replica did not finish its sync within 600 s")
PY
