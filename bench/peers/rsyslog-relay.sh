#!/usr/bin/env bash
# An rsyslog TCP relay, the figure tandem's end-to-end throughput is held against:
# loader -> imtcp (relay) -> omfwd TCP -> imtcp (sink) -> omfile, default queues, plain TCP.
# Prints lines/s from the first byte sent to the last line written by the sink.
# Usage: bench/peers/rsyslog-relay.sh [LINES] [BYTES]   (needs rsyslogd: apt-get install rsyslog)
set -euo pipefail
LINES=${1:-1000000}
BYTES=${2:-200}
RSYSLOGD=$(command -v rsyslogd || echo /usr/sbin/rsyslogd)
[ -x "$RSYSLOGD" ] || { echo "rsyslogd not found: apt-get install rsyslog" >&2; exit 1; }
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
relay_port=$(port); sink_port=$(port)

cat > "$work/sink.conf" <<CONF
global(workDirectory="$work")
module(load="imtcp")
input(type="imtcp" port="$sink_port" address="127.0.0.1")
template(name="raw" type="string" string="%rawmsg%\n")
action(type="omfile" file="$work/out.log" template="raw")
CONF
cat > "$work/relay.conf" <<CONF
global(workDirectory="$work")
module(load="imtcp")
input(type="imtcp" port="$relay_port" address="127.0.0.1")
template(name="fwd" type="string" string="%rawmsg%\n")
action(type="omfwd" target="127.0.0.1" port="$sink_port" protocol="tcp" template="fwd")
CONF
"$RSYSLOGD" -n -f "$work/sink.conf" -i "$work/sink.pid" -C & pids+=($!)
"$RSYSLOGD" -n -f "$work/relay.conf" -i "$work/relay.pid" -C & pids+=($!)

python3 - "$relay_port" "$work/out.log" "$LINES" "$BYTES" <<'PY'
import os, socket, sys, time
port, out, lines, size = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
def line(i):
    head = f"<131>Nov 23 12:00:00 host{i % 10000:05} probe: alert {i} "
    return (head + "x" * max(0, size - len(head))).encode()[:size] + b"\n"
data = b"".join(line(i) for i in range(lines))
for _ in range(100):
    try:
        s = socket.create_connection(("127.0.0.1", port)); break
    except OSError:
        time.sleep(0.05)
else:
    sys.exit(f"the rsyslog relay never listened on 127.0.0.1:{port}")
start = time.monotonic()
s.sendall(data)
s.shutdown(socket.SHUT_WR)
deadline = start + 300
while time.monotonic() < deadline:
    try:
        if os.path.getsize(out) >= len(data):
            break
    except FileNotFoundError:
        pass
    time.sleep(0.01)
took = time.monotonic() - start
n = os.path.getsize(out) // (size + 1) if os.path.exists(out) else 0
print(f"rsyslog relay: {n} of {lines} lines of {size} bytes in {took:.2f} s: {n / took:.0f} lines/s")
PY
