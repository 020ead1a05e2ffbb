#!/usr/bin/env python3
"""Two proxies, one backend: two sluice instances sharing the cap through Redis leases, against
two HAProxy instances each with `maxconn 32`, in front of the same emulated legacy server (32
workers x 20 ms, locks up above 64 requests inside).

    python3 tests/bench/cluster.py [--seconds 30] [--runs 1] [--out tests/bench/results/cluster.md]

Each target gets a fresh emulator, fresh proxies (and a fresh redis-server for sluice), then a
surge: 2 x 1,000 terminals at once, one connection per transaction, 2 x 1,200 tx/s (1.5 x the
backend's capacity), half through each proxy. Reports the backend's max concurrency, its
lock-ups and the goodput. Needs redis-server and haproxy, and the release binaries `sluice`,
`legacy-emu` and `terminals`. Standard library only; Linux only.
"""

import argparse
import json
import os
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (  # noqa: E402
    emu_reset, emu_stats, free_port, haproxy_cfg, start, stop, stop_signal, wait_line, wait_port)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CAP, WORKERS, SERVICE_MS, LOCKUP_ABOVE = 32, 32, 20, 64
TERMINALS, RATE = 1000, 1200  # per proxy


def sluice_pair(work, emu_addr, binary):
    redis_port = free_port()
    redis = start(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                   "--appendonly", "no"], work, "redis")
    wait_port(redis_port, redis)
    procs, addrs, admins = [redis], [], []
    for name in ("a", "b"):
        port, admin = free_port(), free_port()
        admins.append(f"127.0.0.1:{admin}")
        conf = os.path.join(work, f"sluice-{name}.toml")
        with open(conf, "w") as f:
            f.write(f"""[proxy]
listen = "127.0.0.1:{port}"
request_timeout = "11s"
[admission]
max_inflight = {CAP}
max_queue = 4000
queue_timeout = "10s"
[upstream]
timeout_hold = "1s"
[admin]
listen = "127.0.0.1:{admin}"
[log]
access = "off"
[cluster]
redis = "redis://127.0.0.1:{redis_port}/0"
id = "{name}"
instances = 2
safe_share = 4
lease_ttl = "1s"
[server]
pid_file = "{work}/sluice-{name}.pid"
upgrade_sock = "{work}/sluice-{name}.sock"
[[backend]]
name = "legacy"
address = "{emu_addr}"
""")
        p = start([os.path.join(binary, "sluice"), "run", "--config", conf], work, f"sluice-{name}")
        wait_port(port, p)
        procs.append(p)
        addrs.append(f"127.0.0.1:{port}")
    # A fresh Redis holds no leases, which the lease script cannot tell from Redis having lost
    # them: it grants only safe shares for a learning period (lease TTL + the longest request
    # deadline, about 12 s here). The scenario is a warm cluster: wait it out (bounded).
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        learning = []
        for a in admins:
            with urllib.request.urlopen(f"http://{a}/status", timeout=5) as r:
                st = json.loads(r.read())
            learning += [b.get("learning", True) for b in st.get("cluster", {}).get("backends", [])]
        if learning and not any(learning):
            break
        time.sleep(0.2)
    else:
        raise SystemExit("the cluster's learning period did not end within 90 s")
    return procs, addrs


def haproxy_pair(work, emu_addr):
    procs, addrs = [], []
    for name in ("a", "b"):
        port = free_port()
        conf = os.path.join(work, f"haproxy-{name}.cfg")
        with open(conf, "w") as f:
            f.write(haproxy_cfg(port, emu_addr, CAP))
        p = start(["haproxy", "-db", "-f", conf], work, f"haproxy-{name}")
        wait_port(port, p)
        procs.append(p)
        addrs.append(f"127.0.0.1:{port}")
    return procs, addrs


def run(kind, args, run_no):
    work = tempfile.mkdtemp(prefix=f"sluice-cluster-{kind}.")
    procs = []
    try:
        emu = start([os.path.join(args.bin, "legacy-emu"), "--listen", "127.0.0.1:0", "--workers", str(WORKERS),
                     "--service-time", f"{SERVICE_MS}ms", "--lockup-above", str(LOCKUP_ABOVE),
                     "--lockup-duration", "3s"], work, "emu")
        procs.append(emu)
        emu_addr = wait_line(os.path.join(work, "emu.out"), "listening on ", emu)
        pair, addrs = sluice_pair(work, emu_addr, args.bin) if kind == "sluice" else haproxy_pair(work, emu_addr)
        procs += pair
        # Warm-up: a few requests through each, then a clean slate at the backend.
        for a in addrs:
            urllib.request.urlopen(f"http://{a}/warm", timeout=10).read()
        emu_reset(emu_addr)
        loads = []
        for i, a in enumerate(addrs):
            loads.append(start([os.path.join(args.bin, "terminals"), "--target", a, "--terminals", str(TERMINALS),
                                "--rate", str(RATE), "--duration", f"{args.seconds}s", "--conn-mode",
                                "per-transaction", "--timeout", "15s", "--json"], work, f"load-{i}"))
        for p in loads:
            p.wait(timeout=args.seconds + 120)
        stats = emu_stats(emu_addr)
        reports = [json.load(open(os.path.join(work, f"load-{i}.out"))) for i in range(len(addrs))]
    finally:
        for p in reversed(procs):
            stop(p, stop_signal(p))
    ok = sum(r["ok"] for r in reports)
    sent = sum(r["sent"] for r in reports)
    elapsed = max(r["elapsed_ms"] for r in reports) / 1000
    p99 = max(r["latency_ok"]["p99_ms"] for r in reports)
    row = {"target": kind, "run": run_no, "max_inside": stats["max_inside"], "lockups": stats["lockups"],
           "ok": ok, "sent": sent, "goodput": ok / elapsed, "p99_ms": p99,
           "per_proxy_ok": [r["ok"] for r in reports], "by_status": [r["by_status"] for r in reports]}
    print(f"[cluster] run {run_no} {kind}: max inside {row['max_inside']}, lock-ups {row['lockups']}, "
          f"goodput {row['goodput']:.0f}/s, ok {ok}/{sent}", file=sys.stderr)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=30)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "cluster.md"))
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release"))
    args = ap.parse_args()
    os.environ["PATH"] = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    rows = []
    for r in range(1, args.runs + 1):
        for kind in (("sluice", "haproxy") if r % 2 else ("haproxy", "sluice")):
            rows.append(run(kind, args, r))
    lines = [
        "# Two proxies, one backend",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores. The emulated legacy server "
        f"({WORKERS} workers × {SERVICE_MS} ms = {WORKERS * 1000 // SERVICE_MS:,} tx/s; locks up for 3 s above "
        f"{LOCKUP_ABOVE} inside) behind two proxies: two sluice instances sharing a cap of {CAP} through Redis "
        f"leases (`[cluster]`, 2 instances, safe share 4, lease TTL 1 s; the load starts once the fresh Redis's learning period is over), or two HAProxy instances with "
        f"`maxconn {CAP}` each. A surge of 2 × {TERMINALS:,} terminals at once, one connection per transaction, "
        f"2 × {RATE:,} tx/s for {args.seconds} s, half through each proxy.",
        "",
        "| run | target | backend max inside | lock-ups | goodput (ok/s) | ok / sent | p99 ms (worse proxy) | ok per proxy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['run']} | {row['target']} ×2 | {row['max_inside']} | {row['lockups']} | "
                     f"{row['goodput']:,.0f} | {row['ok']:,} / {row['sent']:,} | {row['p99_ms']:,.0f} | "
                     f"{' / '.join(f'{n:,}' for n in row['per_proxy_ok'])} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
