"""Where backends come from: a DNS name re-resolved (injected resolver and the real one)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import pytest

from lb.config import Config
from lb.discovery import resolve_all
from tests.lb.lbkit import (
    EchoBackend,
    HttpBackend,
    close,
    connect,
    eventually,
    exchange,
    http_get,
    lb_config,
    running_lb,
)


class StubResolver:
    """A DNS name whose answer the test changes; counts the lookups."""

    def __init__(self, *answer: tuple[str, int]) -> None:
        self.answer: list[tuple[str, int]] = list(answer)
        self.lookups = 0
        self.fail = False

    async def __call__(self, name: str, port: int) -> Sequence[tuple[str, int]]:
        assert name == "backend"
        self.lookups += 1
        if self.fail:
            raise OSError(-2, "Name or service not known")
        return list(self.answer)


def dns_config(**overrides: Any) -> Config:
    return lb_config(backend_host="backend", resolve_interval=0.05, **overrides)


async def test_new_address_is_picked_up_and_old_one_dropped() -> None:
    async with HttpBackend() as a, HttpBackend() as b:
        resolver = StubResolver(a.address)
        async with running_lb(dns_config(), resolver=resolver) as lb:
            assert {(await http_get(lb.port))[1]["x-served-by"] for _ in range(3)} == {a.label}

            # `docker compose up --scale backend=2`: a second address appears.
            resolver.answer.append(b.address)
            await eventually(lambda: len(lb.pool) == 2 and lb.pool.up_count == 2)
            served = [(await http_get(lb.port))[1]["x-served-by"] for _ in range(4)]
            assert sorted(served) == sorted([a.label, b.label] * 2)

            # An open connection to a survives a's removal from DNS; new ones go to b.
            reader, writer = await connect(lb.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            first_label = head.split(b"X-Served-By: ")[1].split(b"\r\n")[0].decode()
            await reader.readexactly(len(first_label))
            resolver.answer = [x for x in resolver.answer if f"{x[0]}:{x[1]}" != first_label]
            await eventually(lambda: len(lb.pool) == 1)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            assert first_label.encode() in head
            await close(writer)
            others = {(await http_get(lb.port))[1]["x-served-by"] for _ in range(3)}
            assert others == {a.label, b.label} - {first_label}


async def test_a_replica_that_appears_gets_clients_only_once_its_checks_pass(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A replica scaled up is still starting (its database not ready: /healthcheck 503): no
    client is sent to it until its health checks pass."""
    caplog.set_level(logging.INFO, logger="lb.discovery")
    async with HttpBackend() as a, HttpBackend() as b:
        b.healthy = False
        resolver = StubResolver(a.address)
        config = dns_config(check_mode="http", check_interval=0.05, check_rise=2)
        async with running_lb(config, resolver=resolver) as lb:
            resolver.answer.append(b.address)
            await eventually(lambda: len(lb.pool) == 2)
            checks = b.checks
            await eventually(lambda: b.checks >= checks + 3)  # failed, and failed again
            for _ in range(6):
                assert (await http_get(lb.port))[1]["x-served-by"] == a.label
            assert b.requests == 0
            [_, new] = lb.stats()["backends"]
            assert (new["state"], new["last_change"]) == ("down",
                                                          "discovered: up after 2 passed checks")
            b.healthy = True
            await eventually(lambda: lb.pool.up_count == 2)
            served = {(await http_get(lb.port))[1]["x-served-by"] for _ in range(4)}
            assert served == {a.label, b.label}
    assert f"backend {b.label} added (from backend); it gets clients once 2 checks pass" \
        in caplog.text


async def test_failed_resolution_keeps_the_last_known_backends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with EchoBackend() as echo:
        resolver = StubResolver(echo.address)
        async with running_lb(dns_config(), resolver=resolver) as lb:
            resolver.fail = True
            seen = resolver.lookups
            await eventually(lambda: resolver.lookups >= seen + 3)
            assert [b.address for b in lb.pool.backends] == [echo.label]
            assert await exchange(lb.port, b"still here") == b"still here"
    assert "cannot resolve backend" in caplog.text
    assert caplog.text.count("cannot resolve backend") == 1  # said once, not every interval


async def test_server_count_mismatch_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="lb.discovery")
    async with EchoBackend() as echo:
        resolver = StubResolver(echo.address)
        config = dns_config(server_count=3)
        async with running_lb(config, resolver=resolver):
            pass
    assert "backend resolves to 1 backends, SERVER_COUNT expects 3" in caplog.text


async def test_real_resolver_follows_a_name() -> None:
    """``localhost`` through getaddrinfo: the path a compose service name takes."""
    assert ("127.0.0.1", 80) in await resolve_all("localhost", 80)
    async with EchoBackend() as echo:
        config = lb_config(backend_host="localhost", backend_port=echo.port)
        async with running_lb(config) as lb:
            assert ("127.0.0.1", echo.port) in [(b.host, b.port) for b in lb.pool.backends]
            # ::1 may be listed too and refuse (the echo listens on 127.0.0.1): failover covers it.
            for _ in range(3):
                assert await exchange(lb.port, b"via dns") == b"via dns"


class NameTable:
    """Host names the test maps to addresses (None: the name does not resolve, HANGS: the
    lookup never ends, as with a DNS server that does not answer); counts lookups."""

    HANGS = ("hangs", 0)

    def __init__(self, **names: tuple[str, int] | None) -> None:
        self.names = dict(names)
        self.lookups = 0

    async def __call__(self, name: str, port: int) -> Sequence[tuple[str, int]]:
        self.lookups += 1
        address = self.names.get(name.replace("-", "_"))
        if address is None:
            raise OSError(-2, "Name or service not known")
        if address == self.HANGS:
            await asyncio.Event().wait()
        return [address]


async def test_a_host_name_in_lb_backends_is_one_backend_at_its_ipv4_address() -> None:
    async with HttpBackend() as backend:
        config = lb_config(("localhost", backend.port), resolve_interval=60.0)
        async with running_lb(config) as lb:
            # IPv4 first: the replica listens on 127.0.0.1, not on ::1.
            assert [b.address for b in lb.pool.backends] == [backend.label]
            for _ in range(5):
                assert (await http_get(lb.port))[1]["x-served-by"] == backend.label
            assert lb.pool.backends[0].failed_connects == 0


async def test_host_names_in_lb_backends_follow_a_new_address_and_keep_the_last_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with HttpBackend() as a, HttpBackend() as b, HttpBackend() as c:
        names = NameTable(replica_1=a.address, replica_2=None)
        config = lb_config(("replica-1", 5000), ("replica-2", 5000), c.address,
                           resolve_interval=0.05)
        async with running_lb(config, resolver=names) as lb:
            # replica-2 does not resolve yet: the others serve, IP addresses need no lookup.
            assert [x.address for x in lb.pool.backends] == [a.label, c.label]
            served = {(await http_get(lb.port))[1]["x-served-by"] for _ in range(4)}
            assert served == {a.label, c.label}

            # replica-1 comes back elsewhere; replica-2 appears (in LB_BACKENDS order).
            names.names.update(replica_1=b.address, replica_2=a.address)
            await eventually(lambda: [x.address for x in lb.pool.backends]
                             == [b.label, a.label, c.label])

            # A lookup that fails keeps the address last found.
            names.names["replica_1"] = None
            seen = names.lookups
            await eventually(lambda: names.lookups >= seen + 6)
            assert [x.address for x in lb.pool.backends] == [b.label, a.label, c.label]
            served = {(await http_get(lb.port))[1]["x-served-by"] for _ in range(6)}
            assert served == {a.label, b.label, c.label}
    assert caplog.text.count("cannot resolve replica-2") == 1  # said once, not every interval
    assert f"cannot resolve replica-1: [Errno -2] Name or service not known; keeping {b.label}" \
        in caplog.text


async def test_a_name_whose_dns_does_not_answer_holds_up_no_other_backend(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with HttpBackend() as a, HttpBackend() as b:
        names = NameTable(slow=NameTable.HANGS, fast=b.address)
        config = lb_config(("slow", 5000), a.address, ("fast", 5000), check_timeout=0.3)
        async with running_lb(config, resolver=names) as lb:
            # In place before the first client, without waiting for the silent name.
            assert [x.address for x in lb.pool.backends] == [a.label, b.label]
            served = {(await http_get(lb.port))[1]["x-served-by"] for _ in range(4)}
            assert served == {a.label, b.label}
    assert "cannot resolve slow: no answer within 0.3s; not a backend until it does" \
        in caplog.text


async def test_lb_backends_of_names_that_never_resolve_say_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    names = NameTable()
    config = lb_config(("gone-1", 5000), ("gone-2", 5000), resolve_interval=0.02)
    async with running_lb(config, resolver=names) as lb:
        await eventually(lambda: names.lookups >= 10)
        assert len(lb.pool) == 0
        # A client is refused at once, not left hanging.
        assert await exchange(lb.port, b"anyone?") == b""
    assert caplog.text.count("cannot resolve gone-1") == 1
    assert caplog.text.count("LB_BACKENDS resolved to no address") == 1
