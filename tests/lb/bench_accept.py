"""A small, bounded benchmark of the balancer's accept path and pipe, under uvloop.

Not a test (pytest does not collect it).  It compares, side by side and interleaved:

- ``shipped``: ``lb.server.Server`` as shipped (raw sockets on one epoll set the loop watches);
- ``streams``: a stream pipe (``start_server`` + ``open_connection``, two copy tasks per
  connection, 64 KiB reads, drain per write): the design card's first idea, for reference.

Run: ``.venv/bin/python -m tests.lb.bench_accept [--rounds 3] [--seconds 4]`` (needs ``wrk``).
Each LB variant runs in its own process on uvloop; the backend is a fast protocol-level server
in another process.  Numbers: requests/s with a new connection per request (accept path), LB CPU
per connection, requests/s over keep-alive connections, bulk MB/s through one connection, and
the LB's RSS per idle connection.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import uvloop

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = ("shipped", "streams")
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nX-Served-By: bench:1\r\nContent-Length: 2\r\n"
    b"Connection: keep-alive\r\n\r\nok"
)
CLOSE_RESPONSE = RESPONSE.replace(b"keep-alive", b"close")
BULK_BYTES = 1 << 30


# --- the backend process ---------------------------------------------------------------------


class _Http(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, self.buf = self.buf.split(b"\r\n\r\n", 1)
            if b"onnection: close" in head or b"onnection: Close" in head:
                self.transport.write(CLOSE_RESPONSE)
                self.transport.close()
                return
            self.transport.write(RESPONSE)


class _Source(asyncio.Protocol):
    """Sends BULK_BYTES then closes: a download."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport
        self.left = BULK_BYTES
        self.chunk = b"\0" * (1 << 18)
        self.paused = False
        self._fill()

    def _fill(self) -> None:
        while self.left > 0 and not self.paused:
            n = min(self.left, len(self.chunk))
            self.left -= n
            self.transport.write(self.chunk[:n] if n < len(self.chunk) else self.chunk)
        if self.left == 0:
            self.transport.close()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._fill()


async def _backend(http_port: int, bulk_port: int) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_server(_Http, "127.0.0.1", http_port, backlog=4096)
    await loop.create_server(_Source, "127.0.0.1", bulk_port, backlog=4096)
    print("ready", flush=True)
    await asyncio.Event().wait()


# --- the LB variants -------------------------------------------------------------------------


async def _lb(variant: str, port: int, backend_port: int) -> None:
    from lb.config import Config
    from lb.server import Server

    config = Config(host="127.0.0.1", port=port, backends=(("127.0.0.1", backend_port),),
                    admin_port=0, check_mode="tcp", check_interval=60, log_level="warning",
                    max_connections=20000, backlog=4096)

    if variant == "streams":
        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                ureader, uwriter = await asyncio.open_connection("127.0.0.1", backend_port)
            except OSError:
                writer.close()
                return

            async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
                with contextlib.suppress(ConnectionError):
                    while data := await src.read(65536):
                        dst.write(data)
                        await dst.drain()
                    if not dst.is_closing():
                        dst.write_eof()

            await asyncio.gather(copy(reader, uwriter), copy(ureader, writer))
            writer.close()
            uwriter.close()

        await asyncio.start_server(pipe, "127.0.0.1", port, backlog=4096)
    else:
        await Server(config).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


# --- the driver ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(*args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-m", "tests.lb.bench_accept", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise RuntimeError(f"{args} did not start: {line!r}")
    return proc


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


def _wrk(port: int, seconds: int, *, close: bool, connections: int) -> float:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    if close:
        cmd += ["-H", "Connection: close"]
    out = subprocess.run([*cmd, f"http://127.0.0.1:{port}/"], capture_output=True, text=True,
                         timeout=seconds + 30, check=True).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    assert match, out
    return float(match.group(1))


async def _bulk(port: int) -> float:
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    got = 0

    class Sink(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            nonlocal got
            got += len(data)

        def connection_lost(self, exc: Exception | None) -> None:
            if not done.done():
                done.set_result(None)

    started = time.perf_counter()
    await loop.create_connection(Sink, "127.0.0.1", port)
    await asyncio.wait_for(done, 120)
    elapsed = time.perf_counter() - started
    assert got == BULK_BYTES, got
    return got / elapsed / 1e6


async def _idle_rss(port: int, lb: psutil.Process, count: int) -> float:
    before = lb.memory_info().rss
    writers = []
    for _ in range(count):
        _, w = await asyncio.open_connection("127.0.0.1", port)
        writers.append(w)
    await asyncio.sleep(1.0)
    after = lb.memory_info().rss
    for w in writers:
        w.close()
    await asyncio.sleep(0.5)
    return float(after - before) / count / 1024


def measure(variant: str, backend_http: int, backend_bulk: int, seconds: int,
            idle: int) -> dict[str, float]:
    result: dict[str, float] = {}
    port = _free_port()
    proc = _spawn("lb", variant, str(port), str(backend_http))
    try:
        lb = psutil.Process(proc.pid)
        _wrk(port, 1, close=True, connections=16)  # warm up
        cpu = _cpu(lb)
        rps = _wrk(port, seconds, close=True, connections=32)
        result["churn_rps"] = rps
        result["cpu_us_per_conn"] = (_cpu(lb) - cpu) / (rps * seconds) * 1e6
        cpu = _cpu(lb)
        rps = _wrk(port, seconds, close=False, connections=64)
        result["keepalive_rps"] = rps
        result["cpu_us_per_req_keepalive"] = (_cpu(lb) - cpu) / (rps * seconds) * 1e6
        result["idle_kib_per_conn"] = asyncio.run(_idle_rss(port, lb, idle))
    finally:
        proc.kill()
        proc.wait()
    port = _free_port()
    proc = _spawn("lb", variant, str(port), str(backend_bulk))
    try:
        result["bulk_mb_s"] = asyncio.run(_bulk(port))
    finally:
        proc.kill()
        proc.wait()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd")
    b = sub.add_parser("backend")
    b.add_argument("http_port", type=int)
    b.add_argument("bulk_port", type=int)
    lbp = sub.add_parser("lb")
    lbp.add_argument("variant", choices=VARIANTS)
    lbp.add_argument("port", type=int)
    lbp.add_argument("backend_port", type=int)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--idle", type=int, default=2000)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    if args.cmd == "backend":
        uvloop.run(_backend(args.http_port, args.bulk_port))
        return
    if args.cmd == "lb":
        uvloop.run(_lb(args.variant, args.port, args.backend_port))
        return
    http_port, bulk_port = _free_port(), _free_port()
    backend = _spawn("backend", str(http_port), str(bulk_port))
    results: dict[str, list[dict[str, float]]] = {v: [] for v in args.variants.split(",")}
    try:
        for round_no in range(args.rounds):
            for variant in results:  # interleaved: the machine's noise hits every variant
                r = measure(variant, http_port, bulk_port, args.seconds, args.idle)
                results[variant].append(r)
                print(f"round {round_no + 1} {variant:13s} " + json.dumps(
                    {k: round(v, 1) for k, v in r.items()}), flush=True)
    finally:
        backend.kill()
        backend.wait()
    print("\nmedians:")
    for variant, runs in results.items():
        med = {k: round(statistics.median(r[k] for r in runs), 1) for k in runs[0]}
        print(f"{variant:13s} {json.dumps(med)}")


if __name__ == "__main__":
    main()
