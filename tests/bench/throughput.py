#!/usr/bin/env python3
"""Cost per request: throughput and CPU per request through each proxy, in one run.

    python3 tests/bench/throughput.py [--runs 3] [--seconds 10] [--connections 64]
                                      [--targets "direct bare-pingora sluice sluice-quiet haproxy nginx"]
                                      [--out tests/bench/results/throughput.md] [--bin target/release]
                                      [--baseline DIR]

A tiny nginx "hello" server is the backend (so the proxy, not the backend, is what is measured).
`wrk -t1 -cN` drives each target in turn, a fresh process per target and run, the order rotated
each run. For every target it records requests/s, non-2xx answers, p50/p99 latency (wrk's), and
the CPU seconds the proxy's whole process tree used during the measured window, divided by the
requests completed: CPU per request. Ratios are taken within the same run (the machine is shared
and noisy), then the median over runs is reported.

Targets:
  direct        wrk straight at the backend (the latency floor)
  bare-pingora  pingora with one upstream_peer and nothing else (proxy/examples/bare_pingora.rs),
                same pingora, features, allocator and release profile as sluice: pingora's own floor
  sluice        sluice with the defaults a new user gets (access log on, to a file; health
                checks; the latency ramp), cap 32
  sluice-quiet  the tuned variant: access log off, health checks off, no ramp
  sluice-baseline  sluice's defaults, run from the binary in --baseline DIR (an earlier build, e.g.
                of the previous release): before and after in the same run
  sluice-lean   the defaults without a client write buffer (proxy.client_write_buffer_bytes = 0):
                1.4 KiB less per idle client connection, one more send per response
  haproxy       HAProxy, server maxconn 32, http-reuse always, 2 threads
  nginx         nginx, upstream max_conns=32 with keepalive 32, 2 workers (no queue: requests over
                the cap get 502, counted as non-2xx)

Needs wrk, nginx and haproxy (Debian: wrk nginx-light haproxy), and the release binaries:
`cargo build --release --locked -p sluice --bin sluice --example bare_pingora`. Standard library
only; Linux only (CPU is read from /proc).
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import free_port, haproxy_cfg, start, stop, stop_signal, tree_cpu_seconds, wait_port  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CAP = 32
THREADS = 2
def start_backend(work):
    port = free_port()
    d = os.path.join(work, "backend")
    os.makedirs(os.path.join(d, "logs"), exist_ok=True)
    conf = os.path.join(d, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    client_body_temp_path {d}/cb; proxy_temp_path {d}/p; fastcgi_temp_path {d}/f;
    uwsgi_temp_path {d}/u; scgi_temp_path {d}/s;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{ return 200 "hello\\n"; }}
    }}
}}
""")
    p = start(["nginx", "-p", d, "-e", f"{d}/logs/error.log", "-c", conf, "-g", "daemon off;"], work, "backend")
    wait_port(port, p)
    return p, f"127.0.0.1:{port}"


def start_target(kind, work, backend, binary_dir, run, baseline_dir=None, prefix=(), ready_timeout=15.0,
                 sluice_extra=""):
    """Start one target on a free port; `prefix` goes before the command of a sluice or bare
    pingora target (e.g. valgrind), `sluice_extra` after a sluice target's config. Returns the
    process and the address it listens on."""
    name = f"{kind}-r{run}"
    d = os.path.join(work, name)
    os.makedirs(d, exist_ok=True)
    port = free_port()
    if kind == "bare-pingora":
        p = start([*prefix, os.path.join(binary_dir, "examples", "bare_pingora"), f"127.0.0.1:{port}", backend, str(THREADS)], work, name)
    elif kind in ("sluice", "sluice-quiet", "sluice-lean", "sluice-baseline"):
        conf = os.path.join(d, "sluice.toml")
        quiet = kind == "sluice-quiet"
        lean = "client_write_buffer_bytes = 0" if kind == "sluice-lean" else ""
        with open(conf, "w") as f:
            f.write(f"""
[proxy]
listen = "127.0.0.1:{port}"
{lean}
[admission]
max_inflight = {CAP}
[[backend]]
name = "hello"
address = "{backend}"
[admin]
listen = "127.0.0.1:{free_port()}"
[server]
threads = {THREADS}
pid_file = "{d}/sluice.pid"
upgrade_sock = "{d}/sluice_upgrade.sock"
""" + ("""
[log]
access = "off"
[health]
check = "none"
[slow_start]
duration = "0s"
""" if quiet else "") + sluice_extra)
        # The defaults' access log goes to stdout: written to a file, as an operator would.
        sluice = os.path.join(baseline_dir if kind == "sluice-baseline" else binary_dir, "sluice")
        p = start([*prefix, sluice, "run", "--config", conf], work, name,
                 stdout=open(os.path.join(d, "access.log"), "w"))
    elif kind == "haproxy":
        conf = os.path.join(d, "haproxy.cfg")
        with open(conf, "w") as f:
            f.write(haproxy_cfg(port, backend, CAP, THREADS))
        p = start(["haproxy", "-db", "-f", conf], work, name)
    elif kind == "nginx":
        os.makedirs(os.path.join(d, "logs"), exist_ok=True)
        conf = os.path.join(d, "nginx.conf")
        with open(conf, "w") as f:
            f.write(f"""
worker_processes {THREADS};
pid {d}/nginx.pid;
error_log {d}/logs/error.log warn;
events {{ worker_connections 10000; }}
http {{
    access_log off;
    client_body_temp_path {d}/cb; proxy_temp_path {d}/p; fastcgi_temp_path {d}/f;
    uwsgi_temp_path {d}/u; scgi_temp_path {d}/s;
    upstream hello {{
        zone hello 64k;
        server {backend} max_conns={CAP};
        keepalive {CAP};
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://hello;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
""")
        p = start(["nginx", "-p", d, "-e", f"{d}/logs/error.log", "-c", conf, "-g", "daemon off;"], work, name)
    else:
        raise SystemExit(f"unknown target {kind}")
    wait_port(port, p, timeout=ready_timeout)
    return p, f"127.0.0.1:{port}"


def ms(text):
    m = re.match(r"([\d.]+)(us|ms|s)$", text)
    if not m:
        return None
    v = float(m.group(1))
    return {"us": v / 1000, "ms": v, "s": v * 1000}[m.group(2)]


def wrk(addr, seconds, connections):
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", f"http://{addr}/"],
                         capture_output=True, text=True, timeout=seconds + 60).stdout
    req = re.search(r"(\d+) requests in", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.M))
    return {
        "requests": int(req.group(1)) if req else 0,
        "non2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": sum(map(int, errors.groups())) if errors else 0,
        "p50_ms": ms(lat.get("50", "")),
        "p99_ms": ms(lat.get("99", "")),
        "raw": out,
    }


def measure(kind, work, backend, args, run):
    if kind == "direct":
        proc, addr = None, backend
    else:
        proc, addr = start_target(kind, work, backend, args.bin, run, args.baseline)
    try:
        wrk(addr, 2, args.connections)  # warm-up: pools filled, ramps done, caches hot
        cpu0 = tree_cpu_seconds(proc.pid) if proc else 0.0
        t0 = time.monotonic()
        r = wrk(addr, args.seconds, args.connections)
        wall = time.monotonic() - t0
        cpu = (tree_cpu_seconds(proc.pid) - cpu0) if proc else None
    finally:
        if proc:
            stop(proc, stop_signal(proc))
    ok = r["requests"] - r["non2xx"]
    r.update({
        "target": kind, "run": run, "wall_s": wall, "ok": ok, "ok_per_s": ok / args.seconds,
        "cpu_s": cpu, "cpu_us_per_req": (cpu * 1e6 / r["requests"]) if cpu is not None and r["requests"] else None,
    })
    return r


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def report(rows, args, params):
    targets = [t for t in args.targets.split() if any(r["target"] == t for r in rows)]
    by = {(r["target"], r["run"]): r for r in rows}
    runs = sorted({r["run"] for r in rows})

    def ratio(t, ref, key):
        vals = []
        for run in runs:
            a, b = by.get((t, run)), by.get((ref, run))
            if a and b and a.get(key) and b.get(key):
                vals.append(a[key] / b[key])
        return median(vals)

    lines = [
        "# Cost per request",
        "",
        f"Measured {params['date']} on {params['nproc']} cores ({params['cpu']}), {params['kernel']}; "
        f"{params['haproxy']}; {params['nginx']}; {params['sluice']}. "
        f"`wrk -t1 -c{args.connections}`, {args.seconds} s per target after a 2 s warm-up, {len(runs)} runs "
        f"(order rotated), a fresh process per target and run; backend: nginx returning `hello` "
        f"(1 worker); every proxy capped at {CAP} requests at the backend, {THREADS} threads. "
        "Medians over runs; ratios are taken within each run, then the median. CPU per request is the "
        "CPU time of the proxy's whole process tree during the measured window over the requests "
        "completed (wrk and the backend share the same 2 cores).",
        "",
        "| target | ok req/s | non-2xx | p50 ms | p99 ms | CPU µs/req | × bare pingora (req/s) | × HAProxy (req/s) | CPU × HAProxy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in targets:
        rs = [r for r in rows if r["target"] == t]
        lines.append(
            f"| {t} | {fmt(median([r['ok_per_s'] for r in rs]), ',.0f')} "
            f"| {fmt(median([r['non2xx'] for r in rs]), '.0f')} "
            f"| {fmt(median([r['p50_ms'] for r in rs]), '.2f')} | {fmt(median([r['p99_ms'] for r in rs]), '.2f')} "
            f"| {fmt(median([r['cpu_us_per_req'] for r in rs]), '.1f')} "
            f"| {fmt(ratio(t, 'bare-pingora', 'ok_per_s'), '.2f')} | {fmt(ratio(t, 'haproxy', 'ok_per_s'), '.2f')} "
            f"| {fmt(ratio(t, 'haproxy', 'cpu_us_per_req'), '.2f')} |"
        )
    if "sluice-baseline" in targets and "sluice" in targets:
        lines += ["", f"Before and after, same runs: sluice ÷ sluice-baseline ({args.baseline}) = "
                  f"{fmt(ratio('sluice', 'sluice-baseline', 'ok_per_s'), '.2f')} × the requests/s, "
                  f"{fmt(ratio('sluice', 'sluice-baseline', 'cpu_us_per_req'), '.2f')} × the CPU per request."]
    lines += ["", "Per run:", "", "| run | target | ok req/s | CPU µs/req | p50 ms |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['target']} | {r['ok_per_s']:,.0f} | {fmt(r['cpu_us_per_req'], '.1f')} | {fmt(r['p50_ms'], '.2f')} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--targets", default="direct bare-pingora sluice sluice-quiet sluice-lean haproxy nginx")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "throughput.md"))
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release"))
    ap.add_argument("--baseline", help="directory holding an earlier sluice binary (target sluice-baseline)")
    args = ap.parse_args()
    if "sluice-baseline" in args.targets.split() and not (
            args.baseline and os.path.exists(os.path.join(args.baseline, "sluice"))):
        raise SystemExit("throughput.py: target sluice-baseline needs --baseline DIR with a sluice binary in it")
    for tool in ("wrk", "nginx", "haproxy"):
        if not shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin"):
            raise SystemExit(f"throughput.py: {tool} is missing (apt-get install -y wrk nginx-light haproxy)")
    os.environ["PATH"] = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    for b in ("sluice", os.path.join("examples", "bare_pingora")):
        if not os.path.exists(os.path.join(args.bin, b)):
            raise SystemExit(f"throughput.py: {args.bin}/{b} is missing: cargo build --release --locked -p sluice "
                             "--bin sluice --example bare_pingora")
    sluice_version = subprocess.run([os.path.join(args.bin, "sluice"), "--version"], capture_output=True, text=True).stdout.strip()
    params = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "nproc": os.cpu_count(),
        "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?"),
        "kernel": " ".join(os.uname()[2:3] + os.uname()[4:5]),
        "haproxy": subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout.splitlines()[0],
        "nginx": subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip(),
        "sluice": sluice_version,
    }
    work = tempfile.mkdtemp(prefix="sluice-throughput.")
    backend, rows = None, []
    try:
        backend, addr = start_backend(work)
        targets = args.targets.split()
        for run in range(1, args.runs + 1):
            k = (run - 1) % len(targets)
            for t in targets[k:] + targets[:k]:
                r = measure(t, work, addr, args, run)
                print(f"[throughput] run {run} {t}: {r['ok_per_s']:,.0f} ok/s, "
                      f"CPU {fmt(r['cpu_us_per_req'], '.1f')} µs/req, p50 {fmt(r['p50_ms'], '.2f')} ms, "
                      f"non-2xx {r['non2xx']}", file=sys.stderr)
                rows.append(r)
    finally:
        if backend:
            stop(backend)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(report(rows, args, params))
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump({"params": params, "rows": [{k: v for k, v in r.items() if k != "raw"} for r in rows]}, f, indent=1)
    shutil.rmtree(work, ignore_errors=True)
    print(open(args.out).read())


if __name__ == "__main__":
    main()
