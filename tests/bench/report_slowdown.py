#!/usr/bin/env python3
"""The slowdown scenario's report: tables in Markdown and one SVG plot per kind of slowdown.

    report_slowdown.py RESULTS_DIR OUT.md

Writes OUT.md and, next to it, `slowdown-<how>.svg` (how: service-time, workers), and prints
the tables to stdout. Standard library only (the SVG is written by hand).

Reads `params.json` and, per kind of slowdown `how` and target `t`, the files run.sh leaves in
the results directory:

- `slowdown-{how}-{t}.terminals.json`: the load generator's report;
- `slowdown-{how}-{t}.emu.json`: the emulator's stats at the end of the load (reset just
  before it);
- `slowdown-{how}-{t}.timeline.jsonl`: the emulator's stats every 100 ms on its clock
  (started with the load), with the `clock` (epoch), `slow` and `recovered` events;
- `slowdown-{how}-{t}.probe.jsonl`: the proxy's view every 100 ms (sluice: /status, its
  effective limit included; HAProxy: show stat), stamped with the epoch;
- `slowdown-{how}-{t}.{sluice.toml,haproxy.cfg}`: the configuration used.
"""

import json
import os
import sys

from report_restart import load, load_lines, read, secs, statuses, table

TARGETS = ["sluice", "sluice-adaptive", "haproxy"]
LABEL = {
    "sluice": "sluice (defaults)",
    "sluice-adaptive": "sluice, admission.adaptive = true",
    "haproxy": "HAProxy (maxconn 32)",
}
HOW = {
    "service-time": "the service time doubles (20 → 40 ms; all 32 workers stay)",
    "workers": "half the workers go (32 → 16; the service time stays 20 ms)",
}
COLOURS = {"inside": "#1f77b4", "limit": "#d62728", "workers": "#7f7f7f", "queued": "#2ca02c"}


def fmt_int(x):
    return f"{x:,}" if x is not None else "–"


def fmt_ms(x):
    return f"{x:,.0f}" if x is not None else "–"


class Run:
    """One target's run under one kind of slowdown."""

    def __init__(self, res, how, target, cap, seconds):
        tag = f"slowdown-{how}-{target}"
        self.target = target
        self.term = load(os.path.join(res, tag + ".terminals.json"))
        self.emu = load(os.path.join(res, tag + ".emu.json"))
        timeline = load_lines(os.path.join(res, tag + ".timeline.jsonl")) or []
        probe = load_lines(os.path.join(res, tag + ".probe.jsonl")) or []
        self.cap = cap
        clock = next((x for x in timeline if x.get("event") == "clock"), None)
        epoch = clock["epoch_ms"] if clock else None
        self.slow = next((x["t_ms"] / 1000 for x in timeline if x.get("event") == "slow"), None)
        self.recovered = next(
            (x["t_ms"] / 1000 for x in timeline if x.get("event") == "recovered"), None)
        # Emulator samples: (t s, requests inside, workers, requests answered so far).
        # Up to a second after the load's end (the emulator samples on until it is stopped).
        horizon = seconds + 1
        self.emu_samples = [(x["t_ms"] / 1000, x["inside_now"], x["workers_now"], x["requests"])
                            for x in timeline
                            if "inside_now" in x and "t_ms" in x and x["t_ms"] / 1000 <= horizon]
        # Proxy samples on the emulator's clock: (t s, limit or None, in flight, queued).
        self.proxy_samples = []
        if epoch is not None:
            for x in probe:
                if "error" in x or "epoch_ms" not in x:
                    continue
                t = (x["epoch_ms"] - epoch) / 1000
                if t < 0 or t > horizon:
                    continue
                limit = x.get("limit") if isinstance(x.get("limit"), int) else None
                self.proxy_samples.append((t, limit, x.get("inflight"), x.get("queued")))
        self.end = max([s[0] for s in self.emu_samples] + [0])
        self.seconds = seconds

    def ok(self):
        return self.term is not None

    def rate(self, t0, t1):
        """Backend completions per second between t0 and t1 (nearest samples)."""
        s = self.emu_samples
        if not s:
            return None
        a = min(s, key=lambda x: abs(x[0] - t0))
        b = min(s, key=lambda x: abs(x[0] - t1))
        return (b[3] - a[3]) / (b[0] - a[0]) if b[0] > a[0] else None

    def mean_inside(self, t0, t1):
        v = [x[1] for x in self.emu_samples if t0 <= x[0] < t1]
        return sum(v) / len(v) if v else None

    def limits(self, t0, t1):
        return [x[1] for x in self.proxy_samples if t0 <= x[0] < t1 and x[1] is not None]

    def queued_max(self, t0, t1):
        v = [x[3] for x in self.proxy_samples if t0 <= x[0] < t1 and x[3] is not None]
        return max(v) if v else None

    def drained(self):
        """Seconds from the recovery to the first sample with nothing queued in the proxy."""
        if self.recovered is None:
            return None
        for t, _, _, queued in self.proxy_samples:
            if t >= self.recovered and queued == 0:
                return t - self.recovered
        return None

    def back_at_cap(self):
        """Seconds from the recovery to the first sample at the cap (sluice only); 0 when the
        last sample before the recovery was at the cap already."""
        if self.recovered is None:
            return None
        before = [x[1] for x in self.proxy_samples if x[0] < self.recovered and x[1] is not None]
        if before and before[-1] == self.cap:
            return 0.0
        for t, limit, _, _ in self.proxy_samples:
            if t >= self.recovered and limit == self.cap:
                return t - self.recovered
        return None


def svg(runs, how, p, sd):
    """A hand-written SVG: one panel per target, the backend's concurrency (and workers) and the
    proxy's limit against time, the slowdown shaded."""
    width, panel_h, left, right, top, gap = 1000, 190, 52, 200, 52, 46
    cap = sd["max_inflight"]
    seconds = max([r.end for r in runs] + [sd["seconds"]])
    x_max = float(int(seconds / 5 + 1) * 5)
    y_max = max([cap] + [x[1] for r in runs for x in r.emu_samples] +
                [x[1] for r in runs for x in r.proxy_samples if x[1] is not None]) + 4
    y_max = float(int((y_max + 7) / 8) * 8)
    plot_w = width - left - right
    height = top + len(runs) * (panel_h + gap) + 10
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left}" y="20" font-size="15" font-weight="bold">Capacity halved from '
           f'{sd["slow_at"]} for {sd["slow_for"]}: {HOW[how]}</text>',
           f'<text x="{left}" y="38" font-size="12">{sd["terminals"]} keep-alive terminals '
           f'offering {sd["rate"]:,} tx/s ({sd["load_fraction"]} × the measured ceiling); every '
           f'proxy capped at {cap}; samples every {sd["sample_ms"]} ms</text>']
    for i, r in enumerate(runs):
        y0 = top + 16 + i * (panel_h + gap)

        def X(t):
            return left + plot_w * t / x_max

        def Y(v):
            return y0 + panel_h - panel_h * v / y_max

        t = r.term
        fails = (t["sent"] - t["ok"]) if t else None
        title = f'{LABEL.get(r.target, r.target)}'
        if t:
            title += (f': {fmt_int(t["sent"])} sent, {fmt_int(fails)} failed, '
                      f'p99 {t["latency_ok"]["p99_ms"]:,.0f} ms')
        out.append(f'<text x="{left}" y="{y0 - 6}" font-weight="bold">{title}</text>')
        if r.slow is not None and r.recovered is not None:
            out.append(f'<rect x="{X(r.slow):.1f}" y="{y0}" width="{X(r.recovered) - X(r.slow):.1f}" '
                       f'height="{panel_h}" fill="#fbe3e3"/>')
            out.append(f'<text x="{X(r.slow) + 4:.1f}" y="{y0 + 14}" fill="#a33">capacity halved</text>')
        out.append(f'<rect x="{left}" y="{y0}" width="{plot_w}" height="{panel_h}" fill="none" stroke="#999"/>')
        v = 0
        while v <= y_max:
            out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{Y(v):.1f}" y2="{Y(v):.1f}" stroke="#eee"/>')
            out.append(f'<text x="{left - 6}" y="{Y(v) + 4:.1f}" text-anchor="end">{v:.0f}</text>')
            v += 8
        s = 0
        while s <= x_max:
            out.append(f'<line x1="{X(s):.1f}" x2="{X(s):.1f}" y1="{y0 + panel_h}" y2="{y0 + panel_h + 4}" stroke="#999"/>')
            out.append(f'<text x="{X(s):.1f}" y="{y0 + panel_h + 16}" text-anchor="middle">{s:.0f}</text>')
            s += 5
        out.append(f'<text x="{left + plot_w}" y="{y0 + panel_h + 30}" text-anchor="end">'
                   f's on the emulator\'s clock (load starts at 0)</text>')

        def line(points, colour, dash="", step=False, w=1.6):
            if not points:
                return
            d = [f"M{X(points[0][0]):.1f},{Y(points[0][1]):.1f}"]
            for (ta, va), (tb, vb) in zip(points, points[1:]):
                if step:
                    d.append(f"H{X(tb):.1f}V{Y(vb):.1f}")
                else:
                    d.append(f"L{X(tb):.1f},{Y(vb):.1f}")
            dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
            out.append(f'<path d="{" ".join(d)}" fill="none" stroke="{colour}" stroke-width="{w}"{dash_attr}/>')

        line([(x[0], x[2]) for x in r.emu_samples], COLOURS["workers"], dash="6 4", step=True)
        line([(x[0], x[1]) for x in r.emu_samples], COLOURS["inside"], w=1.2)
        legend = [(COLOURS["inside"], "", "backend: requests inside"),
                  (COLOURS["workers"], "6 4", "backend: workers")]
        if r.target.startswith("sluice"):
            line([(x[0], x[1]) for x in r.proxy_samples if x[1] is not None], COLOURS["limit"], step=True, w=2)
            legend.append((COLOURS["limit"], "", "sluice: effective limit"))
        else:
            out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{Y(cap):.1f}" y2="{Y(cap):.1f}" '
                       f'stroke="{COLOURS["limit"]}" stroke-width="2" stroke-dasharray="2 3"/>')
            legend.append((COLOURS["limit"], "2 3", f"HAProxy: maxconn {cap}"))
        for k, (colour, dash, text) in enumerate(legend):
            ly = y0 + 14 + k * 18
            lx = left + plot_w + 12
            dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
            out.append(f'<line x1="{lx}" x2="{lx + 22}" y1="{ly - 4}" y2="{ly - 4}" stroke="{colour}" stroke-width="2"{dash_attr}/>')
            out.append(f'<text x="{lx + 28}" y="{ly}" font-size="11">{text}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    res, out_path = sys.argv[1], sys.argv[2]
    p = load(os.path.join(res, "params.json"))
    sd = p["slowdown"]
    cap = sd["max_inflight"]
    hows = sd["of"].split()
    targets = [t for t in TARGETS if t in sd["targets"].split()]
    slow_at, slow_for = secs(sd["slow_at"]), secs(sd["slow_for"])
    out_dir = os.path.dirname(os.path.abspath(out_path))

    sections, plots = [], []
    for how in hows:
        runs = [r for r in (Run(res, how, t, cap, sd["seconds"]) for t in targets) if r.ok()]
        if not runs:
            continue
        name = f"slowdown-{how}.svg"
        with open(os.path.join(out_dir, name), "w") as f:
            f.write(svg(runs, how, p, sd))
        plots.append(name)
        rows, rows2 = [], []
        for r in runs:
            t, e = r.term, r.emu or {}
            failed = t["sent"] - t["ok"]
            lat = t["latency_ok"]
            rows.append([
                LABEL.get(r.target, r.target), fmt_int(t["sent"]), fmt_int(t["ok"]),
                f"{fmt_int(failed)} ({100.0 * failed / max(t['sent'], 1):.2f} %)",
                statuses(t["by_status"]),
                f'{t["errors_connect"]}/{t["errors_io"]}/{t["errors_timeout"]}',
                fmt_ms(lat["p50_ms"]), fmt_ms(lat["p99_ms"]), fmt_ms(lat["max_ms"]),
                fmt_int(e.get("max_inside")), fmt_int(e.get("lockups")),
            ])
            s0 = r.slow if r.slow is not None else slow_at
            s1 = r.recovered if r.recovered is not None else slow_at + slow_for
            lim = r.limits(s0, s1)
            back = r.back_at_cap()

            def rate(a, b):
                x = r.rate(a, b)
                return f"{x:,.0f}" if x is not None else "–"

            mi = r.mean_inside(s0, s1)
            rows2.append([
                LABEL.get(r.target, r.target),
                rate(1, s0), rate(s0 + 1, s1), rate(s1 + 1, min(r.end, r.seconds) - 1),
                f"{mi:.1f}" if mi is not None else "–",
                (f"{min(lim)} / {sum(lim) / len(lim):.1f}" if lim else f"{cap} (static)"),
                (f"{back:.1f}" if back is not None else ("–" if r.target.startswith("sluice") else "n/a")),
                fmt_int(r.queued_max(s0, s1)),
                (f"{r.drained():.1f}" if r.drained() is not None else "–"),
            ])
        sections.append("\n\n".join([
            f"### Capacity halved: {HOW[how]}",
            table(["target", "sent", "ok", "failed", "responses by status",
                   "client errors c/io/t", "p50 ms", "p99 ms", "max ms",
                   "backend max inside", "backend lock-ups"], rows),
            table(["target", "backend ok/s before", "during", "after",
                   "backend mean inside during", "proxy limit during (min / mean)",
                   "limit back at cap (s after recovery)", "proxy queue max during",
                   "queue empty (s after recovery)"], rows2),
            f"![{name}]({name})",
        ]))
    tables = "\n\n".join(sections)
    print(tables)

    configs = []
    first = hows[0] if hows else None
    for t, fname, lang in [("sluice", "sluice.toml", "toml"), ("sluice-adaptive", "sluice.toml", "toml"),
                           ("haproxy", "haproxy.cfg", "")]:
        text = read(os.path.join(res, f"slowdown-{first}-{t}.{fname}")) if first else None
        if text:
            configs.append(f"`{LABEL[t]}` (ports differ per run):\n\n```{lang}\n{text.rstrip()}\n```")

    doc = f"""# sluice benchmark results: the slowdown scenario

Generated by `BENCH_SCENARIOS=slowdown bash tests/bench/run.sh` (or a run that included the
slowdown) on {p['date']}. Every number below comes from that run; re-running the scenario
overwrites this file and the plots. The surge and restart results are in
[`RESULTS.md`](RESULTS.md).

- Machine: {p['nproc']} CPUs ({p['cpu']}), kernel {p['kernel']}; shared and noisy. Load average
  (1/5/15 min) before the first measurement: {p['load_at_start']}; at the end:
  {p.get('load_at_end', 'n/a')}. Load generator, emulator and proxies all run on this machine.
- Versions: {p['sluice']}; {p['rustc']}; {p['haproxy']}.
- Wall time of the slowdown scenario: {p.get('slowdown_seconds_wall', 'n/a')} s.

## The scenario (exact parameters)

- **Backend**: `legacy-emu --workers {p['workers']} --service-time {p['service_time']}
  --lockup-above {p['lockup_above']} --lockup-duration {p['lockup_duration']} --slowdown
  {sd['slow_at']}:{sd['slow_for']}:{sd['factor']} --slowdown-of HOW --clock sigusr1`, warm (no
  cold start), a fresh process per target. Its clock starts with the load; at {sd['slow_at']}
  its capacity is divided by {sd['factor']} for {sd['slow_for']}, then restored. Two kinds of
  slowdown, one run each: `service-time` multiplies the service time by {sd['factor']} (the
  backend is slower; its {p['workers']} workers stay, so a cap of {cap} never queues inside it),
  `workers` divides its workers by {sd['factor']} (its threads are busy elsewhere; with a cap of
  {cap}, half the requests let in wait inside it for a worker).
- **Load**: `terminals --terminals {sd['terminals']} --conn-mode keep-alive --http 1.1 --rate
  {sd['rate']} --duration {sd['seconds']}s --timeout {sd['client_timeout']} --ramp
  {sd['ramp_ms']}ms`: {sd['rate']:,} tx/s = {sd['load_fraction']} × the emulator's measured
  ceiling of {sd['ceiling']:,} ok/s (source: {sd['rate_source']}), start times spread over one
  firing interval. While capacity is halved the offer is {2 * sd['load_fraction']:.1f} × what the
  backend can serve; each terminal has at most one transaction outstanding, so at most
  {sd['terminals']} wait at once.
- **Targets**, each with a static cap of {cap} requests (and connections) at the backend, a
  queue of {p['max_queue']} for at most {p['queue_timeout']}, {p['proxy_threads']} threads:
  *sluice* with its defaults (latency-driven start-up ramp, not adaptive), *sluice* with
  `admission.adaptive = true`, and *HAProxy* (`server … maxconn {cap} maxqueue {p['max_queue']}`,
  `timeout queue {p['queue_timeout']}`). Both sluices run with the access log off (HAProxy logs
  nothing here either) and an admin listener, which is polled; each is started, then waited on
  until its effective limit is the cap (its start-up ramp over), before the load starts.
- **Sampling**: every {sd['sample_ms']} ms the emulator records its stats (requests inside,
  workers, requests answered) on its clock, and `proxy_probe.py` polls the proxy (sluice:
  `GET /status`, effective limit, in flight, queue; HAProxy: `show stat`), stamped with the
  epoch and placed on the emulator's clock.

## Results

{tables}

## Reading the results

- **failed**: transactions without a `200` (sent − ok): `503` from the proxy (queue full or
  queue deadline), client errors (connect / I/O / timeout after {sd['client_timeout']}).
  **p50 / p99 / max ms**: latency of the `200` answers as the terminals see it: the proxy's
  queue included, which grows while the offer exceeds the halved capacity.
- **backend ok/s before / during / after**: completions per second at the emulator in
  [1 s, slowdown), (slowdown + 1 s, recovery) and (recovery + 1 s, {sd['seconds']} s − 1 s), from its
  {sd['sample_ms']} ms samples. The offer is {sd['rate']:,}/s throughout; "during", halved
  capacity is the bound.
- **backend mean inside during**: mean of the emulator's requests-inside samples during the
  slowdown. With `workers`, anything above the 16 workers waits inside the backend for one.
- **proxy limit during (min / mean)**: sluice's effective limit (its `/status`, which the
  `sluice_effective_limit` gauge also shows) sampled during the slowdown; HAProxy's is its static
  `maxconn`. **limit back at cap**: seconds from the recovery to the first sample at the cap
  again (0 when it was already there). **proxy queue max during**: the most requests waiting in
  the proxy in any sample of the slowdown; **queue empty**: seconds from the recovery to the
  first sample with nothing waiting in the proxy (the backlog worked off).
- **p50** sits near the boundary between the transactions that arrived while the proxy's queue
  held a backlog (the slowdown and the drain after it, about half the run) and those that did
  not: it jumps between ~25 ms and several hundred ms with a second more or less of backlog, so
  compare p99, the backend columns and the plots rather than p50. One run per target on a
  shared, busy machine: machine-wide stalls show in the plots as the backend's concurrency
  dropping for a sample or two, for every target.
- **Plots** (one per kind of slowdown, one panel per target): the blue line is the backend's
  requests inside, the grey dashed step its workers, the red step sluice's effective limit (for
  HAProxy: its static cap, dotted); the shaded band is the slowdown.

## Configurations used

{os.linesep.join(configs)}
"""
    with open(out_path, "w") as f:
        f.write(doc)


if __name__ == "__main__":
    main()
