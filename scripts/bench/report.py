"""Turns the raw lines of scripts/bench-vs-nats.sh into tables and a plot.

    python report.py RAW_JSONL OUT_DIR

Prints one markdown table per setup (medians of the runs of each case and
system, with Covet/JetStream ratios) and writes OUT_DIR/plot.png
(throughput of the throughput cases, latency percentiles of the latency
cases). Each raw line is {"setup", "case", "label", "system", "run",
"rss_idle_kb", "rss_end_kb", "result"}, result being the JSON line that
`covet bench` printed (or {"failed": why}).
"""

import json
import statistics
import sys
from collections import OrderedDict

SYSTEMS = ["covet", "js-always", "js-lazy"]
NAMES = {"covet": "Covet", "js-always": "JetStream always", "js-lazy": "JetStream lazy"}
PLOT_TITLES = {"single": "Single node", "cluster": "Three nodes sharing 2 cores, R=3"}
SETUP_TITLES = {
    "single": "Single node",
    "cluster": "Three nodes sharing 2 cores (replication factor 3)",
}


def kind(result):
    """throughput, open (open-loop latency), e2e, read or group."""
    bench = result.get("bench")
    if bench == "pub":
        return "open" if result.get("rate") else "throughput"
    return bench


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def lat(result, key, pct):
    return (result.get(key) or {}).get(pct)


def fmt_us(us):
    if us is None:
        return "?"
    if us >= 1000:
        return f"{us / 1000:.1f} ms" if us < 100_000 else f"{us / 1000:,.0f} ms"
    return f"{us:.0f} µs"


def fmt_rate(r):
    return "?" if r is None else f"{r:,.0f} rec/s"


class Cell:
    """The runs of one case on one system."""

    def __init__(self, rows):
        self.rows = rows
        self.results = [r["result"] for r in rows if "failed" not in r["result"]]
        self.failed = [r["result"]["failed"] for r in rows if "failed" in r["result"]]

    def m(self, key):
        return median([r.get(key) for r in self.results])

    def lat(self, pct, key="latency_us"):
        return median([lat(r, key, pct) for r in self.results])

    def overloaded(self):
        return any(r.get("overloaded") for r in self.results)

    def text(self):
        if not self.results:
            return "failed" if self.failed else "—"
        k = kind(self.results[0])
        if k == "throughput":
            t = fmt_rate(self.m("records_per_sec"))
            if (self.results[0].get("record_size") or 0) >= 1024:
                t += f" ({self.m('mb_per_sec'):,.0f} MB/s)"
            return f"{t}, p50 {fmt_us(self.lat('p50'))}, p99 {fmt_us(self.lat('p99'))}"
        if k == "read":
            return f"{fmt_rate(self.m('records_per_sec'))} ({self.m('records'):,.0f} records)"
        if k == "group":
            share = self.m("share_of_plain")
            again = self.m("redelivered")
            return (
                f"{fmt_rate(self.m('records_per_sec'))}, {share:.0%} of its plain read "
                f"({fmt_rate(self.m('plain_records_per_sec'))}), {again:,.0f} redelivered"
            )
        t = f"p50 {fmt_us(self.lat('p50'))}, p99 {fmt_us(self.lat('p99'))}"
        if self.overloaded():
            t += f", **overloaded** ({self.m('achieved_rate'):,.0f} rec/s achieved)"
        return t

    def figure(self):
        """(value, is_latency) compared across systems."""
        if not self.results:
            return None, False
        k = kind(self.results[0])
        if k in ("throughput", "read", "group"):
            return self.m("records_per_sec"), False
        return self.lat("p99"), True

    def rss(self):
        idle = [kb for r in self.rows for kb in r["rss_idle_kb"]]
        end = [kb for r in self.rows for kb in r["rss_end_kb"]]
        return idle, end


def ratio(covet, other):
    (a, latency), (b, _) = covet.figure(), other.figure()
    if latency and (covet.overloaded() or other.overloaded()):
        # The latencies of a system that did not keep up cover only what it
        # acknowledged: compare the rates achieved instead.
        a, b = covet.m("achieved_rate"), other.m("achieved_rate")
        return "—" if not a or not b else f"{a / b:.2f} (rate)"
    if not a or not b:
        return "—"
    return f"{a / b:.2f}" + (" (p99)" if latency else "")


def table(setup, rows):
    cases = OrderedDict()
    for r in rows:
        cases.setdefault(r["case"], {"label": r["label"], "rows": []})["rows"].append(r)
    out = [f"### {SETUP_TITLES.get(setup, setup)}", ""]
    out.append("| case | Covet | JetStream always | JetStream lazy | Covet/always | Covet/lazy |")
    out.append("| --- | --- | --- | --- | --- | --- |")
    rss = {s: ([], []) for s in SYSTEMS}
    for case in cases.values():
        cells = {s: Cell([r for r in case["rows"] if r["system"] == s]) for s in SYSTEMS}
        for s in SYSTEMS:
            idle, end = cells[s].rss()
            rss[s][0].extend(idle)
            rss[s][1].extend(end)
        out.append(
            f"| {case['label']} | "
            + " | ".join(cells[s].text() for s in SYSTEMS)
            + f" | {ratio(cells['covet'], cells['js-always'])} | {ratio(cells['covet'], cells['js-lazy'])} |"
        )

    def mb(kbs):
        if not kbs:
            return "—"
        lo, hi = min(kbs) / 1024, max(kbs) / 1024
        return f"{lo:.0f} MB" if round(lo) == round(hi) else f"{lo:.0f}–{hi:.0f} MB"

    out.append(
        "| broker RSS idle after start"
        + (" (per node)" if setup == "cluster" else "")
        + " | "
        + " | ".join(mb(rss[s][0]) for s in SYSTEMS)
        + " | | |"
    )
    out.append(
        "| broker RSS at the end of a run"
        + (" (per node)" if setup == "cluster" else "")
        + " | "
        + " | ".join(mb(rss[s][1]) for s in SYSTEMS)
        + " | | |"
    )
    out.append("")
    out.append(
        "Medians of the runs. Ratios are Covet ÷ JetStream: of records/s on throughput "
        "and read rows (above 1: Covet ahead), of p99 latency where marked (p99) "
        "(below 1: Covet ahead), of the achieved rate where marked (rate), when either "
        "side was overloaded (above 1: Covet ahead). Open-loop latency is taken from each record's intended "
        "send time (corrected for coordinated omission). JetStream `always` is not run on "
        "the read and group rows: reading does not depend on the sync mode (and its preload would not fit the time bound). A group row times a fresh consumer group that acknowledges every record on its own, from when its members had joined and it settled to the last record, against a plain read of the same records in the same run; JetStream's members share one durable pull consumer per stream with explicit acks. JetStream has no "
        "producer linger, so rows with a linger are Covet's alone: compare them with "
        "the linger-0 row above."
    )
    failed = [
        f"- {r['label']}, {NAMES[r['system']]}, run {r['run']}: {r['result']['failed']}"
        for r in rows
        if "failed" in r["result"]
    ]
    if failed:
        out += ["", "Failed runs:", *failed]
    return "\n".join(out) + "\n"


def plot(setups, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib missing: no plot)", file=sys.stderr)
        return
    names = list(setups)
    fig, axes = plt.subplots(len(names), 2, figsize=(16, 5.5 * len(names)), squeeze=False)
    colors = {"covet": "#1f77b4", "js-always": "#d62728", "js-lazy": "#ff7f0e"}
    for row, setup in enumerate(names):
        rows = setups[setup]
        cases = OrderedDict()
        for r in rows:
            cases.setdefault(r["case"], r["label"])
        thr, lat_cases = [], []
        for case, label in cases.items():
            cells = {s: Cell([r for r in rows if r["case"] == case and r["system"] == s]) for s in SYSTEMS}
            sample = next((c.results[0] for c in cells.values() if c.results), None)
            if sample is None:
                continue
            if kind(sample) in ("throughput", "read", "group"):
                thr.append((label, cells))
            if kind(sample) not in ("read", "group"):
                lat_cases.append((label, cells))
        ax = axes[row][0]
        width = 0.27
        for i, s in enumerate(SYSTEMS):
            xs = [j + (i - 1) * width for j in range(len(thr))]
            ys = [c[s].m("records_per_sec") or 0 for _, c in thr]
            ax.bar(xs, ys, width, label=NAMES[s], color=colors[s])
        ax.set_xticks(range(len(thr)))
        ax.set_xticklabels([l for l, _ in thr], rotation=30, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("records/s (log)")
        ax.set_title(f"{PLOT_TITLES.get(setup, setup)}: throughput (higher is better)")
        ax.legend(fontsize=8)
        ax = axes[row][1]
        if not lat_cases:
            # A run of throughput-only cases (`--cases`): nothing to plot.
            ax.set_axis_off()
            continue
        for i, s in enumerate(SYSTEMS):
            xs = [j + (i - 1) * width for j in range(len(lat_cases))]
            p50 = [c[s].lat("p50") or 0 for _, c in lat_cases]
            p99 = [c[s].lat("p99") or 0 for _, c in lat_cases]
            p999 = [c[s].lat("p999") or 0 for _, c in lat_cases]
            bars = ax.bar(xs, p99, width, color=colors[s], alpha=0.85, label=f"{NAMES[s]} p99 (bar)")
            for bar, (_, c) in zip(bars, lat_cases):
                if c[s].overloaded():
                    bar.set_hatch("//")
            ax.scatter(xs, p50, marker="_", s=120, color="black", zorder=3,
                       label="p50" if i == 0 else None)
            ax.scatter(xs, p999, marker="^", s=18, color="black", zorder=3,
                       label="p99.9" if i == 0 else None)
        ax.set_xticks(range(len(lat_cases)))
        ax.set_xticklabels([l for l, _ in lat_cases], rotation=30, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("latency, µs (log)")
        ax.set_title(
            f"{PLOT_TITLES.get(setup, setup)}: latency (lower is better; hatched: overloaded)"
        )
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    raw, out_dir = sys.argv[1], sys.argv[2]
    setups = OrderedDict()
    with open(raw) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                setups.setdefault(r["setup"], []).append(r)
    for setup, rows in setups.items():
        print(table(setup, rows))
    plot(setups, f"{out_dir}/plot.png")


if __name__ == "__main__":
    main()
