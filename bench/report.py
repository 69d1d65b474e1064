"""The markdown report: machine, versions, commands, medians with spreads, target ratios."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.stats import Results, fmt, fmt_num, summarize


@dataclass(frozen=True)
class Target:
    figure: str
    goal: str
    #: The per-round values of the figure (ratios, or an absolute number).
    values: Callable[[Results], list[float]]
    at_least: bool
    threshold: float
    prototype: str
    #: Why the figure falls short when it does: what the profiles of this machine showed, and
    #: what the run itself measured where it can (a function of the results).
    why: str | Callable[[Results], str] = ""
    #: Why this run's figure cannot be held against the target ("" when it can).
    unjudged: Callable[[Results], str] = lambda r: ""

    def explain(self, results: Results) -> str:
        return self.why(results) if callable(self.why) else self.why

    def verdict(self, results: Results) -> str:
        return self.unjudged(results) or verdict(self, self.values(results))


#: Idle connections the RSS target is for: a smaller count spreads less of the proxy's own
#: growth over them (1,000 measured 1.49 KiB each where 5,000 measured 2.59).
IDLE_TARGET_CONNECTIONS = 5000


def idle_unjudged(r: Results) -> str:
    """Why the RSS figure is shown but not judged (too few idle connections), or ''."""
    count = r.meta.get("options", {}).get("idle", IDLE_TARGET_CONNECTIONS)
    if count >= IDLE_TARGET_CONNECTIONS or not r.get("idle_kib_per_conn", "ours"):
        return ""
    return (f"not judged: {count:,} connections (--idle), the target is for "
            f"{IDLE_TARGET_CONNECTIONS:,}")


def _user_kernel(r: Results, metric: str) -> str:
    """This run's user and kernel CPU of ours and HAProxy, and where the difference lies
    (empty if the run did not split it)."""
    parts = [summarize(r.get(f"{metric}_{kind}_ms_per_1k", variant))
             for variant in ("ours", "haproxy") for kind in ("user", "kernel")]
    if any(p is None for p in parts):
        return ""
    ours_user, ours_kernel, h_user, h_kernel = (p for p in parts if p is not None)
    overlap = ours_kernel.low <= h_kernel.high and h_kernel.low <= ours_kernel.high
    # ms per 1,000 requests are us per request.
    return (f"In this run the balancer spent {fmt_num(ours_user.median)} CPU ms of user time "
            f"and {fmt_num(ours_kernel.median)} in the kernel per 1,000, HAProxy "
            f"{fmt_num(h_user.median)} and {fmt_num(h_kernel.median)} (medians; the table "
            f"under part 1 has the spread): per request, ours spent "
            f"{_signed_us(ours_user.median - h_user.median)} of user time and "
            f"{_signed_us(ours_kernel.median - h_kernel.median)} of kernel time, and the two "
            f"kernel times' spreads {'overlap' if overlap else 'do not overlap'}. ")


def _signed_us(diff: float) -> str:
    return f"{fmt_num(diff)} us more" if diff >= 0 else f"{fmt_num(-diff)} us less"


def _with_split(metric: str, why: str) -> Callable[[Results], str]:
    """``why``, after this run's user and kernel split of ``metric`` (ka, close)."""
    return lambda r: _user_kernel(r, metric) + why


_KEEP_ALIVE_WHY = _with_split("ka", (
    "Per request both make the same system calls (strace -c: two reads and two writes), and "
    "ours adds one epoll_wait on its own epoll set per wakeup of the loop (about one per "
    "dozen ready sockets at this load). py-spy --native puts 95% of the balancer's samples "
    "in send, recv and the two epoll waits; the user time ours spends over HAProxy is the "
    "interpreter dispatching each ready socket and CPython's cost per socket call (argument "
    "parsing, the GIL released and taken back). Over the runs of 2026-11-29 on the same "
    "pipe these ratios fell on both sides of the targets."))

_NEW_CONNECTION_WHY = _with_split("close", (
    "strace -c counts 19.2 system calls per connection against HAProxy's 17.8: CPython checks "
    "each accepted descriptor it is handed with getsockname (1) and makes it non-blocking "
    "with an ioctl where HAProxy's accept4 does (1), epoll interest changes 4 times against 3, "
    "and the half-close is passed on with shutdown (1). The rest is user time: the "
    "interpreter running the accept, connect and close steps. Before the pipe left uvloop's "
    "transports (an A/B: 0.609 to 0.852 of HAProxy's req/s) it was 28 system calls, uvloop "
    "asking each transport's socket and peer names and libuv changing epoll interest 8 times."))


TARGETS: tuple[Target, ...] = (
    Target("balancer keep-alive req/s ÷ HAProxy's", "≥ 1.0",
           lambda r: r.ratios("ka_rps", "ours", "haproxy"), True, 1.0, "0.91",
           _KEEP_ALIVE_WHY),
    Target("balancer new-connection-per-request req/s ÷ HAProxy's", "≥ 0.75",
           lambda r: r.ratios("close_rps", "ours", "haproxy"), True, 0.75, "0.57",
           _NEW_CONNECTION_WHY),
    Target("balancer bulk MiB/s ÷ HAProxy's tuned (splice-auto, bufsize 65536)", "≥ 1.0",
           lambda r: r.ratios("bulk_mib_s", "ours", "haproxy-tuned"), True, 1.0, "1.25"),
    Target("balancer CPU per 1,000 keep-alive requests ÷ HAProxy's", "≤ 1.0",
           lambda r: r.ratios("ka_cpu_ms_per_1k", "ours", "haproxy"), False, 1.0, "1.2",
           _KEEP_ALIVE_WHY),
    Target("balancer RSS per idle proxied connection (KiB)", "≤ 3 KiB",
           lambda r: r.get("idle_kib_per_conn", "ours"), False, 3.0, "2.9",
           "Per connection: the pipe, its two sides and their two socket objects (no transport "
           "or loop handle: the sockets sit on the balancer's own epoll set), and an entry in the "
           "timeouts' and the epoll set's tables; 2.85 KiB with uvloop's transports, 3.62 in "
           "the first full run.",
           idle_unjudged),
    Target("one replica, GET /get_var req/s ÷ `pgbench -S -M prepared -c8` tps", "≥ 0.12",
           lambda r: r.ratios("stack_get_rps", "direct-1", "pgbench"), True, 0.12, "0.105",
           "A replica is one Python process: per GET, aiohttp parses the request and writes the "
           "answer and asyncpg runs the query, each through layers of Python; py-spy puts about "
           "40% of the replica's samples below Python (socket calls and the event loop) and "
           "most of the rest in aiohttp's and asyncpg's own code. pgbench's client is C."),
    Target("whole stack, 2 replicas, GET via our balancer ÷ via HAProxy", "≥ 1.0",
           lambda r: r.ratios("stack_get_rps", "ours-2", "haproxy-2"), True, 1.0, "0.93",
           lambda r: _stack_cpu_why(r) + (
               "At this load the balancer wakes about once per request, where against nginx at "
               "wrk -c64 a wakeup finds a dozen ready sockets: perf's tracepoints counted, per "
               "request, about one context switch and 6.1-6.7 system calls for ours (its own "
               "epoll set's wait included) against 6.9-7.3 for HAProxy. What the interpreter "
               "spends per wakeup is then spent per request: the user time above; the rest, the "
               "kernel's, moves from run to run by as much. On the 2-core machine the targets "
               "were set on, both cores are saturated, "
               "so each CPU us the balancer spends is taken from the replicas; the replicas' own "
               "CPU per request also moves by several per cent from run to run, and the spread "
               "of the rounds is as wide as the gap.")),
    Target("whole stack, 2 replicas, GET req/s ÷ `pgbench -S` tps", "≥ 0.2",
           lambda r: r.ratios("stack_get_rps", "ours-2", "pgbench"), True, 0.2, "0.14",
           lambda r: _cpu_budget_why(r) + (
               "On the 2-core machine the targets were set on, two cores hold wrk, the "
               "balancer, both replicas and PostgreSQL. A replica is "
               "CPU-bound Python that takes about a core by itself, so a second replica on the "
               "same two cores adds nothing: compare direct-1 with ours-2. pgbench -S gives "
               "both cores to PostgreSQL and a C client.")),
)


def _stack_cpu_why(r: Results) -> str:
    """This run's CPU per request of our balancer and HAProxy in the 2-replica stack."""
    ours, haproxy = cpu_split(r, "ours-2"), cpu_split(r, "haproxy-2")
    rps = [summarize(r.get("stack_get_rps", v)) for v in ("ours-2", "haproxy-2")]
    if ours is None or haproxy is None or rps[0] is None or rps[1] is None:
        return ""
    users = [summarize(r.get("stack_cpu_us_balancer_user", v)) for v in ("ours-2", "haproxy-2")]
    user = ""
    if users[0] is not None and users[1] is not None:
        user = (f" ({fmt_num(users[0].median)} and {fmt_num(users[1].median)} of it user time, "
                f"{fmt_num(ours['balancer'] - users[0].median)} and "
                f"{fmt_num(haproxy['balancer'] - users[1].median)} the rest)")
    return (
        f"In this run, per request, our balancer spent {fmt_num(ours['balancer'])} CPU us and "
        f"HAProxy {fmt_num(haproxy['balancer'])}{user}, the machine as a whole "
        f"{fmt_num(ours['machine'])} and {fmt_num(haproxy['machine'])} (the last table of part "
        f"3); the medians of the rounds are {fmt_num(rps[0].median)} and "
        f"{fmt_num(rps[1].median)} req/s. ")


def _cpu_budget_why(r: Results) -> str:
    """This run's own CPU account of the 2-replica stack against pgbench (empty if not measured)."""
    split, pgbench = cpu_split(r, "ours-2"), cpu_split(r, "pgbench")
    tps = summarize(r.get("stack_get_rps", "pgbench"))
    busy = summarize(r.get("stack_busy_cores", "ours-2"))
    if split is None or pgbench is None or tps is None or busy is None or not split["machine"]:
        return ""
    cores = busy.median
    needed = 0.2 * tps.median
    return (
        f"In this run the 2-replica stack kept {fmt_num(cores)} cores busy, and each request "
        f"cost {fmt_num(split['machine'])} CPU us in all: the replicas "
        f"{fmt_num(split['replicas'])}, our balancer {fmt_num(split['balancer'])}, PostgreSQL "
        f"{fmt_num(split['postgres'])}, wrk {fmt_num(split['load'])}, other "
        f"{fmt_num(split['other'])} (the table under part 3). "
        f"Reaching 0.2 of pgbench, {fmt_num(needed)} req/s, on those cores needs at most "
        f"{fmt_num(cores * 1e6 / needed)} us per request. A pgbench transaction costs "
        f"{fmt_num(pgbench['machine'])} us in all (PostgreSQL {fmt_num(pgbench['postgres'])}, "
        f"pgbench {fmt_num(pgbench['load'])}). "
    )


def verdict(t: Target, values: list[float]) -> str:
    s = summarize(values)
    if s is None:
        return "not measured"
    met = s.median >= t.threshold if t.at_least else s.median <= t.threshold
    if met:
        return "**met**"
    short = (1 - s.median / t.threshold) if t.at_least else (s.median / t.threshold - 1)
    percent = short * 100
    # Under 1%, a whole percent would read "missed by 0%": two significant digits instead.
    return f"missed by {percent:.2g}%" if percent < 1 else f"missed by {percent:.0f}%"


def targets_table(results: Results) -> str:
    rows = ["| figure | target | measured: median [min-max of rounds] | prototype | verdict |",
            "|---|---|---|---|---|"]
    verdicts = [(t, t.verdict(results)) for t in TARGETS]
    if all(said == "not measured" for _, said in verdicts):
        # A --target run, or sections that measure none of them: eight empty rows say nothing.
        return ("No target is measured by this run's sections "
                f"({', '.join(results.meta.get('options', {}).get('sections', [])) or '?'}); "
                "the targets need the balancer, service and stack sections.")
    for t, said in verdicts:
        rows.append(f"| {t.figure} | {t.goal} | {fmt(t.values(results))} | {t.prototype} | "
                    f"{said} |")
    missed = [t for t, said in verdicts if said.startswith("missed")]
    if missed:
        rows += ["", "Why the missed ones fall short (from profiles taken on this machine):", ""]
        said_for: dict[str, str] = {}  # one reason for two figures is written out once
        for t in missed:
            reason = t.explain(results)
            first = said_for.setdefault(reason, t.figure)
            rows.append(f"- **{t.figure}**: " + (
                reason if first == t.figure else f"the same reason as for *{first}*, above."))
    return "\n".join(rows)


def _table(results: Results, rows: list[tuple[str, str, str]], variants: list[str],
           headers: list[str], blank: Callable[[str, str], bool] = lambda m, v: False) -> str:
    """Rows (label, metric, unit) x variants; each cell median [min-max], ``-`` where
    ``blank(metric, variant)``."""
    out = ["| figure | " + " | ".join(headers) + " |", "|---" * (len(headers) + 1) + "|"]
    for label, metric, unit in rows:
        cells = ["-" if blank(metric, v) else fmt(results.get(metric, v)) for v in variants]
        if all(c == "-" for c in cells):
            continue
        out.append(f"| {label} ({unit}) | " + " | ".join(cells) + " |")
    return "\n".join(out)


def _ratio_row(results: Results, label: str, metric: str, a: str, b: str) -> str | None:
    values = results.ratios(metric, a, b)
    if not values:
        return None
    return f"| {label} | {fmt(values)} |"


#: The rows of part 1 that are the proxy process's CPU.
_PROXY_CPU = {"ka_cpu_ms_per_1k", "ka_user_ms_per_1k", "ka_kernel_ms_per_1k", "close_cpu_ms_per_1k",
              "close_user_ms_per_1k", "close_kernel_ms_per_1k", "bulk_cpu_s_per_gib"}


def _idle_method(results: Results) -> str:
    count = results.meta.get("options", {}).get("idle", "?")
    if count == 0:
        return "Idle RSS: not measured (--idle 0)."
    return (f"Idle RSS: a fresh proxy each round, {count} connections opened and left idle "
            "(all verified ESTABLISHED to the backend with `ss`), VmRSS after minus before.")


def balancer_section(results: Results) -> list[str]:
    if not results.values.get("ka_rps"):
        return []
    variants = [v for v in ("direct", "ours", "haproxy", "haproxy-tuned")
                if any(results.has(m, v) for m in ("ka_rps", "bulk_mib_s", "idle_kib_per_conn"))]
    names = {"direct": "direct (no proxy)", "ours": "our balancer", "haproxy": "HAProxy 2.6",
             "haproxy-tuned": "HAProxy tuned for bulk"}
    rows = [
        ("keep-alive, wrk -c64", "ka_rps", "req/s"),
        ("new connection per request, wrk -c64 `Connection: close`", "close_rps", "req/s"),
        ("bulk, 16 MiB body, wrk -c4", "bulk_mib_s", "MiB/s"),
        ("proxy CPU per 1,000 keep-alive requests", "ka_cpu_ms_per_1k", "CPU ms"),
        ("… of it user time", "ka_user_ms_per_1k", "CPU ms"),
        ("… of it kernel time", "ka_kernel_ms_per_1k", "CPU ms"),
        ("proxy CPU per 1,000 new connections", "close_cpu_ms_per_1k", "CPU ms"),
        ("… of it user time", "close_user_ms_per_1k", "CPU ms"),
        ("… of it kernel time", "close_kernel_ms_per_1k", "CPU ms"),
        ("proxy CPU per GiB of bulk", "bulk_cpu_s_per_gib", "CPU s"),
        ("backend (nginx) CPU per 1,000 keep-alive requests", "ka_backend_cpu_ms_per_1k",
         "CPU ms"),
        ("keep-alive p99 latency", "ka_p99_ms", "ms"),
        ("RSS per idle proxied connection", "idle_kib_per_conn", "KiB"),
    ]
    lines = [
        "## 1. The balancer alone",
        "",
        f"Backend: {results.meta.get('balancer_backend', '?')}. Each proxy is one process with "
        "one thread; CPU is the proxy process's user+system time from `/proc/<pid>/stat` over "
        f"the run. {_idle_method(results)}",
        "",
        # Direct has no proxy: the process measured there is nginx, whose row is below.
        _table(results, rows, variants, [names[v] for v in variants],
               blank=lambda metric, v: v == "direct" and metric in _PROXY_CPU),
        "",
        "Ratios, taken round by round (the two were measured side by side in each round):",
        "",
        "| ratio | median [min-max] |",
        "|---|---|",
    ]
    for row in (
        _ratio_row(results, "keep-alive req/s: ours ÷ HAProxy", "ka_rps", "ours", "haproxy"),
        _ratio_row(results, "keep-alive req/s: ours ÷ direct", "ka_rps", "ours", "direct"),
        _ratio_row(results, "new-connection req/s: ours ÷ HAProxy", "close_rps", "ours",
                   "haproxy"),
        _ratio_row(results, "bulk MiB/s: ours ÷ HAProxy tuned", "bulk_mib_s", "ours",
                   "haproxy-tuned"),
        _ratio_row(results, "bulk MiB/s: ours ÷ HAProxy default", "bulk_mib_s", "ours",
                   "haproxy"),
        _ratio_row(results, "CPU per 1,000 keep-alive requests: ours ÷ HAProxy",
                   "ka_cpu_ms_per_1k", "ours", "haproxy"),
        _ratio_row(results, "CPU per 1,000 new connections: ours ÷ HAProxy",
                   "close_cpu_ms_per_1k", "ours", "haproxy"),
        _ratio_row(results, "CPU per GiB: ours ÷ HAProxy tuned", "bulk_cpu_s_per_gib", "ours",
                   "haproxy-tuned"),
        _ratio_row(results, "RSS per idle connection: ours ÷ HAProxy", "idle_kib_per_conn",
                   "ours", "haproxy"),
    ):
        if row:
            lines.append(row)
    return [*lines, ""]


#: hey repeats one request: for these endpoints it is not what wrk's script sends.
_HEY_LABELS = {"set": "POST /set_var (one existing key)",
               "delete": "DELETE /delete_var (one missing key)"}


def endpoints_section(results: Results, label: str, title: str) -> list[str]:
    from bench.run import ENDPOINT_LABELS

    metrics = [m for m in results.values if m.startswith(f"{label}_")]
    if not metrics:
        return []
    lines = [
        title,
        "",
        "wrk: `bench/wrk/<script>.lua`, random pre-seeded keys, `-t2 -c64`. hey: one fixed "
        "request, `-c 64`, on a key that exists for POST (so every answer is 409) and one that "
        "does not for DELETE (404): one statement each all the same; hey does not count its "
        "non-2xx answers here (-). Latencies in ms.",
        "",
        "| endpoint | tool | req/s | p50 | p90 | p99 | non-2xx (median) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, pretty in ENDPOINT_LABELS.items():
        for tool in ("wrk", "hey"):
            metric = f"{label}_{tool}_{name}"
            if metric not in results.values:
                continue
            non = summarize(results.get(metric, "non2xx"))
            shown = _HEY_LABELS.get(name, pretty) if tool == "hey" else pretty
            lines.append(
                f"| {shown} | {tool} | {fmt(results.get(metric, 'rps'))} | "
                f"{fmt(results.get(metric, 'p50'), spread=False)} | "
                f"{fmt(results.get(metric, 'p90'), spread=False)} | "
                f"{fmt(results.get(metric, 'p99'), spread=False)} | "
                f"{fmt_num(non.median) if non else '-'} |"
            )
    lines.append("")
    if any(results.get(f"{label}_wrk_delete", "non2xx")):
        lines += ["DELETE runs past its seeded `del-<thread>-<n>` keys answer 404 (still one "
                  "statement each); the keys are re-seeded before every DELETE run.", ""]
    return lines


def stack_section(results: Results) -> list[str]:
    if "stack_get_rps" not in results.values:
        return []
    variants = [v for v in results.values["stack_get_rps"] if v != "pgbench"]
    lines = [
        "## 3. The whole stack: GET /get_var?key=<random pre-seeded key>, wrk -t2 -c64",
        "",
        "Our balancer is `python -m lb` with the stack's defaults; HAProxy is `mode tcp`, "
        "`nbthread 1`, round robin, over the same replica processes. `pgbench -S -M prepared "
        "-c8 -j2` runs on the same PostgreSQL (TCP, password auth like the replicas), "
        "interleaved with the rest.",
        "",
        "| path | req/s (tps for pgbench) | p50 ms | p99 ms | ÷ pgbench |",
        "|---|---|---|---|---|",
        f"| pgbench -S | {fmt(results.get('stack_get_rps', 'pgbench'))} | | | 1 |",
    ]
    for v in variants:
        lines.append(
            f"| {v} | {fmt(results.get('stack_get_rps', v))} | "
            f"{fmt(results.get('stack_get_p50', v), spread=False)} | "
            f"{fmt(results.get('stack_get_p99', v), spread=False)} | "
            f"{fmt(results.ratios('stack_get_rps', v, 'pgbench'))} |"
        )
    lines += ["", "| ratio | median [min-max] |", "|---|---|"]
    for n in (1, 2, 4):
        row = _ratio_row(results, f"{n} replica(s): ours ÷ HAProxy", "stack_get_rps",
                         f"ours-{n}", f"haproxy-{n}")
        if row:
            lines.append(row)
    return [*lines, "", *cpu_split_section(results)]


_CPU_COLUMNS = (("replicas", "replicas"), ("balancer", "balancer"), ("postgres", "PostgreSQL"),
                ("load", "wrk or pgbench"))


def cpu_split(results: Results, variant: str) -> dict[str, float] | None:
    """Median CPU us per request of each part for one path, ``other`` (what the machine spent
    beyond the parts) and ``machine``; None when the run did not measure it."""
    medians = {}
    for part in (*(p for p, _ in _CPU_COLUMNS), "machine"):
        s = summarize(results.get(f"stack_cpu_us_{part}", variant))
        if s is None:
            return None
        medians[part] = s.median
    medians["other"] = max(0.0, medians["machine"] - sum(medians[p] for p, _ in _CPU_COLUMNS))
    return medians


def cpu_split_section(results: Results) -> list[str]:
    variants = [v for v in results.values.get("stack_get_rps", {}) if cpu_split(results, v)]
    if not variants:
        return []
    lines = [
        "Where the CPU goes: CPU us per request (per transaction for pgbench), medians of the "
        "rounds, from /proc. Each process's user + system time; PostgreSQL is the postmaster "
        "and all its backends; *all* is what every core of the machine spent (user, system, "
        "interrupts; not idle or steal), and *other* is *all* less the named parts (0 where "
        "the parts' medians add up to more than *all*'s, each being a median of its own): kernel "
        "work no process is charged for, the bench itself, anything else running.",
        "",
        "| path | " + " | ".join(title for _, title in _CPU_COLUMNS)
        + " | other | all | cores busy |",
        "|---" * (len(_CPU_COLUMNS) + 4) + "|",
    ]
    for v in variants:
        split = cpu_split(results, v)
        assert split is not None
        cells = [fmt_num(split[part]) if split[part] else "-" for part, _ in _CPU_COLUMNS]
        busy = fmt(results.get("stack_busy_cores", v), spread=False)
        lines.append(f"| {v} | " + " | ".join(cells)
                     + f" | {fmt_num(split['other'])} | {fmt_num(split['machine'])} | {busy} |")
    return [*lines, ""]


#: How the rounds of a run were ordered, by ``meta["order"]`` (absent in runs before it was
#: recorded, which rotated by one each round).
ORDERS = {
    "rotated": "A B A B, order rotated each round",
    "reversed": "A B, then B A: each round the one before reversed, every second one moved on "
                "by one",
}


def write(results: Results, path: Path, pngs: list[Path]) -> Path:
    meta = results.meta
    opts = meta.get("options", {})
    lines = [
        f"# varstack benchmark, {meta.get('started', '?')}",
        "",
        f"`{meta.get('argv', 'python -m bench')}`: {opts.get('rounds')} interleaved rounds "
        f"({ORDERS[meta.get('order', 'rotated')]}) of {opts.get('seconds', 0):g} s per run; "
        f"{meta.get('duration_s', '?')} s in all. Every figure is the **median of the rounds "
        "[min-max]**; ratios are taken round by round, then the median. The machine is shared "
        "and noisy: compare ratios, not absolute numbers across runs.",
        "",
        "## Targets",
        "",
        targets_table(results),
        "",
    ]
    for png in pngs:
        lines.append(f"![{png.stem}]({png.name})")
    lines.append("")
    lines += ["## Machine and versions", "", "| | |", "|---|---|"]
    for k, v in {**meta.get("machine", {}), **meta.get("versions", {}),
                 "varstack (git)": meta.get("git", "?")}.items():
        lines.append(f"| {k} | {v} |")
    lines.append("")
    for note in meta.get("tool_notes", []):
        lines.append(f"- {note}")
    lines += balancer_section(results)
    lines += endpoints_section(results, "service",
                               "## 2. The service: each endpoint on one replica, directly")
    lines += endpoints_section(results, "target",
                               f"## The running stack at {meta.get('target', '?')}")
    lines += stack_section(results)
    ports = ("the target's own" if meta.get("target")
             else "free ones picked per run")
    lines += ["## Commands", "", f"One of each kind, as run (ports are {ports}; "
              "`BENCH_KEYS=10000` in the environment for the scripts):", "", "```sh"]
    for label, cmd in results.commands.items():
        lines.append(f"# {label}")
        lines.append(cmd)
    lines += ["```", ""]
    if results.notes:
        lines += ["## Errors seen", ""]
        lines += [f"- {n}" for n in results.notes[:40]]
        lines.append("")
    path.write_text("\n".join(lines))
    return path
