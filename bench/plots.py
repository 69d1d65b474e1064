"""PNG plots (matplotlib, Agg): the balancer against HAProxy, throughput against SERVER_COUNT,
latency percentiles.  Medians with min-max error bars; small files (100 dpi)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import report
from bench.stats import Results, summarize

DPI = 100


def _plt() -> Any:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _err(values: list[float]) -> tuple[float, float, float]:
    s = summarize(values)
    if s is None:
        return 0.0, 0.0, 0.0
    return s.median, s.median - s.low, s.high - s.median


def balancer_plot(results: Results, path: Path, plt: Any) -> Path | None:
    bars = [
        ("keep-alive\nreq/s", results.ratios("ka_rps", "ours", "haproxy"), 1.0, ">="),
        ("new conn.\nreq/s", results.ratios("close_rps", "ours", "haproxy"), 0.75, ">="),
        ("bulk MiB/s\n(vs tuned)", results.ratios("bulk_mib_s", "ours", "haproxy-tuned"), 1.0,
         ">="),
        ("CPU per 1k\nkeep-alive req", results.ratios("ka_cpu_ms_per_1k", "ours", "haproxy"),
         1.0, "<="),
        ("CPU per 1k\nnew conn.", results.ratios("close_cpu_ms_per_1k", "ours", "haproxy"),
         None, ""),
        ("CPU\nper GiB", results.ratios("bulk_cpu_s_per_gib", "ours", "haproxy-tuned"),
         None, ""),
    ]
    bars = [b for b in bars if b[1]]
    idle = [(name, results.get("idle_kib_per_conn", v)) for name, v in
            (("ours", "ours"), ("HAProxy", "haproxy")) if results.has("idle_kib_per_conn", v)]
    if not bars and not idle:
        return None
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 4.2), dpi=DPI,
                                  gridspec_kw={"width_ratios": [4, 1.2]})
    xs = list(range(len(bars)))
    if bars:
        meds, lo, hi = zip(*(_err(b[1]) for b in bars), strict=True)
        colors = []
        for (_, _, target, sense), m in zip(bars, meds, strict=True):
            if target is None:
                colors.append("#9aa5b1")
            elif (m >= target) if sense == ">=" else (m <= target):
                colors.append("#2a9d8f")
            else:
                colors.append("#e76f51")
        ax.bar(xs, meds, yerr=[lo, hi], color=colors, capsize=4, width=0.6)
        for x, (_, _, target, sense) in zip(xs, bars, strict=True):
            if target is not None:
                ax.plot([x - 0.38, x + 0.38], [target, target], color="black", lw=1.5, ls="--")
                # On a white ground: the median's error bar crosses the label's place.
                ax.annotate(f"target {sense} {target:g}", (x, target),
                            textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7,
                            zorder=5, bbox={"boxstyle": "round,pad=0.15", "fc": "white",
                                            "ec": "none", "alpha": 0.85})
        for x, m in zip(xs, meds, strict=True):
            ax.annotate(f"{m:.2f}", (x, m / 2), ha="center", fontsize=9, fontweight="bold",
                        color="white")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xticks(xs, [b[0] for b in bars], fontsize=8)
        ax.set_ylabel("our balancer / HAProxy 2.6 (nbthread 1)")
        ax.set_title("Ratio to HAProxy, median of interleaved rounds (bars: min-max)\n"
                     "green: target met, red: missed, grey: no target", fontsize=9)
    if idle:
        meds2, lo2, hi2 = zip(*(_err(v) for _, v in idle), strict=True)
        unjudged = report.idle_unjudged(results)  # a quick run's 1,000 connections

        def color(name: str, median: float) -> str:
            if name != "ours":
                return "#e9c46a"
            if unjudged:
                return "#9aa5b1"
            return "#e76f51" if median > 3.0 else "#2a9d8f"

        ax2.bar(range(len(idle)), meds2, yerr=[lo2, hi2], capsize=4, width=0.6,
                color=[color(n, m) for (n, _), m in zip(idle, meds2, strict=True)])
        if unjudged:
            ax2.annotate("not judged:\nfewer than\n"
                         f"{report.IDLE_TARGET_CONNECTIONS:,} connections", (0.5, 0.97),
                         xycoords="axes fraction", ha="center", va="top", fontsize=7)
        else:
            ax2.axhline(3.0, color="black", ls="--", lw=1.5)
            ax2.annotate("target <= 3", (0, 3.0), textcoords="offset points", xytext=(0, 3),
                         ha="center", fontsize=7)
        for x, m in enumerate(meds2):
            ax2.annotate(f"{m:.2f}", (x, m / 2), ha="center", fontsize=9, fontweight="bold",
                         color="white")
        ax2.set_xticks(range(len(idle)), [n for n, _ in idle], fontsize=8)
        ax2.set_ylabel("KiB of RSS per idle proxied connection")
        ax2.set_title("Idle connections", fontsize=9)
    else:
        ax2.axis("off")
    fig.suptitle("The balancer alone, in front of nginx, against HAProxy", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def throughput_plot(results: Results, path: Path, plt: Any) -> Path | None:
    data = results.values.get("stack_get_rps", {})
    if not data:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=DPI)
    for name, color, marker in (("ours", "#264653", "o"), ("haproxy", "#e9c46a", "s")):
        ns = [n for n in (1, 2, 4) if f"{name}-{n}" in data]
        if not ns:
            continue
        meds, lo, hi = zip(*(_err(data[f"{name}-{n}"]) for n in ns), strict=True)
        label = "our balancer" if name == "ours" else "HAProxy 2.6 (tcp, nbthread 1)"
        ax.errorbar(ns, meds, yerr=[lo, hi], marker=marker, color=color, capsize=4, label=label)
    if "direct-1" in data:
        m, lo1, hi1 = _err(data["direct-1"])
        ax.errorbar([1], [m], yerr=[[lo1], [hi1]], marker="D", color="#2a9d8f", capsize=4,
                    ls="none", label="one replica directly")
    if "pgbench" in data:
        pg = summarize(data["pgbench"])
        assert pg is not None
        ax.axhline(pg.median * 0.2, color="#e76f51", ls="--", lw=1,
                   label=f"target: 0.2 x pgbench -S ({pg.median:,.0f} tps)")
    ax.set_xticks([1, 2, 4])
    ax.set_xlabel("SERVER_COUNT (replicas)")
    ax.set_ylabel("GET /get_var req/s (wrk -t2 -c64)")
    ax.set_ylim(bottom=0)
    cores = results.meta.get("machine", {}).get("cpus (nproc)", "?")
    ax.set_title(f"Whole stack on {cores} cores: throughput against SERVER_COUNT", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def latency_plot(results: Results, path: Path, plt: Any) -> Path | None:
    from bench.run import ENDPOINTS

    groups: list[tuple[str, str, str]] = []  # (label, metric, variant-or-"")
    for label in ("service", "target"):
        for name in ENDPOINTS:
            metric = f"{label}_wrk_{name}"
            if metric in results.values:
                groups.append((name.replace("_", "\n"), metric, ""))
    for v in ("ours-2", "haproxy-2"):
        if results.has("stack_get_p50", v):
            groups.append((f"stack GET\n{v}", "stack_get", v))
    if not groups:
        return None
    fig, ax = plt.subplots(figsize=(9, 4.2), dpi=DPI)
    width = 0.2
    colors = {"p50": "#2a9d8f", "p75": "#8ab17d", "p90": "#e9c46a", "p99": "#e76f51"}
    for i, p in enumerate(colors):
        meds = []
        errs: list[list[float]] = [[], []]
        for _, metric, variant in groups:
            values = (results.get(f"{metric}_{p}", variant) if variant
                      else results.get(metric, p))
            m, lo, hi = _err(values)
            meds.append(m)
            errs[0].append(lo)
            errs[1].append(hi)
        xs = [x + (i - 1.5) * width for x in range(len(groups))]
        ax.bar(xs, meds, width, yerr=errs, capsize=2, color=colors[p], label=p)
    ax.set_xticks(range(len(groups)), [g[0] for g in groups], fontsize=8)
    ax.set_yscale("log")
    # Plain numbers at 1, 2 and 5 of each decade (matplotlib mixes 10^1 with 6 x 10^0).
    from matplotlib import ticker
    ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_ylabel("latency, ms (log scale)")
    ax.set_title("Latency percentiles at 64 connections (wrk --latency): each endpoint on one "
                 "replica directly, and GET through 2 replicas", fontsize=9)
    ax.legend(fontsize=8, ncol=4)
    ax.grid(axis="y", alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_all(results: Results, out: Path, stem: str) -> list[Path]:
    plt = _plt()
    if plt is None:
        print("matplotlib is not installed: no plots (pip install 'varstack[bench]')")
        return []
    written = []
    for name, fn in (("balancer", balancer_plot), ("throughput", throughput_plot),
                     ("latency", latency_plot)):
        png = fn(results, out / f"{stem}-{name}.png", plt)
        if png is not None:
            written.append(png)
    return written
