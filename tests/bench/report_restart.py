"""The restart scenario's part of the report (used by report.py). Standard library only.

Reads, per run and target t, the files run.sh leaves in the results directory, where the run's key
is r<n> (terminal start times spread over one firing interval: steady arrivals) or b<n> (all
terminals start at once: lock-step bursts):

- `restart-{key}-{t}.terminals.json`: the load generator's report, with the ids of the `ok`
  transactions (`--record-ids`);
- `restart-{key}-{t}.emu.json`: the emulator's stats at the end of the load (reset just before it,
  kept across the crash and the restart);
- `restart-{key}-{t}.timeline.jsonl`: the emulator's stats every 250 ms on its clock (started
  with the load), with the `clock` (epoch), `down` and `up` events;
- `restart-{key}-{t}.txns.txt`: every transaction id that reached the emulator, in order,
  duplicates kept;
- `restart-{key}-{t}.probe.jsonl`: the proxy's view of the backend every 250 ms (state, cap,
  in flight, queue);
- `restart-{key}-{t}.proxy.json`: the proxy's counters at the end (sluice's request outcomes,
  HAProxy's `show stat`);
- `restart-{key}-{t}.proxy.err`: the proxy's stderr.
"""

import json
import os
import re
import statistics
from collections import Counter

# sluice-before: the sluice target run with an earlier build's binary (BENCH_SLUICE_BEFORE).
TARGETS = ["direct", "sluice", "sluice-before", "haproxy", "haproxy-noredispatch"]
SLUICES = ("sluice", "sluice-before")
LABEL = {"haproxy-noredispatch": "haproxy, no redispatch"}
# Seconds on the clock shown in the per-second throughput table.
FIRST_SECOND, LAST_SECOND = 9, 26


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def load_lines(path):
    try:
        with open(path) as f:
            return [json.loads(l) for l in f if l.strip()]
    except (OSError, ValueError):
        return None


def read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def secs(text):
    """'10s' / '250ms' -> seconds."""
    m = re.fullmatch(r"([0-9.]+)(ms|s)", text)
    return float(m.group(1)) / (1000.0 if m.group(2) == "ms" else 1.0)


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def statuses(by_status):
    if not by_status:
        return "–"
    return " ".join(f"{k}: {v:,}" for k, v in sorted(by_status.items(), key=lambda kv: int(kv[0])))


def before_after_rows(runs, specs, label=str, median_of=None):
    """Rows of "sluice / sluice-before" ratios: one per run, each cell `ratio× (after vs before)`
    for one spec (value_of(run, target), format of the values); then, over the runs in median_of
    (default: all) if there are several, a row of the median ratios."""
    rows, ratios = [], [[] for _ in specs]
    for r in runs:
        row = [label(r)]
        for i, (value_of, f) in enumerate(specs):
            a, b = value_of(r, "sluice"), value_of(r, "sluice-before")
            if a is None and b is None:
                row.append("–")
                continue
            q = a / b if a is not None and b else None
            if q is not None and (median_of is None or r in median_of):
                ratios[i].append(q)
            row.append(f"{q:.2f}× ({fmt(a, f)} vs {fmt(b, f)})" if q is not None
                       else f"– ({fmt(a, f)} vs {fmt(b, f)})")
        rows.append(row)
    n = len(runs if median_of is None else median_of)
    if n > 1:
        rows.append(["**median**"] + [f"**{statistics.median(q):.2f}×**" if q else "–"
                                      for q in ratios])
    return rows


def per_second(samples):
    """Backend completions in each whole second (t-1, t] of the clock, from the 250 ms samples."""
    at = {}
    for x in samples:
        s = round(x["t_ms"] / 1000.0)
        if abs(x["t_ms"] / 1000.0 - s) < 0.1 and s not in at:
            at[s] = x
    return {s: at[s]["requests"] - at[s - 1]["requests"] for s in sorted(at) if s - 1 in at}


def classify_sluice_log(text):
    """Counts of pingora's "Fail to proxy" lines by kind, and sluice's own backend messages."""
    kinds = Counter()
    notes = []
    for line in (text or "").splitlines():
        m = re.search(r"Fail to proxy: (\w+ \w+).*?(?:status: (\d+), )?tries: \d+, retry: (\w+), "
                      r"(\w+) ([^\s,]+)", line)
        if m:
            err, status, retry, method, path = m.groups()
            path = path.split("?")[0]
            what = ("sluice's health probe GET /" if (method, path) == ("GET", "/")
                    else f"{method} {path}")
            outcome = f"answered {status}" if status else (
                "requeued (nothing reached the backend)" if retry == "true" else "no status")
            kinds[(what, err, outcome)] += 1
        elif "sluice::" in line:
            notes.append(re.sub(r"^\[\S+ +\w+ +\S+\] ", "", line).strip())
    return kinds, notes


def classify_haproxy_log(text):
    out = Counter()
    for line in (text or "").splitlines():
        line = re.sub(r"\s+", " ", re.sub(r"\(\d+\) : ", "", line)).strip()
        line = re.sub(r",? check duration: \d+ms\.?", ".", line)
        line = re.sub(r" \d+ active and \d+ backup servers (left|online)\.", "", line)
        if line:
            out[line] += 1
    return out


def collect(res, key, t, rate):
    pre = os.path.join(res, f"restart-{key}-{t}")
    term, emu = load(pre + ".terminals.json"), load(pre + ".emu.json")
    if not term or not emu:
        return None
    d = {"t": term, "e": emu}
    sent, ok = term["sent"], term["ok"]
    non200 = sum(v for k, v in term["by_status"].items() if k != "200")
    client = term["errors_connect"] + term["errors_io"] + term["errors_timeout"]
    # A 200 with the wrong id is counted in by_status as 200 and in mismatched.
    d["failed"] = non200 + client + min(term["mismatched"], term["by_status"].get("200", 0))
    d["failed_pct"] = 100.0 * d["failed"] / sent if sent else None
    d["unaccounted"] = sent - ok - d["failed"]

    ids_text = read(pre + ".txns.txt")
    if ids_text is not None:
        ids = ids_text.split()
        counts = Counter(ids)
        seen = set(counts)
        ok_ids = set(term.get("ok_ids") or [])
        d["arrivals"] = len(ids)
        d["distinct"] = len(seen)
        d["dup_ids"] = sum(1 for n in counts.values() if n > 1)
        d["dup_examples"] = [i for i, n in counts.items() if n > 1][:5]
        d["seen_not_ok"] = len(seen - ok_ids) if ok_ids else None
        d["ok_not_seen"] = len(ok_ids - seen) if ok_ids else None

    tl = load_lines(pre + ".timeline.jsonl") or []
    ev = {x["event"]: x for x in tl if "event" in x}
    samples = [x for x in tl if "event" not in x]
    d["events"] = ev
    d["per_second"] = per_second(samples)
    if "up" in ev and samples:
        up_ms = ev["up"]["t_ms"]
        up_s = up_ms / 1000.0
        # Cold ramp window: from the restart until all workers are back. Nothing is served while
        # the emulator is down, so the last sample before the restart is the baseline.
        before = [x for x in samples if x["t_ms"] <= up_ms]
        after = [x for x in samples if x["t_ms"] > up_ms and x.get("running", True)]
        most = max(x["workers_now"] for x in samples)
        k = next((i for i, x in enumerate(after) if x["workers_now"] == most), None)
        if before and k is not None:
            full = after[k]
            pts = [(up_ms, ev["up"].get("workers_now", after[0]["workers_now"]))]
            pts += [(x["t_ms"], x["workers_now"]) for x in after[:k + 1]]
            d["ramp_window"] = (up_s, full["t_ms"] / 1000.0)
            d["ramp_done"] = full["requests"] - before[-1]["requests"]
            d["ramp_worker_s"] = sum(a[1] * (b[0] - a[0]) for a, b in zip(pts, pts[1:])) / 1000.0
        # First whole second after the restart in which the backend completed >= 90 % of the
        # offered rate.
        back = [s for s, n in d["per_second"].items() if s > up_s and n >= 0.9 * rate]
        d["back_at"] = back[0] if back else None

    probe = load_lines(pre + ".probe.jsonl")
    if probe and "clock" in ev:
        t0 = ev["clock"]["epoch_ms"]
        down_at = up_at = None
        for x in probe:
            st = str(x.get("state") or "")
            ts = (x["epoch_ms"] - t0) / 1000.0
            if down_at is None and ts > 0 and st.lower().startswith("down"):
                down_at = (ts, x.get("queued"))
            elif down_at is not None and up_at is None and st.lower() == "up":
                up_at = (ts, x.get("limit"), x.get("queued"))
        d["probe_down"] = down_at
        d["probe_up"] = up_at
        d["max_queued"] = max((x.get("queued") or 0) for x in probe if "error" not in x)
        d["probe_errors"] = sum(1 for x in probe if "error" in x)
    d["proxy"] = load(pre + ".proxy.json")
    err = read(pre + ".proxy.err")
    if t in SLUICES:
        d["log_kinds"], d["log_notes"] = classify_sluice_log(err)
    elif t.startswith("haproxy"):
        d["log_lines"] = classify_haproxy_log(err)
    d["emu_err"] = read(pre + ".emu.err")
    return d


def fmt(x, f="{:,}"):
    return f.format(x) if x is not None else "–"


def section(res, p):
    rp = p["restart"]
    # (key, label) per run: steady-arrival runs, then the all-at-once (burst) runs.
    runs = [(f"r{n}", str(n)) for n in range(1, rp["runs"] + 1)]
    runs += [(f"b{n}", f"{n}, all at once") for n in range(1, rp.get("burst_runs", 0) + 1)]
    label_of = dict(runs)
    runs = [k for k, _ in runs]
    targets = [t for t in TARGETS if t in rp["targets"].split()]
    rate = rp["rate"]
    data = {}
    for r in runs:
        for t in targets:
            d = collect(res, r, t, rate)
            if d:
                data[(r, t)] = d

    # ---- main table
    rows = []
    for r in runs:
        for t in targets:
            d = data.get((r, t))
            if not d:
                rows.append([label_of[r], t, "(missing)"] + [""] * 15)
                continue
            tt, e = d["t"], d["e"]
            rows.append([
                label_of[r], f"**{LABEL.get(t, t)}**", fmt(tt["sent"]), fmt(tt["ok"]),
                f"**{d['failed']:,} ({d['failed_pct']:.2f} %)**",
                statuses(tt["by_status"]),
                f"{tt['errors_connect']}/{tt['errors_io']}/{tt['errors_timeout']}",
                tt["mismatched"],
                e["lockups"], e["max_inside"],
                f"{tt['latency_ok']['p50_ms']:,.0f}", f"{tt['latency_ok']['p99_ms']:,.0f}",
                f"{tt['latency_ok']['max_ms']:,.0f}",
                fmt(d.get("arrivals")), fmt(d.get("dup_ids")),
                fmt(d.get("seen_not_ok")), fmt(d.get("ok_not_seen")),
            ])
    main_table = table(
        ["run", "target", "sent", "ok", "failed (non-200 + client errors), % of sent",
         "responses by status", "client errors conn/io/timeout", "mismatched",
         "backend lock-ups", "backend max concurrency", "p50 ms", "p99 ms", "max ms",
         "tx arrivals at backend", "tx ids at the backend twice or more",
         "reached backend, client got no 200", "200 at client, never at backend"],
        rows)

    # ---- the outage, second by second
    secs_range = list(range(FIRST_SECOND, LAST_SECOND + 1))
    ps_rows = []
    for r in runs:
        for t in targets:
            d = data.get((r, t))
            if not d:
                continue
            ps = d["per_second"]
            ps_rows.append([label_of[r], LABEL.get(t, t)] + [fmt(ps.get(s)) for s in secs_range])
    # The emulator's workers in each second (same schedule for every target): from run 1.
    w_row = None
    for t in targets:
        tl = load_lines(os.path.join(res, f"restart-{runs[0]}-{t}.timeline.jsonl")) if runs else None
        if tl:
            smp = [x for x in tl if "event" not in x]
            w = {}
            for x in smp:
                s = round(x["t_ms"] / 1000.0)
                if abs(x["t_ms"] / 1000.0 - s) < 0.1 and s not in w:
                    w[s] = ("down" if not x.get("running", True) else x["workers_now"])
            w_row = ["", "*emulator workers at t*"] + [str(w.get(s, "–")) for s in secs_range]
            break
    ps_table = table(["run", "target"] + [f"{s - 1}–{s} s" for s in secs_range],
                     ps_rows + ([w_row] if w_row else []))

    # ---- the proxy's view and the cold ramp
    view_rows = []
    for r in runs:
        for t in targets:
            d = data.get((r, t))
            if not d:
                continue
            ev = d["events"]
            down = ev.get("down", {})
            up = d.get("probe_up")
            rw = d.get("ramp_window")
            view_rows.append([
                label_of[r], LABEL.get(t, t),
                f"{ev['down']['t_ms'] / 1000:.2f} s → {ev['up']['t_ms'] / 1000:.2f} s"
                if "down" in ev and "up" in ev else "–",
                f"{down.get('inside_before', '–')} / {down.get('open_connections_before', '–')}",
                (f"{d['probe_down'][0]:.2f} s ({d['probe_down'][1]} queued)"
                 if d.get("probe_down") else "–"),
                f"{up[0]:.2f} s (cap {up[1]}, {up[2]} queued)" if up else "–",
                fmt(d.get("max_queued")),
                (f"{d['ramp_done']:,} in {rw[0]:.1f}–{rw[1]:.1f} s "
                 f"({100.0 * d['ramp_done'] / (d['ramp_worker_s'] / secs(p['service_time'])):.0f} % of "
                 f"the cold capacity)") if rw and d.get("ramp_worker_s") else "–",
                f"{d['back_at'] - 1}–{d['back_at']} s" if d.get("back_at") else "not within the run",
            ])
    view_table = table(
        ["run", "target", "backend down → listening again (emulator clock)",
         "requests inside / connections dropped by the crash",
         "proxy marked it down (±0.25 s)", "proxy marked it up again (±0.25 s)",
         "most requests queued in the proxy", "completed during the cold ramp",
         "first second back at ≥ 90 % of offered"],
        view_rows)

    # ---- why requests failed: the proxies' own accounts
    why = []
    for r in runs:
        for t in targets:
            d = data.get((r, t))
            if not d or t == "direct":
                continue
            px = d.get("proxy") or {}
            if t in SLUICES:
                m = px.get("metrics", {})
                outc = {re.search(r'outcome="(\w+)"', k).group(1): int(v) for k, v in m.items()
                        if k.startswith("sluice_requests_total")}
                conns = {re.search(r'reused="(\w+)"', k).group(1): int(v) for k, v in m.items()
                         if k.startswith("sluice_upstream_connections_total")}
                kinds = "; ".join(f"{n} × {w}: {e} → {o}" for (w, e, o), n in
                                  sorted(d.get("log_kinds", {}).items(), key=lambda kv: -kv[1]))
                notes = "; ".join(f"{n} × “{l}”" for l, n in Counter(d.get("log_notes", [])).items())
                why.append(f"- run {label_of[r]}, **{t}**: outcomes (`sluice_requests_total`): "
                           + ", ".join(f"{k} {v:,}" for k, v in sorted(outc.items()))
                           + f"; upstream connections opened {conns.get('false', 0)}, reused "
                           f"{conns.get('true', 0):,}. Its log: {kinds or 'no proxy errors'}"
                           + (f"; {notes}" if notes else "") + ".")
            else:
                s, b = px.get("legacy", {}), px.get("BACKEND", {})
                keys = ["hrsp_5xx", "econ", "eresp", "wretr", "wredis", "cli_abrt", "srv_abrt",
                        "qmax"]
                lines = "; ".join(f"{n} × “{l}”" if n > 1 else f"“{l}”"
                                  for l, n in d.get("log_lines", {}).items())
                why.append(f"- run {label_of[r]}, **{LABEL.get(t, t)}**: `show stat` (backend) "
                           + ", ".join(f"{k} {b.get(k) or 0}" for k in keys)
                           + f"; server checks down {s.get('chkdown') or 0} time(s), downtime "
                           f"{s.get('downtime') or 0} s. Its log: {lines or '(empty)'}.")

    # ---- targets
    def col(t, f):
        return [f(data[(r, t)]) for r in runs if (r, t) in data]

    def verdict(vals, ok):
        if not vals:
            return "not measured"
        return "**met**" if all(ok(v) for v in vals) else "**not met**"

    trows = []
    if "sluice" in targets:
        lock = col("sluice", lambda d: d["e"]["lockups"])
        failed = col("sluice", lambda d: d["failed_pct"])
        dup = col("sluice", lambda d: d.get("dup_ids"))
        trows += [
            ["sluice: 0 backend lock-ups", ", ".join(map(str, lock)), verdict(lock, lambda v: v == 0)],
            ["sluice: failed transactions ≤ 1 % of sent", ", ".join(f"{v:.2f} %" for v in failed),
             verdict(failed, lambda v: v <= 1.0)],
            ["sluice: no transaction reaches the backend twice",
             ", ".join(fmt(v) for v in dup), verdict(dup, lambda v: v == 0)],
        ]
    for t in [x for x in targets if x != "sluice"]:
        failed = col(t, lambda d: d["failed_pct"])
        trows.append([f"(for comparison) {LABEL.get(t, t)}: failed transactions",
                      ", ".join(f"{v:.2f} %" for v in failed), "–"])
    target_table = table(["target", "measured (per run)", "verdict"], trows)

    # ---- this build against the earlier one (BENCH_SLUICE_BEFORE), run by run
    before_md = []
    if "sluice" in targets and "sluice-before" in targets:
        def v(f):
            def value_of(r, t):
                d = data.get((r, t))
                return f(d) if d else None
            return value_of

        def since_up(d, at):
            ev = d["events"]
            return at - ev["up"]["t_ms"] / 1000.0 if at is not None and "up" in ev else None

        before_md = [
            "### sluice / sluice-before (this build ÷ the earlier one, same run)",
            table(["run", "failed", "p99 ms", "max ms", "completed during the cold ramp",
                   "back at ≥ 90 % of offered, s after the restart",
                   "marked up again, s after the restart"],
                  before_after_rows(runs, [
                      (v(lambda d: d["failed"]), "{:,}"),
                      (v(lambda d: d["t"]["latency_ok"]["p99_ms"]), "{:,.0f}"),
                      (v(lambda d: d["t"]["latency_ok"]["max_ms"]), "{:,.0f}"),
                      (v(lambda d: d.get("ramp_done")), "{:,}"),
                      (v(lambda d: since_up(d, d.get("back_at"))), "{:.1f}"),
                      (v(lambda d: since_up(d, (d.get("probe_up") or [None])[0])), "{:.2f}"),
                  ], label=lambda r: label_of[r], median_of=[r for r in runs if r.startswith("r")])),
            "The median is over the steady-arrival runs. \"back at ≥ 90 %\" ends a whole second "
            "of the emulator's clock, so it moves in steps of 1 s.",
        ]

    tables = "\n\n".join([
        "## Results: restart",
        f"### Restart: {rp['terminals']} keep-alive terminals at {rp['rate']:,} tx/s, backend crash "
        f"at {rp['outage_at']} for {rp['outage_for']}, cold restart",
        main_table,
        f"### Backend completions per second (emulator clock; crash at {rp['outage_at']}, back at "
        f"{secs(rp['outage_at']) + secs(rp['outage_for']):g} s, cold)",
        ps_table,
        "### The outage as the proxies saw it",
        view_table,
        "### Why transactions failed (the proxies' counters and logs)",
        "\n".join(why) if why else "(no proxy targets)",
        "### Targets for sluice (restart)",
        target_table,
        *before_md,
    ])

    rate_how = (f"0.9 × the measured ceiling ({rp['ceiling']:,} ok/s, the mean of this script "
                f"run's calibrations) = **{rp['rate']:,} tx/s**"
                if rp["rate_source"] == "ceiling" else
                f"**{rp['rate']:,} tx/s**, set with `BENCH_RESTART_RATE` (measured ceiling "
                f"{rp['ceiling']:,} ok/s)")
    before_bullet = ""
    if "sluice-before" in targets:
        before_bullet = ("  - *sluice-before* (`BENCH_SLUICE_BEFORE`): the *sluice* target exactly (same flags\n"
                         "    and config file), run with the earlier build's binary.\n")
    scenario = f"""### Restart

- **Backend**: `legacy-emu --workers {p['workers']} --service-time {p['service_time']}
  --lockup-above {p['lockup_above']} --lockup-duration {p['lockup_duration']}
  --cold-start-fraction {rp['cold_fraction']} --cold-start-duration {rp['cold_duration']}
  --outage-at {rp['outage_at']} --outage-for {rp['outage_for']} --clock sigusr1`: the emulator of
  the surge, which at {rp['outage_at']} on its clock **crashes** (listener closed, every
  connection dropped, the requests inside lost), stays down {rp['outage_for']}, then listens
  again on the same port **cold**: {rp['cold_fraction']:.0%} of its workers
  ({int(p['workers'] * rp['cold_fraction'])}), ramping linearly to all {p['workers']} over
  {rp['cold_duration']}, and still locking up above {p['lockup_above']} requests inside. The
  library applies the cold start at every start, so each emulator is started, left to warm up
  (all workers, and the proxy's own start-up ramp done), its counters reset, and then its clock
  is started by SIGUSR1 immediately before the load generator, so `t` on the emulator's clock
  is the load's time to within a few milliseconds. A fresh emulator and proxy per target.
- **Load**: `terminals --terminals {rp['terminals']} --conn-mode keep-alive --http 1.1
  --method post --rate {rp['rate']} --duration {rp['seconds']}s --timeout {rp['client_timeout']}
  --record-ids --ramp {rp['ramp_ms']}ms`: {rp['terminals']} terminals, each on one kept-alive
  connection (reconnecting when it is closed), POSTing payments with a unique transaction id;
  offered rate {rate_how} (90 % of the nominal {p['capacity']:,}/s would be
  {0.9 * p['capacity']:,.0f}, about 97 % of what the emulator really serves here, leaving no
  headroom to work off the backlog). Each terminal has at most one transaction outstanding and
  fires every {rp['terminals'] / rp['rate'] * 1000:.0f} ms (open loop); one that runs late fires
  the next at once.
  - **Runs 1, 2, …: steady arrivals.** `--ramp {rp['ramp_ms']}ms` spreads the terminals' start
    times over one firing interval, so transactions arrive evenly at {rp['rate']:,}/s: what
    "90 % of capacity" means.
  - **Runs "all at once"** ({rp.get('burst_runs', 0)} of them): the same command without
    `--ramp`. All {rp['terminals']} terminals then fire in lock-step, a burst of
    {rp['terminals']} every {rp['terminals'] / rp['rate'] * 1000:.0f} ms that queues almost all
    of them each time. What the crash finds, most terminals parked in a queue or most of them
    idle and about to fire into a dead backend, then depends on the phase of the bursts at
    {rp['outage_at']}, i.e. on the exact rate and timing rather than on the proxy. These runs
    show what lock-step load does to the picture; rank the proxies on the steady runs.
- **Targets**, each capped at {p['max_inflight']} requests at the backend, {p['proxy_threads']}
  threads, queue {p['max_queue']} for at most {p['queue_timeout']}, active HTTP health check
  `GET /` every {rp['health_interval']} (timeout {rp['health_timeout']}), down after {rp['fall']}
  failures, up after {rp['rise']} passes, and a {rp['slow_start']} slow start when the backend
  comes back:
  - *sluice*: `sluice run --max-inflight {p['max_inflight']} --max-queue {p['max_queue']}
    --queue-timeout {p['queue_timeout']}` with the config file below (`[health] check="http"
    interval="{rp['health_interval']}" timeout="{rp['health_timeout']}" rise={rp['rise']}
    fall={rp['fall']} passive_failures=1`, `[slow_start] duration="{rp['slow_start']}"
    initial={rp['slow_start_initial']}`, admin on a free port, access log off). sluice's health
    probes travel through its own admission, inside the cap.
{before_bullet}  - *haproxy*: `server … maxconn {p['max_inflight']} maxqueue {p['max_queue']} check inter
    {rp['health_interval']} fall {rp['fall']} rise {rp['rise']} slowstart {rp['slow_start']}`,
    `option httpchk GET /`, `http-check expect status 200-499`, `timeout check {rp['health_timeout']}`, `timeout queue
    {p['queue_timeout']}`, `http-reuse always`, `option http-keep-alive`, **`option redispatch`**
    and `retries 3` (HAProxy's default count), `retry-on` left at its default `conn-failure`:
    HAProxy then re-sends only a request whose connection could not be established, which never
    reached the server, so a POST is never sent twice. `slowstart` ramps the server's maxconn
    from 1 to {p['max_inflight']}. HAProxy's health checks do not count against `maxconn`.
  - *haproxy, no redispatch* (only if listed in `BENCH_RESTART_TARGETS`): the same without
    `option redispatch`, which is HAProxy's default.
  - *direct* (only if listed): the terminals hit the emulator itself, for reference.
- **What the backend numbers cover**: the emulator's counters are reset right after warm-up,
  just before the load, and its `stop`/`restart` keep them: totals and maxima (requests,
  maximum concurrency, lock-ups, connections) cover the whole load, before, during and after
  the crash. So does the list of transaction ids that reached it, which the emulator process
  writes out at exit (`--transactions-out`; the stats endpoint only has counts); health checks
  carry no id and are not in it, but they are in `requests` and in the maximum concurrency.

"""

    reading = f"""### Restart

- **failed** = responses other than `200` plus client errors (connect / I/O / timeout) plus
  `200`s with the wrong id, as a count and as a share of **sent** (transactions started).
  Every failure here is a payment the terminal must treat as unknown.
- **tx arrivals at backend**: transaction ids that got inside the emulator (health checks
  excluded). **tx ids at the backend twice or more** must be 0: that would be a payment sent
  twice, by a proxy retrying a POST. **reached backend, client got no 200**: ids the backend
  saw whose terminal got an error instead: with a crash these are the requests inside it when
  it died; a real server may or may not have committed them. **200 at client, never at
  backend** must be 0 (a sanity check of the bookkeeping).
- **Backend completions per second**: how many requests the emulator answered in each second
  of its clock (health checks included), from its own 250 ms samples. The last row shows how
  many workers it had: the cold start caps what any proxy can get through in the seconds after
  the restart. **completed during the cold ramp** compares what was served from the restart
  until all workers were back with what those workers could have served
  (Σ workers × time ÷ {p['service_time']}); the emulator's measured ceiling is a few percent
  under nominal, so ~90 % is the practical maximum.
- **proxy marked it down / up**: from polling sluice's `/status` (admin listener) or HAProxy's
  `show stat` (stats socket) every 250 ms, on the same clock. sluice's `passive_failures = 1`
  takes the backend down at the first refused connection, before any health check fails.
- **How each proxy fails** (what the counters and logs above show): the requests inside the
  emulator when it crashed are lost with it; sluice answers them `502` (pingora never re-sends a
  POST that may have reached the backend); HAProxy closed their client connections without a
  response in these runs, hence its I/O errors. Everything else waits in sluice's queue while the backend is down, within its
  {p['queue_timeout']} queue timeout, and is served after the restart. HAProxy keeps the
  requests already queued when it marks the server down, but answers `503` at once to every
  request that arrives while the server is down (counted in `econ`); a terminal that got one
  fires again at its next interval and gets another. How many failures that makes depends on how
  many terminals were idle, rather than parked in the queue, when the server was marked down.
- **latency** includes the outage: a transaction that waited in a proxy's queue through the
  crash shows it in p99 and max.

"""
    configs = []
    for name, lang in [("restart-sluice.command.txt", "sh"), ("restart-sluice.toml", "toml"),
                       ("restart-sluice.check.txt", "text"),
                       ("restart-sluice-before.check.txt", "text"), ("restart-haproxy.cfg", "")]:
        text = read(os.path.join(res, name))
        if text is not None:
            configs.append(f"`{name}` (restart scenario, run 1; ports differ per run):\n\n"
                           f"```{lang}\n{text.rstrip()}\n```")
    return {"tables": tables, "scenario": scenario, "reading": reading, "configs": configs}
