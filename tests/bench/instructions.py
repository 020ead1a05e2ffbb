#!/usr/bin/env python3
"""User-space instructions per request, under callgrind: a cost that machine noise cannot move.

    python3 tests/bench/instructions.py [--targets "bare-pingora sluice-quiet sluice"]
                                        [--seconds 10] [--connections 16] [--top 25]
                                        [--bin target/release] [--baseline DIR]
                                        [--out tests/bench/results/instructions.md]

`throughput.py` measures what counts (requests/s and CPU per request, side by side), but on a
shared 2-core machine its runs spread by ±10 %: a change worth 3 % does not show. Here each
target runs under valgrind's callgrind (the same configs as `throughput.py`, the same nginx
"hello" backend, `wrk -t1 -cN` for a fixed time after a 5 s warm-up with instrumentation off);
the instructions its process executed while the measured load ran, divided by the requests
completed, are repeatable to about 1 %. Reported per target: instructions per request, the
ratio to bare pingora, and the functions that cost most above bare pingora's (self cost per
request, by symbol).

What it cannot see: the kernel (system calls, context switches, page cache), cache misses,
lock contention between threads. valgrind runs one thread at a time, and about 50 times slower,
so latency-driven behaviour differs from a real run: compare a build with the build before it, not
with wall-clock figures. In particular the default latency-driven slow-start ramp, fed latencies 50
times too long and noisy, stops growing at a few requests, and most requests would then wait in
the queue, which they never do in a real run of the same config (measured: 194,339 requests,
all admitted at the full limit of 32, 98 of them queued longer than 50 µs). So the `sluice`
targets here ramp by the clock over 1 s, done before the warm-up ends: what is measured is the
default config's steady state, as `throughput.py` sees it.

Needs valgrind, wrk and nginx (Debian: valgrind wrk nginx-light) and the release binaries
(`cargo build --release --locked -p sluice --bin sluice --example bare_pingora`).
"""

import argparse
import collections
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import stop  # noqa: E402
import throughput  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def self_costs(dump):
    """Self instructions by function, from a callgrind dump."""
    out = subprocess.run(
        ["callgrind_annotate", "--threshold=100", "--inclusive=no", "--tree=none", "--auto=no", dump],
        capture_output=True, text=True, check=True).stdout
    costs = collections.Counter()
    for line in out.splitlines():
        m = re.match(r"\s*([\d,]+) \([^)]*\)\s+(.*?):(.*?)( \[.*\])?$", line)
        if m and "PROGRAM TOTALS" not in line:
            costs[re.sub(r" \([\d,]+x\)$", "", m.group(3))] += int(m.group(1).replace(",", ""))
    return costs


def measure(kind, work, backend, args, label):
    dump = os.path.join(work, f"{label}.callgrind")
    prefix = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={dump}", "--instr-atstart=no",
              "--dump-instr=no"]
    ramp = "" if kind == "sluice-quiet" else '\n[slow_start]\nmode = "clock"\nduration = "1s"\n'
    proc, addr = throughput.start_target(kind, work, backend, args.bin, 0, args.baseline, prefix=prefix,
                                         ready_timeout=120.0, sluice_extra=ramp)
    try:
        throughput.wrk(addr, 5, args.connections)  # warm-up, uninstrumented
        subprocess.run(["callgrind_control", "--instr=on", str(proc.pid)], capture_output=True, check=True)
        r = throughput.wrk(addr, args.seconds, args.connections)
        subprocess.run(["callgrind_control", "--instr=off", str(proc.pid)], capture_output=True, check=True)
        subprocess.run(["callgrind_control", "--dump", str(proc.pid)], capture_output=True, check=True)
    finally:
        # Both targets are pingora servers: SIGINT stops them at once (valgrind passes it on).
        stop(proc, signal.SIGINT)
    dumps = sorted(f for f in os.listdir(work) if f.startswith(f"{label}.callgrind."))
    if not dumps:
        raise SystemExit(f"{label}: callgrind wrote no dump")
    costs = self_costs(os.path.join(work, dumps[-1]))
    ok = r["requests"] - r["non2xx"]
    print(f"[instructions] {label}: {ok} requests, {sum(costs.values()) / max(1, ok):,.0f} instructions each",
          file=sys.stderr)
    return {"target": label, "requests": ok, "costs": costs}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="bare-pingora sluice-quiet sluice")
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release"))
    ap.add_argument("--baseline", default=None, help="an earlier build's directory, for the sluice-baseline target")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "instructions.md"))
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="sluice-instr-")
    backend_proc, backend = throughput.start_backend(work)
    rows = []
    try:
        for kind in args.targets.split():
            rows.append(measure(kind, work, backend, args, kind))
    finally:
        stop(backend_proc)
    per = {r["target"]: {f: c / max(1, r["requests"]) for f, c in r["costs"].items()} for r in rows}
    total = {t: sum(c.values()) for t, c in per.items()}
    ref = "bare-pingora" if "bare-pingora" in per else rows[0]["target"]
    lines = [
        "# Instructions per request (callgrind)",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: `python3 tests/bench/instructions.py "
        f"--targets \"{args.targets}\" --seconds {args.seconds} --connections {args.connections}`. User-space "
        f"instructions each target's process executed during {args.seconds} s of `wrk -t1 -c{args.connections}` "
        "under callgrind (after a 5 s uninstrumented warm-up), over the requests completed. Configs as in "
        "`throughput.py`, except that the slow-start ramp goes by the clock over 1 s (see the module's doc). "
        "The kernel's share is not counted.",
        "",
        f"| target | requests | instructions per request | × {ref} |",
        "|---|---|---|---|",
    ]
    for r in rows:
        t = r["target"]
        lines.append(f"| {t} | {r['requests']:,} | {total[t]:,.0f} | {total[t] / total[ref]:.2f} |")
    for t in per:
        if t == ref:
            continue
        diff = sorted(((per[t].get(f, 0) - per[ref].get(f, 0), f) for f in set(per[t]) | set(per[ref])),
                      reverse=True)
        lines += ["", f"Where {t} spends more than {ref} (self instructions per request, top {args.top}):", "",
                  f"| more | {ref} | {t} | function |", "|---|---|---|---|"]
        for d, f in diff[:args.top]:
            name = f.replace("|", "\\|")
            lines.append(f"| {d:,.0f} | {per[ref].get(f, 0):,.0f} | {per[t].get(f, 0):,.0f} | `{name[:140]}` |")
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
