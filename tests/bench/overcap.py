#!/usr/bin/env python3
"""A cap set above the backend's lock-up point: the operator's guess of 50 in front of an emulated
legacy server with 24 workers x 20 ms that locks up (for 3 s) above 40 requests inside, under more
load than it can serve. sluice with its defaults, sluice with `admission.adaptive = true`, and
HAProxy with `maxconn 50`, each fresh in front of a fresh emulator.

    python3 tests/bench/overcap.py [--seconds 30] [--runs 1] [--out tests/bench/results/overcap.md]

Load: 200 keep-alive terminals in a closed loop (each sends its next transaction when the last
one is answered), 15 s client timeout. Reports the backend's lock-ups, its max concurrency, the
goodput and the failed transactions. Needs haproxy and the release binaries `sluice`,
`legacy-emu` and `terminals`. Standard library only; Linux only.
"""

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (  # noqa: E402
    emu_stats, free_port, haproxy_cfg, start, stop, stop_signal, wait_line, wait_port)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CAP, WORKERS, SERVICE_MS, LOCKUP_ABOVE, TERMINALS = 50, 24, 20, 40, 200


def proxy(kind, work, emu_addr, binary):
    port = free_port()
    if kind.startswith("sluice"):
        conf = os.path.join(work, "sluice.toml")
        adaptive = "[admission]\nadaptive = true\n" if kind == "sluice-adaptive" else ""
        with open(conf, "w") as f:
            f.write(f'[proxy]\nlisten = "127.0.0.1:{port}"\n{adaptive}[admin]\nlisten = "127.0.0.1:{free_port()}"\n'
                    f'[log]\naccess = "off"\n[server]\npid_file = "{work}/sluice.pid"\n'
                    f'upgrade_sock = "{work}/sluice.sock"\n[[backend]]\nname = "legacy"\naddress = "{emu_addr}"\n'
                    f'max_inflight = {CAP}\n')
        p = start([os.path.join(binary, "sluice"), "run", "--config", conf], work, kind)
    else:
        conf = os.path.join(work, "haproxy.cfg")
        with open(conf, "w") as f:
            f.write(haproxy_cfg(
                port, emu_addr, CAP,
                backend_options="    option httpchk GET /\n    http-check expect rstatus ^[234]\n"
                                "    default-server inter 1s fall 3 rise 2\n",
                server_options=" check slowstart 10s"))
        p = start(["haproxy", "-db", "-f", conf], work, kind)
    wait_port(port, p)
    return p, f"127.0.0.1:{port}"


def run(kind, args, run_no):
    work = tempfile.mkdtemp(prefix=f"sluice-overcap-{kind}.")
    procs = []
    try:
        emu = start([os.path.join(args.bin, "legacy-emu"), "--listen", "127.0.0.1:0", "--workers", str(WORKERS),
                     "--service-time", f"{SERVICE_MS}ms", "--lockup-above", str(LOCKUP_ABOVE),
                     "--lockup-duration", "3s"], work, "emu")
        procs.append(emu)
        emu_addr = wait_line(os.path.join(work, "emu.out"), "listening on ", emu)
        p, addr = proxy(kind, work, emu_addr, args.bin)
        procs.append(p)
        load = start([os.path.join(args.bin, "terminals"), "--target", addr, "--terminals", str(TERMINALS),
                      "--duration", f"{args.seconds}s", "--conn-mode", "keep-alive", "--method", "post",
                      "--timeout", "15s", "--json"], work, "load")
        load.wait(timeout=args.seconds + 120)
        stats = emu_stats(emu_addr)
        report = json.load(open(os.path.join(work, "load.out")))
    finally:
        for q in reversed(procs):
            stop(q, stop_signal(q))
    failed = report["sent"] - report["ok"]
    row = {"target": kind, "run": run_no, "lockups": stats["lockups"], "max_inside": stats["max_inside"],
           "ok": report["ok"], "sent": report["sent"], "failed": failed, "goodput": report["goodput"],
           "p99_ms": report["latency_ok"]["p99_ms"], "by_status": report["by_status"]}
    print(f"[overcap] run {run_no} {kind}: lock-ups {row['lockups']}, max inside {row['max_inside']}, "
          f"goodput {row['goodput']:.0f}/s, failed {failed}", file=sys.stderr)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=30)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "overcap.md"))
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release"))
    args = ap.parse_args()
    os.environ["PATH"] = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    kinds = ["sluice", "sluice-adaptive", "haproxy"]
    rows = []
    for r in range(1, args.runs + 1):
        order = kinds if r % 2 else list(reversed(kinds))
        rows += [run(k, args, r) for k in order]
    lines = [
        "# A cap above the lock-up point",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores. Cap {CAP} in front of the "
        f"emulated legacy server with {WORKERS} workers × {SERVICE_MS} ms ({WORKERS * 1000 // SERVICE_MS:,} tx/s), "
        f"which locks up for 3 s above {LOCKUP_ABOVE} requests inside; {TERMINALS} keep-alive terminals in a closed "
        f"loop for {args.seconds} s. HAProxy: `maxconn {CAP}`, an HTTP check every 1 s (fall 3, rise 2) and "
        "`slowstart 10s`.",
        "",
        "| run | target | lock-ups | backend max inside | goodput (ok/s) | failed / sent | p99 ms | statuses |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['run']} | {row['target']} | {row['lockups']} | {row['max_inside']} | "
                     f"{row['goodput']:,.0f} | {row['failed']:,} / {row['sent']:,} | {row['p99_ms']:,.0f} | "
                     f"{row['by_status']} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
