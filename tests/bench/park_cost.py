#!/usr/bin/env python3
"""CPU per request through sluice for kept-alive terminals that pause between transactions.

A terminal that waits longer than sluice's park delay between two transactions has its
connection parked (pingora's stream given up, the bare socket kept) and unparked again for the
next one. This measures what that costs: `terminals` keeps N connections alive and offers
N / think transactions per second in total through sluice to a fresh `legacy-emu` (256 workers,
20 ms, far from its capacity), and the proxy's CPU time (user + system, /proc) is divided by the
transactions answered. Several sluice binaries are compared in the same run, alternating run by
run, so that a change of the park delay is measured before and after on the same machine state.

    python3 tests/bench/park_cost.py --sluice target/release/sluice --sluice /tmp/before/sluice

Prints one line per run and binary and a summary (medians) as Markdown. Standard library only.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import free_port, start, stop, stop_signal, tree_cpu_seconds, wait_line, wait_port  # noqa: E402


def one_run(sluice_bin, args, work, run):
    emu = start([args.emu, "--listen", "127.0.0.1:0"], work, f"emu-{run}")
    proxy = None
    try:
        emu_addr = wait_line(os.path.join(work, f"emu-{run}.out"), "listening on ", emu)
        port = free_port()
        config = os.path.join(work, "sluice.toml")
        with open(config, "w") as f:
            f.write(f'[proxy]\nlisten = "127.0.0.1:{port}"\n\n[log]\naccess = "off"\n\n'
                    f'[[backend]]\nname = "legacy"\naddress = "{emu_addr}"\n')
        proxy = start([sluice_bin, "run", "--config", config, "--max-inflight", "64",
                       "--threads", "2"], work, f"sluice-{run}")
        wait_port(port, proxy)
        before = tree_cpu_seconds(proxy.pid)
        rate = args.terminals / args.think
        load = subprocess.run(
            [args.load, "--target", f"127.0.0.1:{port}", "--terminals", str(args.terminals),
             "--conn-mode", "keep-alive", "--http", "1.1", "--rate", f"{rate:.0f}",
             "--ramp", f"{args.think}s", "--duration", f"{args.seconds}s", "--json"],
            capture_output=True, text=True, timeout=args.seconds + 120, check=True)
        after = tree_cpu_seconds(proxy.pid)
        report = json.loads(load.stdout)
        ok = report["ok"]
        return {"ok": ok, "sent": report["sent"], "cpu_s": after - before,
                "us_per_req": (after - before) / max(ok, 1) * 1e6}
    finally:
        for p in (proxy, emu):
            if p is not None:
                stop(p, stop_signal(p))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sluice", action="append", required=True,
                    help="a sluice binary (repeat to compare several)")
    ap.add_argument("--emu", default="target/release/legacy-emu")
    ap.add_argument("--load", default="target/release/terminals")
    ap.add_argument("--terminals", type=int, default=400)
    ap.add_argument("--think", type=float, default=0.3,
                    help="seconds between a terminal's transactions (offered rate = N / think)")
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    results = {b: [] for b in args.sluice}
    with tempfile.TemporaryDirectory(prefix="sluice-park-cost-") as work:
        for run in range(args.runs):
            order = args.sluice if run % 2 == 0 else list(reversed(args.sluice))
            for i, b in enumerate(order):
                r = one_run(b, args, work, f"{run}-{i}")
                results[b].append(r)
                print(f"run {run + 1} {b}: {r['ok']}/{r['sent']} ok, CPU {r['cpu_s']:.2f} s, "
                      f"{r['us_per_req']:.1f} µs per request", file=sys.stderr)
    print(f"{args.terminals} kept-alive terminals, one transaction every {args.think} s each, "
          f"{args.seconds} s per run, {args.runs} runs; load average at the end: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print("| sluice binary | µs CPU per request, median (per run) | answered |")
    print("|---|---|---|")
    for b, rs in results.items():
        per = ", ".join(f"{r['us_per_req']:.1f}" for r in rs)
        ok = sum(r["ok"] for r in rs)
        sent = sum(r["sent"] for r in rs)
        print(f"| `{b}` | {statistics.median(r['us_per_req'] for r in rs):.1f} ({per}) "
              f"| {ok:,} of {sent:,} |")


if __name__ == "__main__":
    main()
