#!/usr/bin/env python3
"""Poll a proxy's view of its backend during a run, as JSON lines.

    proxy_probe.py sluice ADMIN_ADDR OUT.jsonl [--interval 0.25]
    proxy_probe.py haproxy STATS_SOCKET OUT.jsonl [--interval 0.25]
    proxy_probe.py sluice ADMIN_ADDR OUT --once      # one snapshot of the counters, JSON on stdout

sluice: GET /status on the admin listener (backend state, health, effective limit, in flight,
queue). haproxy: `show stat` on the stats socket (server status, current sessions, queue, and
counters). Each line: {"epoch_ms": ..., ...}; a failed poll is written as {"epoch_ms", "error"}.
Runs until SIGTERM/SIGINT. With --once: sluice's /metrics (request outcomes) or HAProxy's
`show stat` rows, for the report. Standard library only.
"""

import json
import signal
import socket
import sys
import time
import urllib.request

HAPROXY_FIELDS = ["qcur", "qmax", "scur", "smax", "slim", "stot", "econ", "eresp", "wretr",
                  "wredis", "status", "weight", "chkfail", "chkdown", "lastchg", "downtime",
                  "hrsp_2xx", "hrsp_5xx", "cli_abrt", "srv_abrt", "check_status", "throttle"]


def haproxy_cmd(sock_path, cmd):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    s.connect(sock_path)
    s.sendall(cmd.encode() + b"\n")
    chunks = []
    while True:
        b = s.recv(65536)
        if not b:
            break
        chunks.append(b)
    s.close()
    return b"".join(chunks).decode()


def haproxy_rows(sock_path):
    text = haproxy_cmd(sock_path, "show stat")
    lines = [l for l in text.splitlines() if l.strip()]
    head = lines[0].lstrip("# ").split(",")
    rows = {}
    for l in lines[1:]:
        r = dict(zip(head, l.split(",")))
        if r.get("pxname") == "legacy":
            rows[r["svname"]] = r
    return rows


def sluice_get(addr, path):
    with urllib.request.urlopen(f"http://{addr}{path}", timeout=2) as r:
        return r.read().decode()


def poll(kind, where):
    if kind == "sluice":
        st = json.loads(sluice_get(where, "/status"))
        b = st["backends"][0]
        return {"state": b["state"], "healthy": b["healthy"], "limit": b["effective_limit"],
                "inflight": b["inflight"], "ramp": b["ramp"], "queued": st["queued"]}
    rows = haproxy_rows(where)
    srv, be = rows.get("legacy", {}), rows.get("BACKEND", {})
    return {"state": srv.get("status"), "inflight": int(srv.get("scur") or 0),
            "queued": int(srv.get("qcur") or 0) + int(be.get("qcur") or 0),
            "limit": (srv.get("slim") or "") + (f" throttled to {srv['throttle']} %" if srv.get("throttle") else ""),
            "check": srv.get("check_status")}


def once(kind, where):
    if kind == "sluice":
        out = {}
        for line in sluice_get(where, "/metrics").splitlines():
            if line.startswith("sluice_requests_total{") or \
                    line.startswith("sluice_upstream_connections_total{"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return {"metrics": out}
    rows = haproxy_rows(where)
    return {name: {k: r.get(k) for k in HAPROXY_FIELDS} for name, r in rows.items()}


def main():
    kind, where, out = sys.argv[1:4]
    args = sys.argv[4:]
    if "--once" in args:
        print(json.dumps(once(kind, where)))
        return
    interval = float(args[args.index("--interval") + 1]) if "--interval" in args else 0.25
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    with open(out, "w") as f:
        nxt = time.monotonic()
        while not stop:
            t = time.time() * 1000.0
            try:
                rec = poll(kind, where)
            except Exception as e:  # a failed poll is data too (e.g. proxy busy)
                rec = {"error": str(e)[:200]}
            rec["epoch_ms"] = round(t, 1)
            f.write(json.dumps(rec) + "\n")
            f.flush()
            nxt += interval
            time.sleep(max(0.0, nxt - time.monotonic()))


if __name__ == "__main__":
    main()
