"""The database's host name not resolving: a DNS server that stops answering (as podman's
aardvark-dns does while it reloads) and comes back.

The service runs as a real process in a mount namespace of its own, where /etc/resolv.conf
names a real DNS server this test runs on a loopback address (silent, or answering), and
/etc/nsswitch.conf sends host lookups to it (no caching daemon or systemd-resolved between).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
from dnslib import QTYPE, RR, A, DNSRecord

from stack.pg import free_port
from tests.services.conftest import ServiceProcess, service_process

DB_NAME = "db.varstack.test"
#: glibc asks once and gives up after a second: a lookup the service abandons at its own
#: timeout (0.3 s here) still fails a moment later, which is what used to be logged.
RESOLV_CONF = "nameserver {address}\noptions timeout:1 attempts:1\n"
NEVER_RETRIEVED = "exception was never retrieved"


class Resolver(asyncio.DatagramProtocol):
    """A DNS server for one name: silent until :meth:`answer` is called."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.address: str | None = None
        self.queries = 0
        self._transport: asyncio.DatagramTransport | None = None

    def answer(self, address: str | None) -> None:
        """Answer with ``address`` from now on; None: stop answering."""
        self.address = address

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)  # uvloop's is no subclass

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.queries += 1
        if self.address is None or self._transport is None:
            return
        query = DNSRecord.parse(data)
        reply = query.reply()
        question = query.q
        if str(question.qname).rstrip(".") == self.name and question.qtype == QTYPE.A:
            reply.add_answer(RR(question.qname, QTYPE.A, rdata=A(self.address), ttl=0))
        self._transport.sendto(reply.pack(), addr)


@contextlib.asynccontextmanager
async def resolver_for(name: str) -> AsyncIterator[tuple[Resolver, str]]:
    """A :class:`Resolver` on port 53 of the first free loopback address of a few."""
    loop = asyncio.get_running_loop()
    for last in range(77, 97):
        address = f"127.0.0.{last}"
        try:
            transport, resolver = await loop.create_datagram_endpoint(
                lambda: Resolver(name), local_addr=(address, 53)
            )
        except OSError:
            continue
        try:
            yield resolver, address
        finally:
            transport.close()
        return
    pytest.skip("cannot bind UDP port 53 on 127.0.0.77-96 (needs root, and the port free)")


def own_resolver(directory: Path, address: str) -> list[str]:
    """A command prefix: the command looks host names up in /etc/hosts, then at ``address``."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) for a mount namespace")
    resolv = directory / "resolv.conf"
    resolv.write_text(RESOLV_CONF.format(address=address))
    nsswitch = directory / "nsswitch.conf"
    nsswitch.write_text("hosts: files dns\n")
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount --bind "$0" /etc/resolv.conf && mount --bind "$1" /etc/nsswitch.conf '
            '&& shift && exec "$@"', str(resolv), str(nsswitch)]


async def health(http: aiohttp.ClientSession, service: ServiceProcess) -> tuple[int, str]:
    async with http.get(f"{service.url}/healthcheck") as r:
        return r.status, await r.text()


async def edit_status(http: aiohttp.ClientSession, url: str) -> int:
    async with http.put(f"{url}/edit_var", json={"key": "k", "value": "v"}) as r:
        await r.read()
        return r.status


async def wait_for_lines(service: ServiceProcess, text: str, count: int) -> None:
    # The child's log is the only view of its retries; bounded by the timeout.
    async with asyncio.timeout(30):
        while sum(text in line for line in service.output) < count:
            await asyncio.sleep(0.05)


async def test_a_database_name_that_does_not_resolve_is_503_naming_it_and_heals_itself(
    postgres: Any, clean_db: Any, tmp_path: Path
) -> None:
    async with resolver_for(DB_NAME) as (resolver, address):
        env = {**postgres.env, "PGSQL_HOST": DB_NAME, "SERVICE_DB_CONNECT_TIMEOUT": "0.3"}
        async with service_process(env, free_port(), prefix=own_resolver(tmp_path, address),
                                   until="serving on") as service, \
                aiohttp.ClientSession() as http:
            # Silent: each start-up attempt gives up at the connect timeout, saying why.
            await wait_for_lines(service, f"no answer looking up {DB_NAME} within 0.3s", 6)
            assert resolver.queries >= 6
            status, text = await health(http, service)
            assert status == 503
            assert f"no answer looking up {DB_NAME}" in text
            async with http.post(f"{service.url}/set_var", json={"key": "k", "value": "v"}) as r:
                assert (r.status, await r.text()) == (503, "database unavailable")

            # Answering: the service connects by itself, no restart.
            resolver.answer(postgres.host)
            await wait_for_lines(service, "ready after", 1)
            assert await health(http, service) == (200, "server is healthy")
            async with http.post(f"{service.url}/set_var", json={"key": "k", "value": "v"}) as r:
                assert r.status == 201

            # Silent again: the open connections need no lookup, so the replica keeps serving.
            resolver.answer(None)
            for _ in range(5):
                async with http.get(f"{service.url}/get_var?key=k") as r:
                    assert (r.status, await r.text()) == (200, "v")
                assert (await health(http, service))[0] == 200
            # A burst of writes needs more connections than are open (GETs would wait together
            # for one): each new connection asks for a fresh lookup, which never answers, and
            # connects to the last addresses the name had within LOOKUP_GRACE instead.
            asked = resolver.queries
            statuses = await asyncio.gather(*(edit_status(http, service.url) for _ in range(30)))
            assert statuses == [200] * 30
            assert resolver.queries > asked
            for _ in range(5):
                async with http.get(f"{service.url}/get_var?key=k") as r:
                    assert (r.status, await r.text()) == (200, "v")
        # Every abandoned lookup failed a second later, after the service stopped waiting:
        # none of those failures may surface as an unhandled error.
        assert not [line for line in service.output if NEVER_RETRIEVED in line], \
            "\n".join(service.output)
