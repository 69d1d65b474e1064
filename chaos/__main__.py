"""``python -m chaos``: check a recorded history, record one, or time the checker.

    python -m chaos check history.jsonl           exit 0 linearizable, 1 not, 2 unknown
    python -m chaos record http://127.0.0.1:3000 --ops 2000 --out history.jsonl
    python -m chaos bench --ops 3000 --keys 10 --processes 8 --unknown-rate 0.05
    python -m chaos run [--quick]                 the whole stack under faults: a verdict table
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from chaos import run as run_cmd
from chaos.history import Workload, dump_history, load_history, record
from chaos.linearizability import DEFAULT_MAX_STEPS, CheckResult, Verdict, check
from chaos.simulate import simulate

EXIT = {Verdict.LINEARIZABLE: 0, Verdict.NOT_LINEARIZABLE: 1, Verdict.UNKNOWN: 2}


def _report(result: CheckResult, seconds: float, ops: int) -> int:
    print(f"{ops} operations checked in {seconds:.3f}s: {result}")
    return EXIT[result.verdict]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-steps", type=int, default=DEFAULT_MAX_STEPS,
                        help="search steps allowed per key (default %(default)s)")
    commands = parser.add_subparsers(dest="command", required=True)
    check_cmd = commands.add_parser("check", help="check a JSON-lines history")
    check_cmd.add_argument("history", type=Path)
    record_cmd = commands.add_parser("record", help="record a history against a URL")
    record_cmd.add_argument("url")
    record_cmd.add_argument("--ops", type=int, default=1000)
    record_cmd.add_argument("--seconds", type=float, default=30.0)
    record_cmd.add_argument("--workers", type=int, default=8)
    record_cmd.add_argument("--keys", type=int, default=5)
    record_cmd.add_argument("--fresh-connections", action="store_true")
    record_cmd.add_argument("--out", type=Path)
    bench_cmd = commands.add_parser("bench", help="time the checker on a simulated history")
    bench_cmd.add_argument("--ops", type=int, default=3000)
    bench_cmd.add_argument("--keys", type=int, default=10)
    bench_cmd.add_argument("--processes", type=int, default=8)
    bench_cmd.add_argument("--unknown-rate", type=float, default=0.05)
    bench_cmd.add_argument("--seed", type=int, default=1)
    run_parser = commands.add_parser(
        "run", help="start the stack, fire faults under load, print a verdict table",
        description=run_cmd.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run_cmd.add_arguments(run_parser)
    args = parser.parse_args(argv)

    if args.command == "run":
        return run_cmd.run_parsed(args)
    if args.command == "check":
        history = load_history(args.history)
    elif args.command == "record":
        workload = Workload(
            args.url, keys=tuple(f"chaos-{i}" for i in range(args.keys)),
            workers=args.workers, max_ops=args.ops, max_seconds=args.seconds,
            fresh_connections=args.fresh_connections,
        )
        recording = asyncio.run(record(workload))
        print(recording.summary())
        history = recording.history
        if args.out:
            dump_history(history, args.out)
    else:
        history = simulate(ops=args.ops, keys=[f"k{i}" for i in range(args.keys)],
                           processes=args.processes, seed=args.seed,
                           unknown_rate=args.unknown_rate)
    started = time.perf_counter()
    result = check(history, max_steps=args.max_steps)
    return _report(result, time.perf_counter() - started, len(history))


if __name__ == "__main__":
    sys.exit(main())
