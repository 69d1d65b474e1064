"""``python -m chaos run`` (``make chaos``): the fault suite's proof, for users.

Starts the whole stack (embedded PostgreSQL, 3 replicas, the balancer) in a scratch
directory, drives it with concurrent clients (new connection per request and keep-alive)
through the balancer, fires the faults one after another with steady load between them,
and prints a verdict table: requests and failures per fault and why, recovery times,
acknowledged writes checked against the database, the history's linearizability, leaks.
Exit status 0 when nothing was lost and every failure is one the fault explains, else 1;
2 for a bad option; 128 + the signal's number after Ctrl-C (SIGINT), SIGTERM or SIGHUP,
which stop the stack and remove its scratch directory first (``--data-dir``'s is kept);
under ``nohup`` SIGHUP stays ignored.
Once the stack is stopping, a signal does not cut the stop short (that left PostgreSQL
running): it hurries it, killing what still runs. So a signal while the stack stops at the end
of a run only hurries that stop: the run's report and exit status stand.

``--url`` targets a stack that is already running instead (no faults: it cannot signal
processes it does not own): the load, the history check and a final read-back through the
API.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import aiohttp

import common.signals
from chaos.client import call
from chaos.history import final_state_check
from chaos.linearizability import CheckResult
from chaos.load import Load, LoadConfig
from chaos.model import State
from chaos.system import (
    Baseline,
    Durability,
    Fault,
    Judged,
    Leaks,
    Lines,
    baseline,
    check_durability,
    check_leaks,
    hang_database,
    hang_replica,
    judge,
    kill_replica,
    restart_database,
    stack_config,
    summarize_failures,
)
from common.net import http_url_problem
from stack.process import Output
from stack.supervisor import Stack

FAULTS = ("kill", "hang", "pg-fast", "pg-immediate", "pg-hang")


@dataclass
class Plan:
    faults: Sequence[str] = FAULTS
    settle: float = 25.0
    """Seconds of steady load before the first fault and after each one."""
    fresh_workers: int = 4
    keepalive_workers: int = 4
    loop: str = "auto"
    seed: int = 0


@dataclass
class Report:
    judged: list[Judged] = field(default_factory=list)
    steady: Judged | None = None
    durability: Durability | None = None
    history: CheckResult | None = None
    leaks: Leaks | None = None
    requests: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (not self.errors and all(j.ok for j in self.judged)
                and (self.steady is None or self.steady.ok)
                and (self.durability is None or self.durability.ok)
                and (self.history is None or self.history.ok)
                and (self.leaks is None or self.leaks.ok))


async def run_faults(stack: Stack, lines: Lines, plan: Plan, out: TextIO) -> Report:
    report = Report()
    max_seconds = plan.settle * (len(plan.faults) + 2) + 60 * len(plan.faults) + 60
    # The count bound is at least what the clients can send in that time (each pauses between
    # two requests), so the end of the plan ends the load: a fixed 100,000 ran out before the
    # last faults of a full run once the stack got faster, and those faults met no load.
    workers = plan.fresh_workers + plan.keepalive_workers
    load = Load(LoadConfig(
        stack.config.client_host, stack.config.lb_port, fresh_workers=plan.fresh_workers,
        keepalive_workers=plan.keepalive_workers, run_id=f"chaos{time.time_ns() % 10**9}",
        max_seconds=max_seconds, max_ops=math.ceil(max_seconds / LoadConfig.pause) * workers,
        seed=plan.seed,
    ))
    base: Baseline = await baseline(stack)
    faults: list[Fault] = []
    say = _say(out)
    load.start()
    began = time.monotonic()
    try:
        await asyncio.sleep(plan.settle)
        steady_end = time.monotonic()
        for name in plan.faults:
            say(f"fault: {name}")
            if name == "kill":
                fault = await kill_replica(stack, 0)
            elif name == "hang":
                fault = await hang_replica(stack, 1, hold=1.0)
            elif name in ("pg-fast", "pg-immediate"):
                fault = await restart_database(stack, name.removeprefix("pg-"), down_for=2.0)
            elif name == "pg-hang":
                fault = await hang_database(stack)
            else:
                raise ValueError(f"unknown fault {name!r}; choose from {', '.join(FAULTS)}")
            faults.append(fault)
            say(f"  {fault.name}: whole again after {fault.recovered - fault.started:.2f}s")
            await asyncio.sleep(plan.settle)
    except Exception as exc:
        report.errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        await load.stop()
    report.seconds = time.monotonic() - began
    report.requests = len(load.attempts)
    lb_lines = lines.of("load_balancer")
    first_fault = faults[0].started if faults else float("inf")
    report.steady = judge(Fault("steady load (no fault)", "none", began, began, steady_end),
                          load, lb_lines, until=first_fault)
    for i, fault in enumerate(faults):
        until = faults[i + 1].started if i + 1 < len(faults) else float("inf")
        report.judged.append(judge(fault, load, lb_lines, until=until))
    assert stack.database is not None
    say("checking: acknowledged writes against the database, the history, leaks")
    report.durability = await check_durability(load, stack.database.dsn)
    report.history = report.durability.history
    report.leaks = await check_leaks(stack, base)
    return report


async def run_against(url: str, plan: Plan, seconds: float, out: TextIO) -> Report:
    """No faults: load, history, and a final read of every key through the API."""
    parts = urlsplit(url)
    load = Load(LoadConfig(parts.hostname or "127.0.0.1", parts.port or 80,
                           fresh_workers=plan.fresh_workers,
                           keepalive_workers=plan.keepalive_workers,
                           run_id=f"chaos{time.time_ns() % 10**9}", max_seconds=seconds,
                           seed=plan.seed))
    report = Report()
    began = time.monotonic()
    await load.run()
    report.seconds = time.monotonic() - began
    report.requests = len(load.attempts)
    report.steady = judge(Fault("steady load (no fault)", "none", began, began, began),
                          load, [], until=float("inf"))
    history = [op for op in load.recording.history if "-once-" not in op.key]
    async with aiohttp.ClientSession() as session:

        async def final(key: str) -> State:
            reply = await call(session, url, "get", key, style="query")
            if reply.status not in (200, 404):
                raise RuntimeError(f"final read of {key!r} answered {reply.status}")
            return reply.text if reply.status == 200 else None

        report.history = await final_state_check(
            history, final, keys={f"{load.config.run_id}-{k}" for k in load.config.contended_keys})
        once = load.write_once_acknowledged()
        lost = []
        for key, value in once.items():
            if await final(key) != value:
                lost.append(key)
    report.durability = Durability(len(once), lost, report.history,
                                   len(load.recording.acknowledged_writes),
                                   read_from="the API")
    return report


async def url_problem(url: str) -> str | None:
    """Why the stack at ``url`` cannot be run against (its /healthcheck is not 200), or None."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session, \
                session.get(f"{url}/healthcheck") as reply:
            if reply.status != 200:
                return f"its /healthcheck answers {reply.status}"
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return f"nothing answers at {url} ({type(exc).__name__}: {exc})"
    return None


def table(report: Report) -> str:
    rows = [("fault", "requests", "failed", "explained", "unexplained", "recovery", "why")]
    for j in ([report.steady] if report.steady else []) + report.judged:
        recovery = "-" if j.fault.recovery is None else f"{j.fault.recovery:.2f}s"
        rows.append((j.fault.name, str(j.requests), str(len(j.failures)), str(len(j.explained)),
                     str(len(j.unexplained)), recovery, j.why()))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for n, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:-1], widths[1:],
                                                                       strict=True)]
        lines.append("  ".join([*cells, r[-1]]))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 3)
    for j in report.judged:
        details = ", ".join(f"{k} {v:.2f}s" for k, v in j.fault.details.items())
        lines.append(f"  {j.fault.name}: {details}" + (
            f"; {'; '.join(j.fault.notes)}" if j.fault.notes else ""))
        if j.unexplained:
            lines.append("    unexplained failures:")
            lines += ["    " + x for x in summarize_failures(j.unexplained, 10).splitlines()]
    lines.append("")
    lines.append(f"requests: {report.requests} in {report.seconds:.0f}s")
    d = report.durability
    if d is not None:
        lines.append(
            f"acknowledged writes checked: {d.acknowledged_once} write-once keys "
            f"(lost: {len(d.lost_once)}) + {d.acknowledged_writes} acknowledged writes on the "
            f"contended keys, final state read from {d.read_from}"
            + (f"; LOST: {', '.join(d.lost_once[:10])}" if d.lost_once else "")
            + ("; NOTHING WAS ACKNOWLEDGED: no write was tested" if d.untested else ""))
    if report.history is not None:
        h = report.history
        lines.append(f"history linearizable: {'yes' if h.ok else 'NO'} ({h})")
    if report.leaks is not None:
        lk = report.leaks
        lines.append("leaks: " + ("none" if lk.ok else "; ".join(lk.problems))
                     + f" ({', '.join(f'{k} {v}' for k, v in lk.numbers.items())})")
    for error in report.errors:
        lines.append(f"error: {error}")
    lines.append(f"verdict: {'PASS' if report.ok else 'FAIL'}")
    return "\n".join(lines)


def _say(out: TextIO) -> Callable[[str], None]:
    def say(text: str) -> None:
        out.write(f"chaos        | {text}\n")
        out.flush()

    return say


class _Signals:
    """What Ctrl-C, SIGTERM and SIGHUP do. The first one, before stopping has begun, cancels the
    run, which then stops the stack. Once stopping has begun (after that first signal, or at the
    stack's stop that ends every run) a signal must not cancel the stop: a stop cut short left
    PostgreSQL running and the scratch directory behind. Like a second Ctrl-C to uvicorn, it
    hurries the stop instead (the stack's ``force_stop``: whatever still runs is killed)."""

    def __init__(self, task: asyncio.Task[Any], say: Callable[[str], None]) -> None:
        self.task = task
        self.say = say
        self.first: signal.Signals | None = None
        """The signal that stopped the run, if one did."""
        self.stack: Stack | None = None
        """The stack of our own, once there is one (none with --url)."""
        self.hurried = False

    def __call__(self, signum: signal.Signals) -> None:
        stack = self.stack
        if self.first is None and not (stack is not None and stack.stopping):
            self.first = signum
            self.say(f"{signum.name}: stopping" + (
                " (another signal stops at once)" if stack is not None else " the load"))
            self.task.cancel()
        elif stack is not None and not self.hurried:
            self.hurried = True
            why = "again" if self.first is not None else "while the stack stops"
            self.say(f"{signum.name} {why}: stopping at once")
            stack.force_stop.set()
        # else: with --url nothing of ours needs stopping; the cancelled load is ending.


async def main_async(args: argparse.Namespace, out: TextIO, log: TextIO | None) -> int:
    """The run, stopped in order by Ctrl-C, SIGTERM or SIGHUP: the stack stops, and the scratch
    directory goes (a SIGTERMed run left its PostgreSQL running and its data behind); a further
    signal hurries the stop (see :class:`_Signals`)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    say = _say(out)
    signals = _Signals(task, say)
    stop_signals = common.signals.stop_signals()  # SIGHUP stays ignored under nohup
    for signum in stop_signals:
        loop.add_signal_handler(signum, signals, signum)
    try:
        return await _run(args, out, log, signals)
    except asyncio.CancelledError:
        if signals.first is None:
            raise
        if args.url:
            what = f"the load is stopped; the stack at {args.url} is not ours, it keeps running"
        elif args.data_dir:
            what = f"the stack is stopped, its data kept in {args.data_dir}"
        else:
            what = "the stack is stopped, its scratch data removed"
        say(f"stopped by {signals.first.name}: {what}")
        return 128 + signals.first.value
    finally:
        for signum in stop_signals:
            loop.remove_signal_handler(signum)


async def _run(args: argparse.Namespace, out: TextIO, log: TextIO | None,
               signals: _Signals) -> int:
    plan = Plan(
        faults=FAULTS if args.faults is None else [f for f in args.faults.split(",") if f],
        settle=args.settle if args.settle is not None else (2.0 if args.quick else 25.0),
        fresh_workers=args.workers, keepalive_workers=args.workers, loop=args.loop,
        seed=args.seed,
    )
    say = _say(out)
    if args.url:
        args.url = args.url.rstrip("/")
        say(f"targeting {args.url}: load and history only (faults need a stack of our own)")
        problem = await url_problem(args.url)
        if problem:
            say(f"cannot run against {args.url}: {problem}")
            return 1
        try:
            report = await run_against(args.url, plan, 10.0 if args.quick else 60.0, out)
        except (aiohttp.ClientError, RuntimeError, OSError) as exc:
            say(f"the run failed: {type(exc).__name__}: {exc}")
            return 1
    else:
        with contextlib.ExitStack() as exits:
            data = Path(args.data_dir) if args.data_dir else Path(
                exits.enter_context(tempfile.TemporaryDirectory(prefix="varstack-chaos-")))
            lines = Lines(copy=log)
            config = stack_config(data / "stack", loop=plan.loop, restart_delay=1.0)
            stack = signals.stack = Stack(config, output=Output(lines))
            say(f"starting the stack: PostgreSQL, {config.server_count} replicas, the balancer "
                f"at {stack.url} (programs' output: {args.log or 'kept in memory'})")
            try:
                await stack.start()
                say(f"running: faults {', '.join(plan.faults)}, {plan.settle:g}s of steady "
                    f"load around each, {plan.fresh_workers} new-connection and "
                    f"{plan.keepalive_workers} keep-alive clients")
                report = await run_faults(stack, lines, plan, out)
            except Exception as exc:
                say(f"the run failed: {type(exc).__name__}: {exc}")
                out.write(lines.tail(40) + "\n")
                return 1
            finally:
                if not stack.stopping:  # a start that failed or was cancelled stopped it
                    say("stopping the stack")
                # Not cancelled by a signal from here: a signal hurries it (see _Signals).
                await stack.stop()
    out.write("\n" + table(report) + "\n")
    return 0 if report.ok else 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="2 s of steady load around each fault instead of 25 (under a minute "
                             "instead of about three)")
    parser.add_argument("--faults", default=None,
                        help=f"comma-separated, in order (default: {','.join(FAULTS)})")
    parser.add_argument("--settle", type=float, default=None,
                        help="seconds of steady load before and after each fault")
    parser.add_argument("--workers", type=int, default=4,
                        help="clients of each kind (new connection per request, keep-alive)")
    parser.add_argument("--loop", default="auto", choices=("auto", "asyncio", "uvloop"),
                        help="event loop of the replicas and the balancer")
    parser.add_argument("--url", default="",
                        help="target a running stack (no faults) instead of starting one")
    parser.add_argument("--data-dir", default="", help="where the scratch stack keeps its data "
                        "(default: a temporary directory, removed after)")
    parser.add_argument("--log", default="", help="write the programs' output to this file")
    parser.add_argument("--seed", type=int, default=0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_parsed(args)


def option_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the options, before anything starts; None if nothing."""
    if args.workers < 1:
        return "--workers must be at least 1"
    if args.faults is None:  # not given: every fault
        names = list(FAULTS)
    else:
        names = [f for f in args.faults.split(",") if f]
        if not names:
            return f"--faults {args.faults!r} names no fault; choose from {', '.join(FAULTS)}"
    unknown = [f for f in names if f not in FAULTS]
    if unknown:
        return f"--faults: unknown fault {', '.join(unknown)}; choose from {', '.join(FAULTS)}"
    if args.faults is not None and args.url:
        return "--faults needs a stack of our own: it cannot go with --url"
    if args.url:
        problem = http_url_problem(args.url)
        if problem:
            return f"--url {problem}"
    if args.settle is not None and not (math.isfinite(args.settle) and args.settle >= 0):
        return f"--settle must be a number of seconds >= 0, got {args.settle}"
    return None


def run_parsed(args: argparse.Namespace) -> int:
    problem = option_problem(args)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    with contextlib.ExitStack() as exits:
        try:
            log = exits.enter_context(open(args.log, "w", encoding="utf-8")) if args.log else None
        except OSError as exc:  # a missing directory, a directory, no permission
            print(f"--log {args.log}: cannot write it: {exc.strerror or exc}", file=sys.stderr)
            return 2
        if args.loop == "uvloop":
            import uvloop

            return int(uvloop.run(main_async(args, sys.stdout, log)))
        return asyncio.run(main_async(args, sys.stdout, log))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
