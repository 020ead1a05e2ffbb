#!/usr/bin/env python3
"""Turn the raw JSON of a tests/bench/run.sh run into Markdown.

    report.py RESULTS_DIR OUT.md

Prints the tables to stdout and writes them, with the machine, versions, exact parameters,
configurations and a "Reading the results" section, to OUT.md. Standard library only.
"""

import os
import statistics
import sys

import report_restart as restart
from report_restart import before_after_rows, load, statuses, table

# sluice-before: the sluice target run with an earlier build's binary (BENCH_SLUICE_BEFORE).
TARGETS = ["direct", "sluice", "sluice-before", "sluice-noramp", "haproxy", "nginx"]
LABEL = {
    "sluice-noramp": "sluice, slow start off",
    "sluice-lean": "sluice, client_write_buffer_bytes = 0",
}
PROXIES = ["sluice", "sluice-before", "haproxy", "nginx"]


def fmt_int(x):
    return f"{x:,}" if x is not None else "–"


def pct(x):
    return f"{x:.1f} %" if x is not None else "–"


def ratio(a, b, digits=2):
    if a is None or b is None or b == 0:
        return "–"
    return f"{a / b:.{digits}f}×"


def main():
    res, out_path = sys.argv[1], sys.argv[2]
    p = load(os.path.join(res, "params.json"))
    cap = p["capacity"]
    runs = range(1, p["runs"] + 1)
    surge_ran = p["runs"] > 0
    targets = [t for t in TARGETS if t in p["targets"].split()]
    proxies = [t for t in PROXIES if t in targets]
    # Memory is also measured for sluice's memory-lean setting (no surge run).
    mem_kinds = proxies + (["sluice-lean"] if "sluice" in proxies else [])

    # ---- collect
    surge, ceiling, mem = {}, {}, {}
    # A restart-only run measures one calibration (r1) for its rate.
    for r in range(1, max(p["runs"], 1) + 1):
        c = load(os.path.join(res, f"r{r}-ceiling.terminals.json"))
        ce = load(os.path.join(res, f"r{r}-ceiling.emu.json"))
        if c:
            ceiling[r] = {"goodput": c["goodput"], "ok": c["ok"], "emu": ce}
    for r in runs:
        for t in targets:
            term = load(os.path.join(res, f"r{r}-{t}.terminals.json"))
            emu = load(os.path.join(res, f"r{r}-{t}.emu.json"))
            meta = load(os.path.join(res, f"r{r}-{t}.meta.json")) or {}
            if not term or not emu:
                continue
            d = {"t": term, "e": emu}
            pb, pa = meta.get("proxy_before"), meta.get("proxy_after")
            d["proxy_cpu"] = pa["cpu_s"] - pb["cpu_s"] if pa and pb else None
            d["proxy_hwm"] = pa["hwm_kib"] if pa else None
            eb, ea = meta.get("emu_before"), meta.get("emu_after")
            d["emu_cpu"] = ea["cpu_s"] - eb["cpu_s"] if ea and eb else None
            d["goodput"] = term["goodput"]
            d["pct_cap"] = 100.0 * term["goodput"] / cap
            cg = ceiling.get(r, {}).get("goodput")
            d["pct_ceiling"] = 100.0 * term["goodput"] / cg if cg else None
            # The stats query itself is one accepted (and open) connection.
            d["backend_conns"] = max(emu["accepted_connections"] - 1, 0)
            d["backend_max_open"] = max(emu["max_open_connections"] - 1, 0)
            d["client_errors"] = (
                term["errors_connect"] + term["errors_io"] + term["errors_timeout"]
            )
            surge[(r, t)] = d
        for t in mem_kinds:
            m = load(os.path.join(res, f"r{r}-mem-{t}.json"))
            if not m:
                continue
            n = m["n"]
            m["per_conn_rss"] = (m["after"]["rss_kib"] - m["before"]["rss_kib"]) / n
            m["per_conn_pss"] = (m["after"]["pss_kib"] - m["before"]["pss_kib"]) / n
            # The next N, in the warm process (older results have no second batch).
            if "warm" in m:
                m["per_conn_warm"] = (m["warm"]["rss_kib"] - m["settled"]["rss_kib"]) / n
            mem[(r, t)] = m

    # ---- surge table
    rows = []
    for r in runs:
        for t in targets:
            d = surge.get((r, t))
            if not d:
                rows.append([r, t] + ["(missing)"] + [""] * 16)
                continue
            tt, e = d["t"], d["e"]
            rows.append([
                r, f"**{LABEL.get(t, t)}**",
                fmt_int(tt["ok"]),
                f"{d['goodput']:,.0f}",
                pct(d["pct_cap"]),
                pct(d["pct_ceiling"]),
                statuses(tt["by_status"]),
                f"{tt['errors_connect']}/{tt['errors_io']}/{tt['errors_timeout']}",
                tt["mismatched"],
                e["max_inside"],
                e["lockups"],
                fmt_int(d["backend_conns"]),
                d["backend_max_open"],
                f"{tt['latency_ok']['p50_ms']:,.0f}",
                f"{tt['latency_ok']['p99_ms']:,.0f}",
                f"{tt['elapsed_ms'] / 1000:.1f}",
                f"{d['proxy_cpu']:.1f}" if d["proxy_cpu"] is not None else "–",
                f"{d['emu_cpu']:.1f}" if d["emu_cpu"] is not None else "–",
                f"{d['proxy_hwm'] / 1024:.0f}" if d["proxy_hwm"] else "–",
            ])
    surge_table = table(
        ["run", "target", "ok", "goodput ok/s", "% of 1,600/s", "% of measured ceiling",
         "responses by status", "client errors conn/io/timeout", "mismatched",
         "backend max concurrency", "backend lock-ups", "backend conns accepted",
         "backend max open conns", "p50 ms", "p99 ms", "elapsed s", "proxy CPU s",
         "backend CPU s", "proxy peak RSS MiB"],
        rows,
    )

    ceil_rows = []
    for r in sorted(ceiling):
        c = ceiling.get(r)
        if c:
            e = c["emu"] or {}
            ceil_rows.append([r, f"{c['goodput']:,.0f}", pct(100.0 * c["goodput"] / cap),
                              e.get("max_inside", "–"), e.get("lockups", "–")])
    ceil_table = table(["run", "emulator ceiling ok/s", "% of 1,600/s", "max concurrency",
                        "lock-ups"], ceil_rows)

    # ---- memory table
    mem_rows = []
    for r in runs:
        for t in mem_kinds:
            m = mem.get((r, t))
            if not m:
                continue
            mem_rows.append([
                r, f"**{LABEL.get(t, t)}**", m["ready"].replace("ready ", "").split(" statuses")[0],
                m["done"].replace("done ", ""),
                f"{m['before']['rss_kib'] / 1024:.1f}",
                f"{m['after']['rss_kib'] / 1024:.1f}",
                f"**{m['per_conn_rss']:.2f}**",
                f"**{m['per_conn_warm']:.2f}**" if "per_conn_warm" in m else "–",
                len(m["after"]["pids"]),
            ])
    mem_table = table(["run", "proxy", "idle conns opened", "at the end", "RSS before MiB",
                       "RSS with idle conns MiB", "KiB per idle conn (first N)",
                       "KiB per idle conn (next N, warm)", "processes"], mem_rows)

    # ---- ratios
    def g(r, t, key="goodput"):
        d = surge.get((r, t))
        return d[key] if d else None

    def p99(r, t):
        d = surge.get((r, t))
        return d["t"]["latency_ok"]["p99_ms"] if d else None

    def m(r, t):
        x = mem.get((r, t))
        return x["per_conn_rss"] if x else None

    def mw(r, t):
        x = mem.get((r, t))
        return x.get("per_conn_warm") if x else None

    ratio_rows = []
    noramp = "sluice-noramp" in targets
    for r in runs:
        row = [
            r,
            ratio(g(r, "sluice"), g(r, "haproxy")),
            ratio(g(r, "sluice-noramp"), g(r, "haproxy")) if noramp else None,
            ratio(g(r, "sluice"), g(r, "nginx")),
            ratio(g(r, "sluice"), g(r, "direct")),
            ratio(p99(r, "sluice"), p99(r, "haproxy")),
            ratio(p99(r, "sluice-noramp"), p99(r, "haproxy")) if noramp else None,
            ratio(m(r, "sluice"), m(r, "haproxy")),
            ratio(m(r, "sluice"), m(r, "nginx")),
        ]
        ratio_rows.append([c for c in row if c is not None])
    head = ["run", "goodput sluice ÷ HAProxy",
            "goodput sluice (slow start off) ÷ HAProxy" if noramp else None,
            "goodput sluice ÷ nginx", "goodput sluice ÷ direct", "p99 sluice ÷ HAProxy",
            "p99 sluice (slow start off) ÷ HAProxy" if noramp else None,
            "KiB/idle conn sluice ÷ HAProxy", "KiB/idle conn sluice ÷ nginx"]
    ratio_table = table([h for h in head if h is not None], ratio_rows)

    # ---- this build against the earlier one (BENCH_SLUICE_BEFORE), run by run
    before_table = None
    if "sluice-before" in targets:
        before_table = table(
            ["run", "goodput ok/s", "p99 ms", "KiB per idle conn (first N)",
             "KiB per idle conn (next N, warm)"],
            before_after_rows(list(runs), [
                (g, "{:,.0f}"),
                (p99, "{:,.0f}"),
                (m, "{:.2f}"),
                (mw, "{:.2f}"),
            ]))

    # ---- targets for sluice
    def verdict(vals, ok):
        vals = [v for v in vals if v is not None]
        if not vals:
            return "not measured"
        return "**met**" if all(ok(v) for v in vals) else "**not met**"

    def col(t, f):
        return [f(surge[(r, t)]) for r in runs if (r, t) in surge]

    memcmp = [(m(r, "sluice"), m(r, "haproxy")) for r in runs
              if m(r, "sluice") is not None and m(r, "haproxy") is not None]

    def show(vals, f):
        return ", ".join(f(v) for v in vals) if vals else "–"

    target_rows = []
    for t in [x for x in ("sluice", "sluice-noramp") if x in targets]:
        lbl = LABEL.get(t, t)
        lock = col(t, lambda d: d["e"]["lockups"])
        conc = col(t, lambda d: d["e"]["max_inside"])
        gpct = col(t, lambda d: d["pct_cap"])
        gceil = col(t, lambda d: d["pct_ceiling"])
        target_rows += [
            [f"{lbl}: 0 backend lock-ups", show(lock, str), verdict(lock, lambda v: v == 0)],
            [f"{lbl}: backend max concurrency = {p['max_inflight']}", show(conc, str),
             verdict(conc, lambda v: v == p["max_inflight"])],
            [f"{lbl}: goodput ≥ 99 % of backend capacity (1,600/s)", show(gpct, pct),
             verdict(gpct, lambda v: v >= 99.0)],
            [f"{lbl}: (for reference) goodput ≥ 99 % of the measured emulator ceiling",
             show(gceil, pct), verdict(gceil, lambda v: v is not None and v >= 99.0)],
        ]
    target_rows.append(
        ["sluice: memory per idle client conn ≤ HAProxy's (first N, cold process)",
         show(memcmp, lambda v: f"{v[0]:.2f} vs {v[1]:.2f} KiB"),
         verdict(memcmp, lambda v: v[0] <= v[1])])
    warmcmp = [(mw(r, "sluice"), mw(r, "haproxy")) for r in runs
               if mw(r, "sluice") is not None and mw(r, "haproxy") is not None]
    target_rows.append(
        ["sluice: memory per idle client conn ≤ HAProxy's (next N, warm process)",
         show(warmcmp, lambda v: f"{v[0]:.2f} vs {v[1]:.2f} KiB"),
         verdict(warmcmp, lambda v: v[0] <= v[1])])
    target_table = table(["target", "measured (per run)", "verdict"], target_rows)

    # ---- noise
    noise_lines = []
    if len(runs) > 1:
        for t in targets:
            vals = [surge[(r, t)]["goodput"] for r in runs if (r, t) in surge]
            if len(vals) > 1 and statistics.mean(vals) > 0:
                spread = 100.0 * (max(vals) - min(vals)) / statistics.mean(vals)
                noise_lines.append(
                    f"  - {LABEL.get(t, t)}: goodput {', '.join(f'{v:,.0f}' for v in vals)} ok/s "
                    f"(spread {spread:.1f} % of the mean)")
        for t in proxies:
            vals = [mem[(r, t)]["per_conn_rss"] for r in runs if (r, t) in mem]
            if len(vals) > 1:
                noise_lines.append(
                    f"  - {t}: memory per idle connection {', '.join(f'{v:.1f}' for v in vals)} KiB")

    ramp_lines = []
    if "sluice-noramp" in targets and "sluice" in targets:
        for r in runs:
            a_, b_ = g(r, "sluice"), g(r, "sluice-noramp")
            if a_ and b_:
                ramp_lines.append(
                    f"  - run {r}: {a_:,.0f} ok/s with the ramp, {b_:,.0f} ok/s without "
                    f"({100.0 * (a_ - b_) / b_:+.1f} %); p99 {p99(r, 'sluice'):,.0f} ms vs "
                    f"{p99(r, 'sluice-noramp'):,.0f} ms")

    hap_over = [surge[(r, "haproxy")]["e"]["max_inside"] for r in runs
                if (r, "haproxy") in surge
                and surge[(r, "haproxy")]["e"]["max_inside"] > p["max_inflight"]]
    haproxy_note = ""
    if hap_over:
        haproxy_note = (
            f"- **HAProxy's {max(hap_over)}**: HAProxy frees a server slot the instant it has read the\n"
            "  response and may send the next queued request on another pooled connection at once;\n"
            "  the emulator counts a request as inside until its own `write` call has returned. A\n"
            f"  momentary {p['max_inflight'] + 1} is therefore most likely a few-microsecond overlap at the response\n"
            "  boundary rather than more requests really being worked on (the emulator's worker pool\n"
            "  caps real service at its worker count either way). sluice releases a slot only after\n"
            "  the response has reached the client, so it does not show this overlap.\n")
    ceil_vals = [c["goodput"] for c in ceiling.values()]
    ceiling_note = ""
    if ceil_vals:
        ceiling_note = (
            f"- **Why nothing reaches 99 % of 1,600/s**: the emulator alone, driven by {p['max_inflight']} "
            f"keep-alive clients with no proxy, serves {', '.join(f'{v:,.0f}' for v in ceil_vals)} ok/s "
            f"here ({', '.join(f'{100 * v / cap:.1f} %' for v in ceil_vals)} of 1,600/s): each "
            f"\"{p['service_time']}\" sleep overshoots a little and every request adds a loopback round trip. "
            "The *% of measured ceiling* column is the fairer yardstick for a proxy's own overhead.\n")

    ceil_md = ["### Calibration: the emulator's measured ceiling (32 keep-alive clients, closed loop, no proxy)",
               ceil_table]
    if surge_ran:
        surge_md = "\n\n".join([
            "## Results: surge",
            "### Surge: 2,000 terminals, one connection per transaction, 2,400 tx/s offered",
            surge_table,
            *ceil_md,
            "### Memory per idle client connection",
            mem_table,
            "### Side by side",
            ratio_table,
            *(["### sluice / sluice-before (this build ÷ the earlier one, same run)",
                before_table] if before_table else []),
            "### Targets for sluice",
            target_table,
        ])
    else:
        surge_md = "\n\n".join(
            ["## Results: calibration (for the restart scenario's rate; the surge was not run)",
             *ceil_md])
    rs = restart.section(res, p) if p.get("restart", {}).get("runs") else None
    tables_md = surge_md + ("\n\n" + rs["tables"] if rs else "")
    print(tables_md)
    # The slowdown scenario writes its own file (a run of it alone leaves this one as it is):
    # link it, and its plots, when it is there.
    out_dir = os.path.dirname(os.path.abspath(out_path))
    if os.path.exists(os.path.join(out_dir, "RESULTS-slowdown.md")):
        plots = [f for f in ("slowdown-service-time.svg", "slowdown-workers.svg")
                 if os.path.exists(os.path.join(out_dir, f))]
        tables_md += "\n\n" + "\n\n".join(
            ["## Results: slowdown",
             "The slowdown scenario (capacity halved for 20 s under 80 % load; sluice with its "
             "defaults, sluice with `admission.adaptive = true`, HAProxy) has its own results "
             "file, from its own run: [`RESULTS-slowdown.md`](RESULTS-slowdown.md)."]
            + [f"![{f}]({f})" for f in plots])

    # Cost per request is measured by throughput.py in its own runs; its latest summary (with
    # where bare pingora's own time goes) is linked when it is there.
    if os.path.exists(os.path.join(out_dir, "results", "cost-per-request.md")):
        tables_md += "\n\n" + "\n\n".join(
            ["## Results: cost per request",
             "Throughput and CPU per request through sluice with its defaults, a bare pingora "
             "proxy and HAProxy, side by side in the same runs (`throughput.py`), and what bare "
             "pingora's own time is spent on: "
             "[`results/cost-per-request.md`](results/cost-per-request.md)."])

    # ---- the document
    configs = []
    for name, lang in [("sluice.command.txt", "sh"), ("sluice-noramp.command.txt", "sh"),
                       ("sluice.check.txt", "text"), ("sluice-noramp.check.txt", "text"),
                       ("sluice-before.check.txt", "text"),
                       ("sluice.toml", "toml"), ("haproxy.cfg", ""), ("nginx.conf", "nginx")]:
        path = os.path.join(res, name)
        if os.path.exists(path):
            with open(path) as f:
                configs.append(f"`{name}` (run 1; ports differ per run):\n\n```{lang}\n{f.read().rstrip()}\n```")
    if rs:
        configs += rs["configs"]

    wall_split = ""
    if p.get("surge_seconds_wall") is not None and rs:
        wall_split = (f" (surge and calibration {p['surge_seconds_wall']} s, restart "
                      f"{p['restart_seconds_wall']} s)")
    before_version = ""
    if p.get("sluice_before"):
        before_version = (f"\n- **sluice-before** (`BENCH_SLUICE_BEFORE`): {p['sluice_before']}.\n"
                          "  It runs as the *sluice* target does (same flags, configuration, fresh emulator):\n"
                          "  the two builds are measured in the same run; compare them within a run.")
    before_bullet = ""
    if "sluice-before" in targets:
        before_bullet = (
            "  - *sluice-before* (`BENCH_SLUICE_BEFORE`): the *sluice* target exactly, run with the\n"
            "    earlier build's binary (see the versions above); also measured for memory per idle\n"
            "    connection.\n")
    doc = f"""# sluice benchmark results

Generated by `bash tests/bench/run.sh` on {p['date']}. Every number below comes from that run;
re-running the script overwrites this file.

- Machine: {p['nproc']} CPUs ({p['cpu']}), kernel {p['kernel']}; shared and noisy. Load average
  (1/5/15 min) after the build, before the first measurement: {p['load_at_start']}; at the end:
  {p.get('load_at_end', 'n/a')}. Load generator, emulator and proxy all run on this machine, and
  so may other people's builds and tests: a load average well above what this benchmark puts
  on the machine means it had company.
- Versions: {p['sluice']}; {p['rustc']}; {p['haproxy']}; {p['nginx']}.{before_version}
- Scenarios: {p.get("scenarios", "surge")}. Wall time of the whole script (build included):
  {p['wall_seconds']} s{wall_split}. Run 2 of a scenario visits its targets in reverse order.

## Scenarios (exact parameters)

"""
    surge_scenario = f"""### Surge

- **Backend**: `legacy-emu --workers {p['workers']} --service-time {p['service_time']}
  --lockup-above {p['lockup_above']} --lockup-duration {p['lockup_duration']}`: capacity
  {p['workers']} × 1 / {p['service_time']} = **{cap:,} tx/s**; locks up (answers nothing) for
  {p['lockup_duration']} whenever more than {p['lockup_above']} requests are inside. A fresh
  emulator process per target and per measurement.
- **Load**: `terminals --terminals {p['terminals']} --conn-mode per-transaction --http mixed
  --rate {p['rate']} --duration {p['bench_seconds']}s --timeout {p['client_timeout']}`: all
  {p['terminals']:,} terminals start at once, one TCP connection per transaction, half HTTP/1.0
  and half HTTP/1.1 (`Connection: close`), {p['rate']:,} tx/s offered in total
  (1.5 × capacity) for {p['bench_seconds']} s. Each terminal has at most one transaction
  outstanding; a late terminal fires its next one as soon as the previous ends.
- **Targets**, each allowed at most {p['max_inflight']} requests (and connections) at the
  backend, {p['proxy_threads']} threads/workers:
  - *direct*: the terminals hit the emulator itself.
  - *sluice*: `sluice run --max-inflight {p['max_inflight']} --max-queue {p['max_queue']}
    --queue-timeout {p['queue_timeout']} --threads {p['proxy_threads']}`, everything else at its
    default (see `sluice check` below: this includes the slow-start ramp, if the build has one,
    and its active health check, which sends the backend a `GET /` every few seconds).
{before_bullet}  - *sluice, slow start off*: the same plus `--slow-start 0s` (run only if the build has the
    flag): sluice starts admitting {p['max_inflight']} at once instead of ramping up.
  - *HAProxy*: `server … maxconn {p['max_inflight']} maxqueue {p['max_queue']}`,
    `timeout queue {p['queue_timeout']}`, `http-reuse always`, `option http-keep-alive`,
    `nbthread {p['proxy_threads']}`, global and frontend `maxconn {p['haproxy_maxconn']}`
    (10,000 capped by the open-file limit: HAProxy needs 2 × maxconn descriptors).
  - *nginx*: upstream `server … max_conns={p['max_inflight']}; keepalive {p['max_inflight']};`
    with `zone` (without a shared-memory zone `max_conns` is per worker, i.e. 64 in total),
    `proxy_http_version 1.1; proxy_set_header Connection "";`, `worker_processes
    {p['proxy_threads']}`, `worker_connections 10000`, `listen … backlog=4096`. Open-source nginx
    has **no queue**: a request that finds all {p['max_inflight']} upstream slots busy gets
    `502` at once. That is the honest comparison for nginx, not a misconfiguration.
- **Calibration**: `terminals --terminals {p['max_inflight']} --conn-mode keep-alive --http 1.1
  --duration {p['ceiling_seconds']}s` (closed loop) straight at a fresh emulator: the most this
  emulator really serves with {p['max_inflight']} busy connections on this machine.
- **Memory per idle client connection** (per proxy, fresh proxy and emulator): warm up with 64
  connections (closed again), wait for RSS to settle, record RSS (sum of `VmRSS` over the proxy
  and all its child processes); open {p['idle_conns']:,} HTTP/1.1 keep-alive connections with
  `tests/bench/idle_conns.py`, each completing one `GET` (16 in flight at a time) and then
  staying open and idle; wait for RSS to settle, record it again; report (after − before) ÷
  {p['idle_conns']:,} ("first N"). Then, 3 s later (past sluice's 100 ms park delay), record RSS,
  open {p['idle_conns']:,} more the same way, wait 3 s and for RSS to settle, and report that
  growth ÷ {p['idle_conns']:,} ("next N, warm"): the cost of one more idle terminal in a process
  that has been serving. sluice holds pingora's stream (≈ 2.5 KiB) through a connection's first
  100 ms of idle and then waits on the bare socket; the allocator keeps what is freed for the
  next connections, so the first figure also holds the streams of the last connections opened.

"""
    calib_only = f"""### Calibration

- `terminals --terminals {p['max_inflight']} --conn-mode keep-alive --http 1.1
  --duration {p['ceiling_seconds']}s` (closed loop) straight at a fresh emulator (`legacy-emu
  --workers {p['workers']} --service-time {p['service_time']}`): the most this emulator really
  serves with {p['max_inflight']} busy connections on this machine. The restart scenario offers
  a fraction of it.

"""
    surge_reading = f"""### Surge

- **goodput ok/s**: `200` responses with the right transaction id, divided by the load
  generator's elapsed time (the {p['bench_seconds']} s of offered load plus the tail in which
  outstanding transactions finish). **% of 1,600/s** is the same number against the backend's
  nominal capacity; because goodput is `ok ÷ elapsed`, it is also `ok` as a share of what the
  backend could have done over the elapsed time (1,600 × elapsed). **% of measured ceiling**
  compares with the calibration row of the same run, which shows how much of 1,600/s the
  emulator itself delivers here (tokio timer granularity on a busy 2-CPU machine makes each
  "20 ms" a little longer).
{ceiling_note}- **responses by status**: `503` = shed by the proxy (queue full or queue deadline), `502` =
  nginx found no free upstream slot (or the upstream failed), `504` = upstream timeout.
  **client errors**: connect failures, I/O errors (reset / closed without a response) and
  client-side timeouts ({p['client_timeout']} per transaction). **mismatched**: a response
  carrying another transaction's id or body; must be 0.
- **nginx's goodput** is low for a structural reason: its `502` comes back within a
  millisecond, so terminals never fall out of step. All {p['terminals']:,} fire together every
  {p['terminals'] / p['rate']:.2f} s ({p['terminals']:,} ÷ {p['rate']:,} tx/s) and only the
  requests that find one of the {p['max_inflight']} slots free in that instant succeed. A
  queueing proxy (sluice, HAProxy) absorbs each burst and keeps the backend busy in between.
- **sluice vs "sluice, slow start off"**: every target is started fresh and the surge begins
  the moment it is listening. sluice's default slow start then admits only a fraction of
  `max_inflight` for the first seconds and ramps up (see `sluice check` below), while the queue
  fills; that costs goodput and latency in a run this short, and nothing once the ramp is over.
  Measured here:
{os.linesep.join(ramp_lines) if ramp_lines else "  (not measured: this sluice build has no slow start, or the target was skipped)"}
{haproxy_note}- **backend max concurrency** is the emulator's `max_inside`: the most requests inside it at
  once. Above {p['lockup_above']} it locks up; **backend lock-ups** counts those episodes.
  **backend conns accepted** is how many TCP connections the backend accepted during the load
  (one per transaction when hit directly; a pooled proxy needs about {p['max_inflight']}).
  **backend max open conns**: most connections open at once. Both exclude the one connection
  used to read the statistics.
- **p50 / p99 ms**: latency of successful transactions, connect included, as a terminal sees it.
  With 2,000 terminals and 1,600/s capacity, queueing alone makes ≈ 2,000 ÷ 1,600 ≈ 1.25 s
  the expected steady-state latency for a proxy that queues.
- **proxy CPU s / backend CPU s**: CPU time the proxy (all its processes) and the emulator used
  during the surge. The machine has only {p['nproc']} CPUs shared by the load generator (which
  opens ~2,400 connections/s), the proxy and the emulator, so CPU spent in one slows the others.
  **proxy peak RSS**: sum of `VmHWM` over the proxy's processes at the end of the surge.
- **KiB per idle conn**: growth of the proxy's resident memory (user space: heap, stacks,
  buffers) per idle keep-alive client connection; kernel socket buffers are not in RSS and are
  the same for every proxy. RSS moves in whole pages and allocators keep freed memory, so treat
  differences under ~1 KiB as noise. "at the end" shows how many connections were still open
  when the measurement ended (a proxy that closed idle connections early would look cheaper).
- **Noise**: the machine is shared, so expect a few percent of run-to-run variation in goodput
  and latency; compare targets within a run first. Between the runs of this file:
{os.linesep.join(noise_lines) if noise_lines else "  (only one run)"}

"""
    doc = "".join([
        doc,
        surge_scenario if surge_ran else calib_only,
        rs["scenario"] if rs else "",
        tables_md,
        "\n\n## Reading the results\n\n",
        surge_reading if surge_ran else "",
        rs["reading"] if rs else "",
        "## Configurations used\n\n",
        os.linesep.join(configs),
        "\n",
    ])
    with open(out_path, "w") as f:
        f.write(doc)


if __name__ == "__main__":
    main()
