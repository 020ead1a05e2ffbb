#!/usr/bin/env python3
"""Open N idle HTTP/1.1 keep-alive client connections through a proxy and hold them.

Each connection sends one `GET /pay?txn=idle-<i>` with `Connection: keep-alive`, reads the
whole response (Content-Length framed), and then stays open, idle. At most --concurrency
requests are in flight at once (nginx without a queue answers 502 beyond its upstream cap, and
the backend should not lock up while we measure memory).

When every connection has its response, prints one line to stdout:

    ready n=<N> ok=<200s> statuses=<json> closed=<closed by peer so far>

and then holds the connections until a line (or EOF) arrives on stdin, SIGTERM/SIGINT, or
--hold-max seconds pass. On the way out it prints

    done held=<still open> closed_by_peer=<closed while holding>

With --tls, the connections are TLS (the proxy's certificate is not verified).

Standard library only. Exit status 0 if all N connections got a response, 1 otherwise.
"""

import argparse
import asyncio
import json
import resource
import signal
import ssl
import sys


def raise_nofile(n):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n + 64
    if soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


async def one(i, host, port, timeout, sem, conns, statuses, tls):
    async with sem:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=tls), timeout)
        req = (
            f"GET /pay?txn=idle-{i} HTTP/1.1\r\n"
            f"Host: {host}:{port}\r\n"
            "User-Agent: sluice-bench-idle\r\n"
            "Connection: keep-alive\r\n\r\n"
        ).encode()
        writer.write(req)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = 0
        chunked = False
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value.strip())
            elif name == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
        if chunked:
            while True:
                size_line = await asyncio.wait_for(reader.readuntil(b"\r\n"), timeout)
                size = int(size_line.split(b";")[0].strip(), 16)
                await asyncio.wait_for(reader.readexactly(size + 2), timeout)
                if size == 0:
                    break
        elif length:
            await asyncio.wait_for(reader.readexactly(length), timeout)
        statuses[status] = statuses.get(status, 0) + 1
        conns.append((reader, writer))


async def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", required=True, help="host:port")
    ap.add_argument("-n", type=int, default=2000, help="connections (default 2000)")
    ap.add_argument("--concurrency", type=int, default=16, help="requests in flight at once")
    ap.add_argument("--timeout", type=float, default=15.0, help="per connect/read, seconds")
    ap.add_argument("--hold-max", type=float, default=300.0, help="longest hold, seconds")
    ap.add_argument("--no-hold", action="store_true", help="close at once once ready")
    ap.add_argument("--tls", action="store_true", help="TLS, without verifying the proxy")
    args = ap.parse_args()
    tls = None
    if args.tls:
        tls = ssl.create_default_context()
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE
    host, _, port = args.target.rpartition(":")
    raise_nofile(args.n)

    conns, statuses = [], {}
    sem = asyncio.Semaphore(args.concurrency)
    results = await asyncio.gather(
        *(one(i, host, int(port), args.timeout, sem, conns, statuses, tls)
          for i in range(args.n)),
        return_exceptions=True,
    )
    failures = [r for r in results if isinstance(r, BaseException)]
    closed = sum(1 for r, _ in conns if r.at_eof())
    print(
        f"ready n={len(conns)} ok={statuses.get(200, 0)} "
        f"statuses={json.dumps({str(k): v for k, v in sorted(statuses.items())})} "
        f"failed={len(failures)} closed={closed}",
        flush=True,
    )
    if failures:
        print(f"first failure: {failures[0]!r}", file=sys.stderr, flush=True)

    if not args.no_hold:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

        def on_stdin():
            # A line or EOF both mean stop.
            sys.stdin.buffer.raw.read(4096)
            stop.set()

        try:
            loop.add_reader(sys.stdin.fileno(), on_stdin)
        except (ValueError, OSError, NotImplementedError):
            pass
        try:
            await asyncio.wait_for(stop.wait(), args.hold_max)
        except asyncio.TimeoutError:
            print("hold-max reached", file=sys.stderr, flush=True)

    # A peer-closed socket shows EOF once the loop has seen its FIN; give readers a chance.
    await asyncio.sleep(0)
    closed_now = sum(1 for r, _ in conns if r.at_eof())
    print(f"done held={len(conns) - closed_now} closed_by_peer={closed_now}", flush=True)
    for _, w in conns:
        w.close()
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
