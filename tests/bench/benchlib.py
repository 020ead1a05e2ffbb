"""Process and emulator helpers shared by the Python benchmarks (throughput.py, soak.py,
cluster.py, overcap.py, park_cost.py). Standard library only; Linux only."""

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request


def free_port():
    """A free TCP port on 127.0.0.1."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start(argv, work, name, stdout=None):
    """Run `argv` in a session of its own (so its whole tree can be signalled), stdout and
    stderr to WORK/NAME.{out,err} unless `stdout` is given."""
    out = stdout or open(os.path.join(work, f"{name}.out"), "w")
    err = open(os.path.join(work, f"{name}.err"), "w")
    return subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)


def stop(p, sig=signal.SIGTERM):
    """Signal the process group of `p`, wait (bounded), then kill it."""
    if p.poll() is None:
        try:
            os.killpg(p.pid, sig)
            p.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=15)


def stop_signal(p):
    """sluice stops at once on SIGINT (SIGTERM would wait for its grace period); others on
    SIGTERM."""
    return signal.SIGINT if os.path.basename(p.args[0]) == "sluice" else signal.SIGTERM


def wait_port(port, proc, timeout=15.0):
    """Poll a TCP connect to 127.0.0.1:PORT until it succeeds; fail early if `proc` exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args[0]} exited before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{proc.args[0]}: nothing listening on {port} after {timeout}s")


def wait_line(path, prefix, proc, timeout=15.0):
    """The rest of the first line of the file at `path` that starts with `prefix` (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{path}: process exited")
        try:
            for line in open(path):
                if line.startswith(prefix):
                    return line[len(prefix):].strip()
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"{path}: no {prefix!r} line after {timeout}s")


TICK = os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(root):
    """user+system CPU seconds of `root` and every descendant (scanned from /proc)."""
    children, cpu = {}, {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                s = f.read()
        except OSError:
            continue
        rest = s[s.rindex(")") + 2:].split()
        children.setdefault(int(rest[1]), []).append(int(name))
        cpu[int(name)] = (int(rest[11]) + int(rest[12])) / TICK
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += cpu.get(pid, 0.0)
        todo.extend(children.get(pid, []))
    return total


def emu_stats(addr):
    """The emulator's counters."""
    with urllib.request.urlopen(f"http://{addr}/__emu/stats", timeout=5) as r:
        return json.loads(r.read())


def emu_reset(addr):
    """Zero the emulator's counters."""
    req = urllib.request.Request(f"http://{addr}/__emu/reset", method="POST", data=b"")
    urllib.request.urlopen(req, timeout=5).read()


def haproxy_cfg(port, backend, cap, threads=2, backend_options="", server_options=""):
    """An HAProxy configuration: HTTP keep-alive on both sides, connections reused, at most `cap`
    requests (and connections) at `backend`, a queue of 4,000 for 10 s."""
    return f"""global
    maxconn 4000
    nbthread {threads}
defaults
    mode http
    maxconn 4000
    option http-keep-alive
    http-reuse always
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout queue 10s
frontend terminals
    bind 127.0.0.1:{port}
    default_backend legacy
backend legacy
{backend_options}    server legacy {backend} maxconn {cap} maxqueue 4000{server_options}
"""
