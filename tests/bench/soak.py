#!/usr/bin/env python3
"""Soak: sluice with its defaults for a long run at 90 % of the backend's capacity, half the
terminals on kept-alive connections and half opening a connection per transaction. The capacity is
measured first (32 keep-alive clients in a closed loop straight at the emulator for 10 s, as
run.sh's calibration): the emulator serves a few percent less than its nominal 1,600/s here, and
90 % of the nominal figure is so close to the real ceiling that the queue grows for minutes. Samples, every
few seconds, sluice's RSS and open descriptors and the backend's open connections, and writes a
table, a CSV and an SVG plot.

    python3 tests/bench/soak.py [--minutes 10] [--out tests/bench/results/soak.md] [--bin target/release] [--nominal]

Pass: RSS at the end within 5 % of RSS after the first minute, and descriptors flat (the same
range after the first minute as at the end). Needs the release binaries `sluice`, `legacy-emu`
and `terminals` (`cargo build --release --locked`). Standard library only; Linux only.
"""

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import emu_reset, emu_stats, free_port, start, stop, stop_signal, wait_line, wait_port  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
WORKERS, SERVICE_MS = 32, 20  # the emulated legacy server: 1,600 transactions/s
CAPACITY = WORKERS * 1000 // SERVICE_MS
LOAD = 0.9
SAMPLE_EVERY = 5.0
CALIBRATION_SECONDS = 10


def proc_sample(pid):
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def svg(samples, path):
    """RSS (MiB), descriptors and backend connections over time, one panel each."""
    w, h, pad, gap = 720, 150, 48, 28
    series = [("sluice RSS (MiB)", [s["rss_kib"] / 1024 for s in samples], "#1f77b4"),
              ("sluice open descriptors", [s["fds"] for s in samples], "#ff7f0e"),
              ("backend open connections", [s["backend_conns"] for s in samples], "#2ca02c")]
    t = [s["t"] for s in samples]
    tmax = max(t) or 1
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{len(series) * (h + gap) + gap}" '
           'font-family="sans-serif" font-size="11">', '<rect width="100%" height="100%" fill="white"/>']
    for i, (name, ys, color) in enumerate(series):
        top = gap + i * (h + gap)
        lo, hi = 0, max(ys) * 1.15 or 1
        pts = " ".join(f"{pad + (x / tmax) * (w - pad - 10):.1f},{top + h - (y - lo) / (hi - lo) * h:.1f}" for x, y in zip(t, ys))
        out += [f'<text x="{pad}" y="{top - 6}" font-weight="bold">{name}</text>',
                f'<line x1="{pad}" y1="{top + h}" x2="{w - 10}" y2="{top + h}" stroke="#999"/>',
                f'<line x1="{pad}" y1="{top}" x2="{pad}" y2="{top + h}" stroke="#999"/>',
                f'<text x="{pad - 4}" y="{top + 4}" text-anchor="end">{hi:.0f}</text>',
                f'<text x="{pad - 4}" y="{top + h}" text-anchor="end">0</text>',
                f'<text x="{w - 10}" y="{top + h + 14}" text-anchor="end">{tmax:.0f} s</text>',
                f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{pts}"/>']
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "soak.md"))
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release"))
    ap.add_argument("--nominal", action="store_true",
                    help="offer 90 %% of the nominal capacity (1,600/s) instead of the measured one")
    args = ap.parse_args()
    seconds = int(args.minutes * 60)
    work = tempfile.mkdtemp(prefix="sluice-soak.")
    procs = []
    try:
        emu = start([os.path.join(args.bin, "legacy-emu"), "--listen", "127.0.0.1:0", "--workers", str(WORKERS),
                     "--service-time", f"{SERVICE_MS}ms"], work, "emu")
        procs.append(emu)
        emu_addr = wait_line(os.path.join(work, "emu.out"), "listening on ", emu)
        term = os.path.join(args.bin, "terminals")
        ceiling = None
        if not args.nominal:
            cal = start([term, "--target", emu_addr, "--terminals", str(WORKERS), "--conn-mode", "keep-alive",
                         "--http", "1.1", "--duration", f"{CALIBRATION_SECONDS}s", "--timeout", "15s", "--json"],
                        work, "calibration")
            cal.wait(timeout=CALIBRATION_SECONDS + 60)
            ceiling = json.load(open(os.path.join(work, "calibration.out")))["goodput"]
            emu_reset(emu_addr)
        capacity = ceiling or CAPACITY
        port, admin = free_port(), free_port()
        conf = os.path.join(work, "sluice.toml")
        with open(conf, "w") as f:
            f.write(f'[proxy]\nlisten = "127.0.0.1:{port}"\n[admission]\nmax_inflight = {WORKERS}\n'
                    f'[[backend]]\nname = "legacy"\naddress = "{emu_addr}"\n[admin]\nlisten = "127.0.0.1:{admin}"\n'
                    f'[log]\naccess = "{work}/access.log"\n[server]\npid_file = "{work}/sluice.pid"\n'
                    f'upgrade_sock = "{work}/sluice_upgrade.sock"\n')
        sluice = start([os.path.join(args.bin, "sluice"), "run", "--config", conf], work, "sluice")
        procs.append(sluice)
        wait_port(port, sluice)
        rate = capacity * LOAD / 2
        common = ["--target", f"127.0.0.1:{port}", "--terminals", "300", "--rate", f"{rate:.0f}", "--duration",
                  f"{seconds}s", "--ramp", "5s", "--method", "post", "--timeout", "15s", "--json"]
        ka = start([term, *common, "--conn-mode", "keep-alive"], work, "keepalive")
        pt = start([term, *common, "--conn-mode", "per-transaction", "--http", "mixed"], work, "per-transaction")
        procs += [ka, pt]
        samples, t0 = [], time.monotonic()
        while time.monotonic() - t0 < seconds + 5 and (ka.poll() is None or pt.poll() is None):
            rss, fds = proc_sample(sluice.pid)
            st = emu_stats(emu_addr)
            samples.append({"t": round(time.monotonic() - t0, 1), "rss_kib": rss, "fds": fds,
                            "backend_conns": st["open_connections"], "backend_inside": st["inside_now"],
                            "lockups": st["lockups"]})
            time.sleep(SAMPLE_EVERY)
        for p in (ka, pt):
            p.wait(timeout=120)
        reports = {}
        for name in ("keepalive", "per-transaction"):
            try:
                reports[name] = json.load(open(os.path.join(work, f"{name}.out")))
            except (OSError, ValueError):
                reports[name] = {}
        final = emu_stats(emu_addr)
    finally:
        for p in reversed(procs):
            stop(p, stop_signal(p))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    base = os.path.splitext(args.out)[0]
    with open(base + ".csv", "w") as f:
        f.write("t_s,rss_kib,fds,backend_conns,backend_inside,lockups\n")
        for s in samples:
            f.write(f"{s['t']},{s['rss_kib']},{s['fds']},{s['backend_conns']},{s['backend_inside']},{s['lockups']}\n")
    svg(samples, base + ".svg")
    after_1min = [s for s in samples if s["t"] >= 60]
    first = after_1min[0] if after_1min else samples[0]
    last = samples[-1]
    rss_ratio = last["rss_kib"] / first["rss_kib"]
    early = [s["fds"] for s in samples if 60 <= s["t"] < 120] or [first["fds"]]
    late = [s["fds"] for s in samples if s["t"] >= samples[-1]["t"] - 60] or [last["fds"]]
    lines = [
        "# Soak",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores. sluice with its defaults "
        f"(access log to a file) in front of the emulated legacy server ({WORKERS} workers × {SERVICE_MS} ms = "
        f"{CAPACITY:,} tx/s nominal"
        + (f", {ceiling:,.0f} tx/s measured here" if ceiling else "")
        + f"), cap {WORKERS}, for {seconds} s at {LOAD:.0%} of its {'measured' if ceiling else 'nominal'} capacity: "
        f"300 keep-alive terminals "
        f"and 300 terminals opening a connection per transaction (HTTP/1.0 and 1.1 mixed), {rate:.0f} POST/s each. "
        f"Sampled every {SAMPLE_EVERY:.0f} s ([CSV]({os.path.basename(base)}.csv), plot below).",
        "",
        "| | after 1 min | at the end | |",
        "|---|---|---|---|",
        f"| sluice RSS | {first['rss_kib']:,} KiB | {last['rss_kib']:,} KiB | × {rss_ratio:.3f} "
        f"({'within' if abs(rss_ratio - 1) <= 0.05 else 'NOT within'} 5 %) |",
        f"| sluice open descriptors (min–max over a minute) | {min(early)}–{max(early)} | {min(late)}–{max(late)} | |",
        f"| backend open connections | {first['backend_conns']} | {last['backend_conns']} | |",
        "",
        f"Backend: max {final['max_inside']} requests inside at once (cap {WORKERS}), max "
        f"{final['max_open_connections']} connections open at once, {final['accepted_connections']:,} accepted, "
        f"{final['lockups']} lock-ups. The backend's connection counts include the connection of the soak's own "
        "stats request (`GET /__emu/stats`), so a proxy holding exactly its cap of 32 shows 33.",
        "",
        "| terminals | sent | ok | by status | connect / io / timeout errors | mismatched | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in reports.items():
        lat = r.get("latency_ok", {})
        lines.append(f"| {name} | {r.get('sent', 'n/a')} | {r.get('ok', 'n/a')} | {r.get('by_status', 'n/a')} | "
                     f"{r.get('errors_connect', 'n/a')} / {r.get('errors_io', 'n/a')} / {r.get('errors_timeout', 'n/a')} | "
                     f"{r.get('mismatched', 'n/a')} | {lat.get('p50_ms', 'n/a')} | {lat.get('p99_ms', 'n/a')} |")
    lines += ["", f"![RSS, descriptors and backend connections over time]({os.path.basename(base)}.svg)", ""]
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    with open(base + ".json", "w") as f:
        json.dump({"samples": samples, "reports": reports, "backend": final}, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
