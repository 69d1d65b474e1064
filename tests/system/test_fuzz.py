"""Hostile input through the balancer and straight at a replica: schemathesis against the
service's own OpenAPI document, and raw garbage on the socket (random bytes, truncated
HTTP, huge headers, slowloris), while ordinary clients keep being served."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from chaos.system import (
    Fault,
    baseline,
    judge,
    setting,
    summarize_failures,
)
from tests.system.conftest import StackFactory, finish, load_for

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance]


def fuzz(url: str, examples: int) -> Counter[str]:
    """Every operation of the document, positive and negative cases; raises on the first
    server error or schema violation.  Returns statuses seen per operation."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    seen: Counter[str] = Counter()
    with requests.Session() as session:
        for result in schema.get_all_operations():
            operation = result.ok()
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                strategy = operation.as_strategy(generation_mode=mode)

                @settings(max_examples=examples, deadline=None, database=None,
                          phases=[Phase.generate], derandomize=True,
                          suppress_health_check=list(HealthCheck))
                @given(case=strategy)
                def run(case: Any) -> None:
                    response = case.call(base_url=url, session=session, timeout=10)
                    seen[f"{case.operation.label} {response.status_code}"] += 1
                    case.validate_response(response, checks=CHECKS)

                try:
                    run()
                except Unsatisfiable:
                    # No invalid input exists (GET /healthcheck takes no parameters).
                    assert mode is GenerationMode.NEGATIVE, operation.label
    return seen


async def test_schemathesis_finds_no_server_error_and_no_schema_violation(
    system: StackFactory,
) -> None:
    await _fuzz(system, examples=60)


@pytest.mark.slow
async def test_schemathesis_thousands_of_requests(system: StackFactory) -> None:
    await _fuzz(system, examples=400)


async def _fuzz(system: StackFactory, examples: int) -> None:
    async with system() as (stack, _lines):
        base = await baseline(stack)
        seen = await asyncio.to_thread(fuzz, stack.url, examples)
        total = sum(seen.values())
        print(f"schemathesis: {total} requests through the balancer; by operation and status: "
              f"{dict(sorted(seen.items()))}")
        assert not [k for k in seen if k.rsplit(" ", 1)[1].startswith("5")], seen
        assert total >= examples * 4
        load = load_for(stack, "fuzz", fresh_workers=1, keepalive_workers=1, max_ops=20)
        await load.run()
        await finish(stack, load, base)


# -- raw garbage on the socket ---------------------------------------------------------


def garbage(rng: random.Random) -> bytes:
    """One hostile opening of a connection."""
    choice = rng.randrange(7)
    if choice == 0:
        return rng.randbytes(rng.randrange(1, 4096))
    if choice == 1:
        return b"POST /set_var HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"key\": "
    if choice == 2:
        return b"GET /get_var?key=a HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * rng.choice(
            (9000, 70000, 300000)) + b"\r\n\r\n"
    if choice == 3:
        return b"GET /get_var HTTP/1.1\r\n" + b"".join(
            b"X-H%d: v\r\n" % i for i in range(rng.choice((150, 2000)))) + b"\r\n"
    if choice == 4:
        return b"GET /" + b"x" * rng.choice((9000, 100000)) + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    if choice == 5:
        return b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + rng.randbytes(64)  # TLS hello
    return b"GET /get_var?key=a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"


async def send_garbage(port: int, rng: random.Random, wait: float) -> str:
    """Open, send the garbage, maybe half-close or reset, read what comes back (waiting at
    most ``wait`` seconds: a truncated request may rightly be waited on)."""
    try:
        async with asyncio.timeout(wait):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(garbage(rng))
                await writer.drain()
                how = rng.randrange(3)
                if how == 0:
                    writer.write_eof()
                elif how == 1:
                    writer.transport.abort()
                    return "aborted"
                head = await reader.read(64)
                return head.split(b"\r\n", 1)[0].decode("latin-1")[:20] or "closed"
            finally:
                writer.close()
                with contextlib.suppress(OSError, ConnectionError):
                    await writer.wait_closed()
    except (OSError, ConnectionError) as exc:
        return type(exc).__name__
    except TimeoutError:
        return "timeout"


async def slowloris(port: int, stop: asyncio.Event, gap: float) -> int:
    """One byte of a request every ``gap`` seconds, until told to stop or closed; returns
    bytes sent."""
    request = b"GET /get_var?key=a HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 10_000
    sent = 0
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return 0
    try:
        for byte in request:
            writer.write(bytes([byte]))
            await writer.drain()
            sent += 1
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(gap):
                    await stop.wait()
            if stop.is_set() or reader.at_eof():
                break
    except (OSError, ConnectionError):
        pass
    finally:
        writer.transport.abort()
    return sent


@pytest.mark.parametrize("sockets", [pytest.param(60, id="short"),
                                     pytest.param(400, id="long", marks=pytest.mark.slow)])
async def test_garbage_and_slowloris_do_no_harm_to_other_clients(
    system: StackFactory, sockets: int,
) -> None:
    async with system() as (stack, lines):
        base = await baseline(stack)
        env = stack.config.environ
        idle = setting(env, "LB_IDLE_TIMEOUT")
        rng = random.Random(6)
        load = load_for(stack, "garbage", fresh_workers=3, keepalive_workers=3, max_seconds=120)
        load.start()
        stop = asyncio.Event()
        started = time.monotonic()
        replica = stack.config.replica_ports[0]
        # Slowloris: many sockets, each one byte every few seconds, at the balancer and at a
        # replica directly.
        loris = [asyncio.create_task(slowloris(port, stop, gap=2.0))
                 for i in range(sockets) for port in [stack.config.lb_port if i % 2 else replica]]
        try:
            await load.wait_for(100)
            answers: Counter[str] = Counter()
            for round_ in range(max(4, sockets // 15)):
                where = "balancer" if round_ % 2 else "replica"
                port = stack.config.lb_port if round_ % 2 else replica
                # The balancer must close within its idle timeout (swept in ticks, so up to a
                # quarter late); the wait has room for a stall of this loaded machine besides.
                wait = 2 * idle + 5 if round_ % 2 else idle + 2
                got = await asyncio.gather(*(send_garbage(port, rng, wait) for _ in range(25)))
                answers.update(f"{where}: {answer}" for answer in got)
            await asyncio.sleep(idle + 1)  # slowloris sockets outlive the idle timeout
            await load.wait_for(100)
        finally:
            stop.set()
            sent = await asyncio.gather(*loris)
            await load.stop()
        fault = Fault("garbage", "none", started, started, time.monotonic())
        verdict = judge(fault, load, lines.of("load_balancer"), until=float("inf"))
        print(f"garbage answers: {dict(answers.most_common())}; slowloris sockets: {len(loris)}, "
              f"bytes sent each: min {min(sent)} max {max(sent)}; ordinary clients: "
              f"{verdict.requests} requests, {len(verdict.failures)} failed")
        assert not verdict.failures, summarize_failures(verdict.failures)
        assert not any(" HTTP/1.1 5" in a or " HTTP/1.0 5" in a for a in answers), answers
        # The balancer closes what stays silent past its idle timeout: nothing sent to it
        # waits longer (a replica alone may wait on a truncated request; the balancer is what
        # faces clients).
        assert not answers["balancer: timeout"], answers
        assert stack.balancer is not None
        assert stack.balancer.restarts == 0
        assert not any(r.restarts for r in stack.replicas)
        await finish(stack, load, base)
