"""``make bench`` / ``python -m bench``: wrk and hey against the balancer, the service and the whole
stack, side by side with HAProxy, then a markdown report and PNG plots in ``bench/results/``.

Three sections, each comparison interleaved (A B, then B A: each round the one before reversed,
every second one moved on by one; see :func:`rotate`) over ``--rounds`` rounds, so that the noise
of a shared machine hits every variant alike; the report quotes medians with the min-max spread,
and ratios taken round by round:

1. ``balancer``: our balancer alone in front of a backend that costs almost nothing (nginx, one
   worker, a tiny static answer and a 16 MiB file), against HAProxy 2.6 (TCP mode, ``nbthread 1``)
   and against direct: keep-alive req/s, one new connection per request, bulk MiB/s, CPU of the
   proxy process per 1,000 requests and per GiB (from /proc), RSS per idle proxied connection.
2. ``service``: each endpoint on one replica directly (wrk scripts in ``bench/wrk/``, and hey).
3. ``stack``: GET through our balancer and through HAProxy with 1, 2 and 4 replicas, one replica
   directly, and ``pgbench -S`` on the same PostgreSQL (the ceiling the database sets).

``--target URL`` measures a stack that is already running (every endpoint through it, wrk and hey)
instead of sections 2 and 3.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import http.client
import json
import os
import resource
import shlex
import signal
import socket
import subprocess
import sys
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import load, plots, report
from bench.procs import ROOT, Proc, Procs, free_port, free_ports
from bench.stats import Results
from bench.tools import Tools, ensure, machine, versions
from common.net import http_url_problem

RESULTS_DIR = ROOT / "bench" / "results"
#: wrk scripts per endpoint, and the hey request that stands for each (hey sends one fixed
#: request, so its POST answers 409 after the first and its DELETE 404: one statement each).
ENDPOINTS: dict[str, tuple[str, str, str, str | None]] = {
    # name: (wrk script, hey method, hey path, hey JSON body)
    "get_query": ("get_query.lua", "GET", "/get_var?key=bench-1", None),
    "get_body": ("get_body.lua", "GET", "/get_var", '{"key": "bench-2"}'),
    "set": ("set.lua", "POST", "/set_var", '{"key": "bench-3", "value": "v"}'),
    "edit": ("edit.lua", "PUT", "/edit_var", '{"key": "bench-4", "value": "hey"}'),
    "delete": ("delete.lua", "DELETE", "/delete_var?key=hey-gone", None),
    "mix": ("mix.lua", "", "", None),
}
ENDPOINT_LABELS = {
    "get_query": "GET /get_var?key=",
    "get_body": "GET /get_var + JSON body",
    "set": "POST /set_var (new keys)",
    "edit": "PUT /edit_var",
    "delete": "DELETE /delete_var",
    "mix": "mix (80% GET, 15% PUT, 5% POST)",
}
SERVER_COUNTS = (1, 2, 4)
BENCH_KEYS = 10000
WRK_THREADS_SERVICE = 2  # the README's command line: wrk -t2 -c64
CONNECTIONS = 64
BULK_CONNECTIONS = 4


@dataclass
class Options:
    rounds: int
    seconds: float
    idle: int
    quick: bool
    sections: tuple[str, ...]
    target: str | None
    out: Path
    install: bool
    bench_keys: int
    replot: Path | None = None


class Progress:
    def __init__(self) -> None:
        self.started = time.monotonic()

    def __call__(self, text: str) -> None:
        elapsed = time.monotonic() - self.started
        print(f"[{int(elapsed) // 60:2d}:{int(elapsed) % 60:02d}] {text}", flush=True)


say = Progress()


def rotate(items: Sequence[str], round_no: int) -> list[str]:
    """The variants in a different order each round (A B, then B A, ...): no position bias.

    Every other round is the round before reversed, and the order moves on by one every two
    rounds: two variants go A B, B A, B A, A B; three go through all six orders in six rounds;
    and any two of many swap places from one round to the next. (A rotation by one each round,
    reversed only after a full turn, kept each of the stack's eight variants before its
    neighbour for eight rounds: our balancer was measured before HAProxy in every round.)"""
    k = (round_no // 2) % len(items)
    order = [*items[k:], *items[:k]]
    return order[::-1] if round_no % 2 else order


def _wrk_with_cpu(url: str, *procs: Proc,
                  **wrk_args: Any) -> tuple[load.LoadResult, list[tuple[float, float]]]:
    """One wrk run against ``url``, and the (user, kernel) CPU seconds each of ``procs`` spent
    during it."""
    before = [load.cpu_times(proc.pid) for proc in procs]
    res = load.run_wrk(url, **wrk_args)
    after = [load.cpu_times(proc.pid) for proc in procs]
    return res, [(u1 - u0, s1 - s0) for (u0, s0), (u1, s1) in zip(before, after, strict=True)]


def _record_cpu(results: Results, metric: str, variant: str, spent: tuple[float, float],
                requests: int) -> float:
    """The proxy's CPU ms per 1,000 requests, in all and split into user and kernel time."""
    user, kernel = (seconds / requests * 1e6 for seconds in spent)
    results.add(f"{metric}_cpu_ms_per_1k", variant, user + kernel)
    results.add(f"{metric}_user_ms_per_1k", variant, user)
    results.add(f"{metric}_kernel_ms_per_1k", variant, kernel)
    return sum(spent)


def _record(results: Results, section: str, metric: str, variant: str, round_no: int,
            res: load.LoadResult, **extra: float) -> None:
    results.runs.append({"section": section, "metric": metric, "variant": variant,
                         "round": round_no, **asdict(res), **extra})
    if res.errors or res.non_2xx:
        results.notes.append(
            f"{section}/{metric}/{variant} round {round_no + 1}: {res.errors} socket errors, "
            f"{res.non_2xx} non-2xx/3xx answers ({res.requests} requests)"
        )


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --- section 1: the balancer alone -------------------------------------------------------------


def _established_to(port: int) -> int:
    """Established TCP connections whose remote port is ``port`` (proxy -> backend)."""
    done = subprocess.run(["ss", "-Htn", "state", "established", f"( dport = :{port} )"],
                          capture_output=True, text=True, timeout=30, check=False)
    return len([line for line in done.stdout.splitlines() if line.strip()])


def idle_rss_per_conn(proxy: Proc, backend_port: int, count: int) -> float:
    """RSS growth of the proxy, KiB per idle proxied connection, with ``count`` of them open."""
    load.run_wrk(f"http://127.0.0.1:{proxy.port}/", seconds=1, connections=8)  # warm the paths
    time.sleep(0.5)
    before = load.rss_kib(proxy.pid)
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
            socks.append(sock)
        deadline = time.monotonic() + 30
        while _established_to(backend_port) < count and time.monotonic() < deadline:
            time.sleep(0.2)
        connected = _established_to(backend_port)
        if connected < count:
            raise RuntimeError(f"only {connected} of {count} connections reached the backend")
        time.sleep(1.0)
        after = load.rss_kib(proxy.pid)
    finally:
        for sock in socks:
            sock.close()
    return (after - before) / count


def _idle_rounds(procs: Procs, tools: Tools, opts: Options, results: Results, backend: Proc,
                 variants: Sequence[str]) -> None:
    """RSS per idle connection, each round with a fresh proxy (no free lists left over from
    the load runs)."""
    for rnd in range(opts.rounds):
        for variant in rotate(variants, rnd):
            if variant == "ours":
                proc = procs.ours([backend.port])
            else:
                proc = procs.haproxy(tools.path("haproxy"), [backend.port])
            try:
                kib = idle_rss_per_conn(proc, backend.port, opts.idle)
            finally:
                procs.stop(proc)
            results.add("idle_kib_per_conn", variant, kib)
            say(f"idle round {rnd + 1}/{opts.rounds}: {variant} {kib:.2f} KiB per idle "
                f"connection ({opts.idle} open)")
    results.commands.setdefault(
        "idle connections",
        f"{opts.idle} TCP connections opened through the proxy and left idle; RSS (VmRSS) of "
        "the proxy process before and after, divided by the count",
    )


def section_balancer(procs: Procs, tools: Tools, opts: Options, results: Results) -> None:
    wrk = tools.path("wrk")
    if tools.has("nginx"):
        backend = procs.nginx(tools.path("nginx"))
        backend_name = "nginx (1 worker, 3-byte answer, 16 MiB /bulk)"
    else:
        backend = procs.responder()
        backend_name = "minimal uvloop responder (nginx missing)"
    results.meta["balancer_backend"] = backend_name
    proxies: dict[str, Proc] = {"direct": backend}
    proxies["ours"] = procs.ours([backend.port])
    if tools.has("haproxy"):
        proxies["haproxy"] = procs.haproxy(tools.path("haproxy"), [backend.port])
        proxies["haproxy-tuned"] = procs.haproxy(tools.path("haproxy"), [backend.port], tuned=True)
    else:
        say("HAProxy missing: section 1 compares ours with direct only")
    say(f"balancer: backend {backend_name} on :{backend.port}; proxies "
        + ", ".join(f"{k} :{p.port}" for k, p in proxies.items() if k != "direct"))
    small = [v for v in ("direct", "ours", "haproxy") if v in proxies]
    bulk = [v for v in ("direct", "ours", "haproxy-tuned", "haproxy") if v in proxies]
    for name in bulk:  # warm-up: every path once
        load.run_wrk(f"http://127.0.0.1:{proxies[name].port}/", seconds=1, connections=16, wrk=wrk)
    secs = opts.seconds
    for rnd in range(opts.rounds):
        say(f"balancer round {rnd + 1}/{opts.rounds}: keep-alive, new connection, bulk")
        for variant in rotate(small, rnd):
            proc = proxies[variant]
            res, (spent, be) = _wrk_with_cpu(f"http://127.0.0.1:{proc.port}/", proc, backend,
                                             seconds=secs, connections=CONNECTIONS, wrk=wrk)
            results.add("ka_rps", variant, res.rps)
            cpu = _record_cpu(results, "ka", variant, spent, res.requests)
            results.add("ka_backend_cpu_ms_per_1k", variant, sum(be) / res.requests * 1e6)
            results.add("ka_p99_ms", variant, res.latency_ms.get("p99", 0.0))
            _record(results, "balancer", "keep-alive", variant, rnd, res, cpu_s=cpu)
            results.commands.setdefault("keep-alive", res.command)
        for variant in rotate(small, rnd):
            proc = proxies[variant]
            res, (spent,) = _wrk_with_cpu(f"http://127.0.0.1:{proc.port}/", proc, seconds=secs,
                                          connections=CONNECTIONS,
                                          headers=("Connection: close",), wrk=wrk)
            results.add("close_rps", variant, res.rps)
            cpu = _record_cpu(results, "close", variant, spent, res.requests)
            _record(results, "balancer", "new-connection", variant, rnd, res, cpu_s=cpu)
            results.commands.setdefault("new connection per request", res.command)
        for variant in rotate(bulk, rnd):
            proc = proxies[variant]
            res, (spent,) = _wrk_with_cpu(f"http://127.0.0.1:{proc.port}/bulk", proc,
                                          seconds=secs, connections=BULK_CONNECTIONS, wrk=wrk)
            cpu = sum(spent)
            results.add("bulk_mib_s", variant, res.mib_s)
            results.add("bulk_cpu_s_per_gib", variant, cpu / (res.bytes_read / (1 << 30)))
            _record(results, "balancer", "bulk", variant, rnd, res, cpu_s=cpu)
            results.commands.setdefault("bulk (16 MiB body)", res.command)
        summary = ", ".join(
            f"{v} {results.get('ka_rps', v)[-1]:.0f}/{results.get('close_rps', v)[-1]:.0f} req/s "
            f"{results.get('bulk_mib_s', v)[-1]:.0f} MiB/s" for v in small)
        say(f"  keep-alive/new-conn/bulk: {summary}")
    idle_variants = [v for v in ("ours", "haproxy") if v in proxies]
    for name in idle_variants:
        procs.stop(proxies[name])
    if "haproxy-tuned" in proxies:
        procs.stop(proxies["haproxy-tuned"])
    if opts.idle:
        _idle_rounds(procs, tools, opts, results, backend, idle_variants)
    else:
        say("idle connections: skipped (--idle 0)")
    procs.stop(backend)


# --- sections 2 and 3: the service and the whole stack -----------------------------------------


def pgbench_cmd(port: int, seconds: float, dbname: str) -> list[str]:
    from stack.pg import _bin_dir

    return [str(_bin_dir() / "pgbench"), "-S", "-M", "prepared", "-c8", "-j2",
            "-T", str(max(1, round(seconds))), "-n", "-h", "127.0.0.1", "-p", str(port),
            "-U", "postgres", dbname]


def _pg_user() -> dict[str, Any]:
    from stack.pg import _as_user, _run_as

    return dict(_as_user(_run_as()))


@dataclass(frozen=True)
class PgbenchResult:
    tps: float
    transactions: int


def run_pgbench(port: int, password: str, seconds: float,
                dbname: str = "pgbench") -> PgbenchResult:
    cmd = pgbench_cmd(port, seconds, dbname)
    done = load.run_load(cmd, timeout=seconds + 60, env={**os.environ, "PGPASSWORD": password},
                         cwd="/", **_pg_user())
    if done.returncode != 0:
        raise RuntimeError(f"pgbench failed: {done.stderr.strip()[-400:]}")
    tps = transactions = None
    for line in done.stdout.splitlines():
        if line.startswith("tps ="):
            tps = float(line.split()[2])
        elif line.startswith("number of transactions actually processed:"):
            transactions = int(line.split(":", 1)[1].split("/")[0])
    if tps is None or transactions is None:
        raise RuntimeError(f"no tps in pgbench output:\n{done.stdout}")
    return PgbenchResult(tps, transactions)


#: The parts of the machine whose CPU the stack section accounts for, per request
#: (``balancer_user``: the user time within ``balancer``'s).
CPU_PARTS = ("replicas", "balancer", "balancer_user", "postgres", "load", "machine")


class CpuSplit:
    """Where the CPU goes while one stack run lasts: each part's CPU seconds from /proc.

    ``load`` is the load generator (wrk or pgbench), a child of this process that has ended by
    the time the run is read; ``machine`` is every core's busy time, whatever spent it.
    """

    def __init__(self, replica_pids: list[int], pg_pid: int) -> None:
        self.replica_pids = replica_pids
        self.pg_pid = pg_pid

    def _read(self, balancer_pid: int | None) -> dict[str, dict[int, float]]:
        readers: dict[str, dict[int, Callable[[int], float]]] = {
            "replicas": {pid: load.cpu_seconds for pid in self.replica_pids},
            "balancer": {balancer_pid: load.cpu_seconds} if balancer_pid else {},
            "balancer_user": {balancer_pid: load.user_cpu_seconds} if balancer_pid else {},
            "postgres": {self.pg_pid: load.tree_cpu_seconds},
        }
        seconds: dict[str, dict[int, float]] = {part: {} for part in readers}
        for part, by_pid in readers.items():
            for pid, read in by_pid.items():
                with contextlib.suppress(OSError):  # a process gone is left out of the sum
                    seconds[part][pid] = read(pid)
        seconds["load"] = {0: load.ended_children_cpu_seconds()}
        seconds["machine"] = {0: load.machine_busy_seconds()}
        return seconds

    @contextlib.contextmanager
    def measure(self, balancer_pid: int | None = None) -> Iterator[dict[str, float]]:
        """Yield a dict that holds, once the block is over, each part's CPU seconds in it and
        ``wall``, its length in seconds."""
        spent: dict[str, float] = {}
        before = self._read(balancer_pid)
        started = time.monotonic()
        yield spent
        after = self._read(balancer_pid)
        spent["wall"] = time.monotonic() - started
        for part, by_pid in before.items():
            spent[part] = sum(after[part][pid] - cpu for pid, cpu in by_pid.items()
                              if pid in after[part])


def record_cpu(results: Results, variant: str, spent: dict[str, float], requests: int) -> None:
    """Each part's CPU per request (us) and the cores the machine kept busy."""
    if requests <= 0 or spent["wall"] <= 0:
        return
    for part in CPU_PARTS:
        results.add(f"stack_cpu_us_{part}", variant, spent[part] / requests * 1e6)
    results.add("stack_busy_cores", variant, spent["machine"] / spent["wall"])


def init_pgbench(port: int, password: str) -> None:
    from stack.pg import _bin_dir

    env = {**os.environ, "PGPASSWORD": password}
    base = ["-h", "127.0.0.1", "-p", str(port), "-U", "postgres"]
    subprocess.run([str(_bin_dir() / "psql"), *base, "-d", "postgres", "-qc",
                    "DROP DATABASE IF EXISTS pgbench", "-c", "CREATE DATABASE pgbench"],
                   capture_output=True, text=True, timeout=60, check=True, env=env, cwd="/",
                   **_pg_user())
    subprocess.run([str(_bin_dir() / "pgbench"), "-i", "-q", "-s", "1", *base, "pgbench"],
                   capture_output=True, text=True, timeout=300, check=True, env=env, cwd="/",
                   **_pg_user())


async def seed_sql(dsn: str, keys: int, delete_per_thread: int, threads: int) -> None:
    """Pre-seed ``bench-0..keys-1`` and ``del-<thread>-<n>`` in one statement each."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "INSERT INTO public.variables (key, value) "
            "SELECT 'bench-' || g, 'value-' || g FROM generate_series(0, $1::int - 1) g "
            "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value", keys)
        await conn.execute(
            "INSERT INTO public.variables (key, value) "
            "SELECT 'del-' || t || '-' || n, 'v' FROM generate_series(1, $1::int) t, "
            "generate_series(1, $2::int) n ON CONFLICT (key) DO NOTHING",
            threads, delete_per_thread)
        await conn.execute("ANALYZE public.variables")
    finally:
        await conn.close()


async def seed_http(url: str, keys: int, delete_per_thread: int, threads: int) -> None:
    """Pre-seed through the API (``--target``): POST every key (409s are fine), 32 at a time."""
    import aiohttp

    names = [f"bench-{i}" for i in range(keys)]
    names += [f"del-{t}-{n}" for t in range(1, threads + 1)
              for n in range(1, delete_per_thread + 1)]
    queue = iter(names)

    async def worker(session: aiohttp.ClientSession) -> None:
        for key in queue:
            async with session.post(f"{url}/set_var",
                                    json={"key": key, "value": f"value-{key}"}) as resp:
                await resp.read()

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session) for _ in range(32)))


def measure_endpoints(url: str, label: str, tools: Tools, opts: Options, results: Results,
                      reseed: Callable[[], None]) -> None:
    """Every endpoint on ``url``: wrk (scripts, random pre-seeded keys) and hey (one request)."""
    wrk = tools.path("wrk")
    env = {"BENCH_KEYS": str(opts.bench_keys)}
    load.run_wrk(f"{url}/get_var?key=bench-1", seconds=1, connections=16, wrk=wrk)  # warm-up
    for rnd in range(opts.rounds):
        say(f"{label} round {rnd + 1}/{opts.rounds}: wrk " + " ".join(ENDPOINTS)
            + (" + hey" if tools.has("hey") else ""))
        line = []
        for name in rotate(list(ENDPOINTS), rnd):
            script = ENDPOINTS[name][0]
            if name == "delete":
                reseed()
            res = load.run_wrk(url, seconds=opts.seconds, connections=CONNECTIONS,
                               threads=WRK_THREADS_SERVICE, script=script, env=env, wrk=wrk)
            metric = f"{label}_wrk_{name}"
            results.add(metric, "rps", res.rps)
            for p, v in res.latency_ms.items():
                results.add(metric, p, v)
            results.add(metric, "non2xx", float(res.non_2xx))
            results.add(metric, "errors", float(res.errors))
            if name != "delete":  # deletes run past the seeded keys: 404s expected
                _record(results, label, f"wrk {name}", "direct", rnd, res)
            else:
                results.runs.append({"section": label, "metric": "wrk delete", "round": rnd,
                                     **asdict(res)})
            results.commands.setdefault(f"{label} wrk {name}", res.command)
            line.append(f"{name} {res.rps:.0f}")
        if tools.has("hey"):
            for name in rotate([n for n in ENDPOINTS if ENDPOINTS[n][1]], rnd):
                _, method, path, body = ENDPOINTS[name]
                res = load.run_hey(f"{url}{path}", seconds=opts.seconds, connections=CONNECTIONS,
                                   method=method, body=body, hey=tools.path("hey"))
                metric = f"{label}_hey_{name}"
                results.add(metric, "rps", res.rps)
                for p, v in res.latency_ms.items():
                    results.add(metric, p, v)
                results.add(metric, "errors", float(res.errors))
                results.runs.append({"section": label, "metric": f"hey {name}", "round": rnd,
                                     **asdict(res)})
                results.commands.setdefault(f"{label} hey {name}", res.command)
                line.append(f"hey-{name} {res.rps:.0f}")
        say("  req/s: " + ", ".join(line))


def section_stack_measure(stack_info: dict[str, Any], procs: Procs, tools: Tools, opts: Options,
                          results: Results, seed: Callable[[], None]) -> None:
    """Sections 2 and 3 on a running stack (called in a thread: the stack's loop keeps going)."""
    wrk = tools.path("wrk")
    ports: list[int] = stack_info["replica_ports"]
    pg_port: int = stack_info["pg_port"]
    password: str = stack_info["pg_password"]
    env = {"BENCH_KEYS": str(opts.bench_keys)}
    if "service" in opts.sections:
        measure_endpoints(f"http://127.0.0.1:{ports[0]}", "service", tools, opts, results, seed)
    if "stack" not in opts.sections:
        return
    say("stack: pgbench -i (scale 1) on the stack's PostgreSQL; balancers for 1, 2, 4 replicas")
    init_pgbench(pg_port, password)
    results.commands["pgbench"] = load.display(pgbench_cmd(pg_port, opts.seconds, "pgbench"))
    targets: dict[str, int] = {"direct-1": ports[0]}
    balancer_pids: dict[str, int] = {}
    for n in SERVER_COUNTS:
        if n > len(ports):
            continue
        # Our balancer exactly as the stack runs it (python -m lb, its defaults), on a subset.
        balancers = {f"ours-{n}": procs.ours(ports[:n], extra_env={
            "LB_MAX_CONNECTIONS": "4096", "LB_BACKLOG": "1024"})}
        if tools.has("haproxy"):
            balancers[f"haproxy-{n}"] = procs.haproxy(tools.path("haproxy"), ports[:n])
        for name, proc in balancers.items():
            targets[name] = proc.port
            balancer_pids[name] = proc.pid
    variants = ["pgbench", *targets]
    for name, port in targets.items():  # warm-up: pools filled, code paths hot
        load.run_wrk(f"http://127.0.0.1:{port}/get_var?key=bench-1", seconds=1,
                     connections=CONNECTIONS, threads=WRK_THREADS_SERVICE, wrk=wrk)
        say(f"  warmed {name} (:{port})")
    run_pgbench(pg_port, password, 1)
    cpu = CpuSplit(stack_info["replica_pids"], stack_info["pg_pid"])
    for rnd in range(opts.rounds):
        say(f"stack round {rnd + 1}/{opts.rounds}: " + " ".join(rotate(variants, rnd)))
        line = []
        for variant in rotate(variants, rnd):
            if variant == "pgbench":
                with cpu.measure() as spent:
                    bench = run_pgbench(pg_port, password, opts.seconds)
                results.add("stack_get_rps", "pgbench", bench.tps)
                record_cpu(results, "pgbench", spent, bench.transactions)
                line.append(f"pgbench {bench.tps:.0f} tps")
                continue
            with cpu.measure(balancer_pids.get(variant)) as spent:
                res = load.run_wrk(f"http://127.0.0.1:{targets[variant]}",
                                   seconds=opts.seconds, connections=CONNECTIONS,
                                   threads=WRK_THREADS_SERVICE, script="get_query.lua", env=env,
                                   wrk=wrk)
            results.add("stack_get_rps", variant, res.rps)
            record_cpu(results, variant, spent, res.requests)
            for p, v in res.latency_ms.items():
                results.add(f"stack_get_{p}", variant, v)
            _record(results, "stack", "GET", variant, rnd, res)
            results.commands.setdefault("stack GET", res.command)
            line.append(f"{variant} {res.rps:.0f}")
        say("  " + ", ".join(line))


async def with_stack(procs: Procs, tools: Tools, opts: Options, results: Results) -> None:
    from stack import Stack, StackConfig
    from stack.process import Output

    count = max(SERVER_COUNTS) if "stack" in opts.sections else 1
    env = {**os.environ, "SERVICE_ACCESS_LOG": "off", "SERVICE_LOG_LEVEL": "warning",
           "LB_LOG_LEVEL": "warning", "PYTHONUNBUFFERED": "1"}
    data_dir = procs.dir / "stack"
    config = StackConfig.from_env(
        env, server_count=count, lb_host="127.0.0.1", lb_port=free_port(), lb_admin_port=0,
        backend_port=free_ports(count), data_dir=data_dir, embedded_pg_port=free_port(),
    )
    log_path = procs.dir / "stack.log"
    say(f"stack: starting embedded PostgreSQL + {count} replica(s) + balancer "
        f"(log: {log_path})")
    with log_path.open("w") as log:
        stack = Stack(config, output=Output(log))
        try:
            await stack.start()
            assert stack.database is not None
            db = stack.database
            results.meta["stack"] = {"replicas": count, "balancer": stack.url,
                                     "replica_ports": config.replica_ports}
            per_thread = max(5000, int(opts.seconds * 6000))

            def seed() -> None:
                asyncio.run(seed_sql(db.dsn, opts.bench_keys, per_thread, WRK_THREADS_SERVICE))

            await asyncio.to_thread(seed)
            say(f"stack: ready at {stack.url}; seeded {opts.bench_keys} keys bench-N and "
                f"{WRK_THREADS_SERVICE}x{per_thread} del-T-N keys")
            assert db.pid is not None
            info = {"replica_ports": config.replica_ports, "pg_port": db.port,
                    "pg_password": db.password, "pg_pid": db.pid,
                    "replica_pids": [replica.pid for replica in stack.replicas
                                     if replica.pid is not None]}
            await asyncio.to_thread(section_stack_measure, info, procs, tools, opts, results,
                                    seed)
        except (asyncio.CancelledError, KeyboardInterrupt, load.Stopped):
            # Ctrl-C or SIGTERM: the measuring thread cannot be cancelled, so its load is cut
            # instead; else it would go on measuring a stack stopped under it.
            load.stop_loads()
            raise
        except BaseException:
            log.flush()
            print("stack log (last lines):\n" + "\n".join(
                log_path.read_text(errors="replace").splitlines()[-30:]), file=sys.stderr)
            raise
        finally:
            say("stack: stopping")
            # A further Ctrl-C or SIGTERM hurries the stop (whatever still runs is killed)
            # instead of cutting it short, which would leave the embedded PostgreSQL running.
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, stack.force_stop.set)
            try:
                await stack.stop()
            finally:
                for signum in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(signum)


def target_problem(url: str, timeout: float = 5.0) -> str | None:
    """Why ``url`` cannot be measured, or None: its /healthcheck must answer 200, and a key
    written through it must read back (else every figure would be of error answers)."""
    # Straight to it, as wrk and hey go: not through an http_proxy of the environment.
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    probe = f"bench-probe-{os.getpid()}-{time.monotonic_ns()}"
    steps = [
        ("GET", "/healthcheck", None, 200),
        ("POST", "/set_var", {"key": probe, "value": "v"}, 201),
        ("GET", f"/get_var?key={probe}", None, 200),
        ("DELETE", f"/delete_var?key={probe}", None, 204),
    ]
    problem = None
    for method, path, body, wanted in steps:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{url}{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        text = ""
        try:
            with direct.open(request, timeout=timeout) as answer:
                text = answer.read().decode("utf-8", "replace")
                status = answer.status
        except urllib.error.HTTPError as exc:
            # One line of it: an HTML error page would fill the terminal.
            text = " ".join(exc.read().decode("utf-8", "replace").split())
            text = text if len(text) <= 80 else text[:77] + "..."
            status = exc.code
            if path == "/healthcheck":
                return f"its /healthcheck answers {status}" + (f" ({text})" if text else "")
        except (OSError, http.client.HTTPException) as exc:
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            if path == "/healthcheck":
                return f"nothing answers at {url} ({str(reason).strip()})"
            problem = f"{method} {path.split('?')[0]} got no answer ({str(reason).strip()})"
            break
        if status != wanted or (method == "GET" and path != "/healthcheck" and text != "v"):
            problem = (f"it does not answer as varstack does: {method} {path.split('?')[0]} "
                       f"answered {status}" + (f", not {wanted}" if status != wanted else
                                               f" with {text[:50]!r}, not 'v'"))
            break
    if problem is not None:  # the probe key may be stored: it is not left behind
        with contextlib.suppress(OSError, http.client.HTTPException):
            direct.open(urllib.request.Request(f"{url}/delete_var?key={probe}",
                                               method="DELETE"), timeout=timeout).close()
    return problem


def section_target(tools: Tools, opts: Options, results: Results) -> None:
    assert opts.target is not None
    url = opts.target.rstrip("/")
    # As many as a delete run can reach (through the API, under 2,000/s per wrk thread here),
    # so its figure is deletes, not 404s.
    per_thread = max(2000, int(opts.seconds * 3000))
    say(f"target {url}: seeding {opts.bench_keys} keys and {WRK_THREADS_SERVICE}x{per_thread} "
        "delete keys through the API")

    def seed() -> None:
        asyncio.run(seed_http(url, opts.bench_keys, per_thread, WRK_THREADS_SERVICE))

    seed()
    results.meta["target"] = url
    measure_endpoints(url, "target", tools, opts, results, seed)


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 3 rounds of 1 s, 1,000 idle connections (~2 min)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5; --quick: 3)")
    parser.add_argument("--seconds", type=int,
                        help="whole seconds per load run, as wrk and hey take them (default 2)")
    parser.add_argument("--idle", type=int,
                        help="idle connections for the RSS figure (default 5000; --quick: 1000; "
                             "0 skips that figure)")
    parser.add_argument("--sections", default=None,
                        help="comma-separated: balancer,service,stack (default: all; with "
                             "--target: target)")
    parser.add_argument("--target", help="measure this running stack (http://host:port) instead "
                                         "of starting one")
    parser.add_argument("--out", type=Path,
                        help="where the report and plots go (default bench/results; with "
                             "--replot, required)")
    parser.add_argument("--no-install", action="store_true",
                        help="do not apt-get install missing tools")
    parser.add_argument("--replot", type=Path, metavar="RAW_JSON",
                        help="rewrite the report and plots from bench/results/raw/<run>.json")
    args = parser.parse_args(argv)
    rounds = (3 if args.quick else 5) if args.rounds is None else args.rounds
    if rounds < 1:
        parser.error("--rounds must be at least 1")
    seconds = (1 if args.quick else 2) if args.seconds is None else args.seconds
    if seconds < 1:
        parser.error("--seconds must be at least 1 (wrk and hey run whole seconds)")
    idle = ((1000 if args.quick else report.IDLE_TARGET_CONNECTIONS) if args.idle is None
            else args.idle)
    if idle < 0:
        parser.error("--idle must be 0 (skip the idle-connection figure) or more")
    if args.target is not None:
        problem = http_url_problem(args.target)
        if problem:
            parser.error(f"--target {problem}")
    # Told before the run, not after it with everything measured lost.
    out = RESULTS_DIR if args.out is None else args.out
    problem = _out_problem(out)
    if problem:
        parser.error(f"--out {out}: cannot make a directory there ({problem})")
    if args.replot is not None and not args.replot.is_file():
        parser.error(f"--replot: no such file: {args.replot}")
    if args.replot is not None and args.out is None:
        # Not bench/results by default: that would rewrite a committed report in today's words.
        parser.error("--replot needs --out DIR: the committed report stays as its run wrote it")
    if args.sections is not None:
        sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
        if not sections:
            parser.error(f"--sections names no section: {args.sections!r}")
    else:
        sections = ("target",) if args.target else ("balancer", "service", "stack")
    bad = set(sections) - {"balancer", "service", "stack", "target"}
    if bad:
        parser.error(f"--sections: unknown {', '.join(repr(b) for b in sorted(bad))} (choose "
                     "from balancer, service, stack, target)")
    if "target" in sections and not args.target:
        parser.error("the target section needs --target URL")
    if args.target and sections != ("target",):
        parser.error("--target measures a running stack: --sections can only be target with it")
    return Options(
        rounds=rounds,
        seconds=float(seconds),
        idle=idle,
        quick=args.quick,
        sections=sections,
        target=args.target,
        out=out,
        install=not args.no_install,
        bench_keys=BENCH_KEYS,
        replot=args.replot,
    )


def _out_problem(out: Path) -> str | None:
    """Why the report cannot be written under ``out`` (made there after the run), or None:
    nothing is made now, so a run refused or stopped early leaves nothing behind."""
    raw = out.absolute() / "raw"
    if raw.exists() and not raw.is_dir():
        return f"{raw} is not a directory"
    path = out.absolute()
    while not path.exists():
        if path.is_symlink():
            return "a dangling symbolic link is in the way"
        path = path.parent
    if not path.is_dir():
        return f"{path} is not a directory"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"{path} is not writable"
    return None


@contextlib.contextmanager
def _terminate_on_signal() -> Iterator[None]:
    """SIGTERM behaves like Ctrl-C: every process we started is stopped on the way out.

    It is handled by Ctrl-C's own handler: inside asyncio.run that cancels the main task, so
    the stack's stop runs to its end (a KeyboardInterrupt raised in the middle of the loop
    interrupted that stop too, and left the embedded PostgreSQL running)."""
    def handler(signum: int, frame: Any) -> None:
        on_interrupt = signal.getsignal(signal.SIGINT)
        if callable(on_interrupt) and on_interrupt is not signal.default_int_handler:
            on_interrupt(signal.SIGINT, frame)  # asyncio.run's: cancels the main task
        else:  # outside asyncio.run, or SIGINT ignored (a background job of a script)
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _section(name: str, results: Results, fn: Callable[..., None], *args: Any) -> None:
    try:
        fn(*args)
    except (Exception, subprocess.SubprocessError) as exc:
        traceback.print_exc()
        say(f"section {name} failed: {exc}; the report keeps what was measured")
        results.notes.append(f"section {name} FAILED: {type(exc).__name__}: {exc}")


def _git() -> str:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "--no-optional-locks", "-C", str(ROOT), *args],
                                  capture_output=True, text=True, timeout=10,
                                  check=False).stdout.strip()
        except OSError:
            return ""

    head = git("rev-parse", "--short", "HEAD") or "?"
    dirty = len(git("status", "--porcelain", "--untracked-files=no").splitlines())
    return f"{head}" + (f" + {dirty} modified file{'s' * (dirty != 1)}" if dirty else "")


def free_stem(out: Path, stem: str) -> str:
    """``stem``, or ``stem-2``, ``stem-3``, ...: a second run on one day keeps the first's
    report and raw run (the README may quote them)."""
    candidate, n = stem, 1
    while (out / f"{candidate}.md").exists() or (out / "raw" / f"{candidate}.json").exists():
        n += 1
        candidate = f"{stem}-{n}"
    return candidate


def write_outputs(results: Results, out: Path, stem: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    pngs = plots.write_all(results, out, stem)
    md = report.write(results, out / f"{stem}.md", pngs)
    say(f"report: {md.relative_to(ROOT) if md.is_relative_to(ROOT) else md}")
    for png in pngs:
        say(f"plot:   {png.relative_to(ROOT) if png.is_relative_to(ROOT) else png}")
    print()
    print(report.targets_table(results))


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.replot is not None:
        try:
            raw = json.loads(opts.replot.read_text())
            results = Results(values=raw["values"], runs=raw["runs"], commands=raw["commands"],
                              notes=raw["notes"], meta=raw["meta"])
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            print(f"--replot: {opts.replot} is not a raw results file of python -m bench "
                  f"({type(exc).__name__}: {exc})", file=sys.stderr)
            return 2
        write_outputs(results, opts.out, opts.replot.stem)
        return 0
    if opts.target is not None:
        problem = target_problem(opts.target.rstrip("/"))
        if problem is not None:
            print(f"cannot measure --target {opts.target}: {problem}; start the stack "
                  "(make run) or point --target at its balancer", file=sys.stderr)
            return 1
    _raise_nofile()
    say(f"varstack bench: sections {', '.join(opts.sections)}; {opts.rounds} rounds of "
        f"{opts.seconds:g} s per run" + (" (quick)" if opts.quick else ""))
    tools = ensure(["wrk", "hey", "haproxy", "nginx"], install=opts.install, say=say)
    for note in tools.notes:
        say(note)
    if not tools.has("wrk"):
        print("wrk is required (Debian: apt-get install wrk)", file=sys.stderr)
        return 1
    results = Results()
    started = dt.datetime.now().astimezone()
    results.meta.update({
        "started": started.isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(tools),
        "options": {"rounds": opts.rounds, "seconds": opts.seconds, "idle": opts.idle,
                    "quick": opts.quick, "sections": list(opts.sections),
                    "target": opts.target},
        "git": _git(),
        "order": "reversed",  # how rotate() orders the rounds (the report says it)
        "argv": "python -m bench " + shlex.join(sys.argv[1:] if argv is None else list(argv)),
        "tool_notes": tools.notes,
    })
    procs = Procs()
    clock = time.monotonic()
    load.allow_loads()
    try:
        with _terminate_on_signal():
            # A section that fails is reported and the next one runs: what was measured is kept.
            if "balancer" in opts.sections:
                _section("balancer", results, section_balancer, procs, tools, opts, results)
            if "service" in opts.sections or "stack" in opts.sections:
                _section("service/stack", results,
                         lambda: asyncio.run(with_stack(procs, tools, opts, results)))
            if "target" in opts.sections:
                _section("target", results, section_target, tools, opts, results)
    except (KeyboardInterrupt, load.Stopped):
        load.stop_loads()
        say("interrupted: stopping everything started")
        return 130
    finally:
        # Not cut short by a further signal: that would leave nginx, HAProxy or a balancer.
        previous = {signum: signal.signal(signum, signal.SIG_IGN)
                    for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            procs.stop_all()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    results.meta["duration_s"] = round(time.monotonic() - clock)
    opts.out.mkdir(parents=True, exist_ok=True)
    raw_dir = opts.out / "raw"
    raw_dir.mkdir(exist_ok=True)
    stem = free_stem(opts.out, started.strftime("%Y-%m-%d") + ("-quick" if opts.quick else "")
                     + ("-target" if opts.target else ""))
    (raw_dir / f"{stem}.json").write_text(json.dumps(results.to_json(), indent=1))
    write_outputs(results, opts.out, stem)
    return 0


if __name__ == "__main__":
    sys.exit(main())
