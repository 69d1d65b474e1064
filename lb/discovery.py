"""Where the backends come from: an explicit list, or every address of a DNS name, re-resolved.

With a DNS name (the compose service ``backend``), each address it resolves to is a replica, so
``docker compose up --scale backend=N``, ``docker stack deploy`` and replicas that come back with
new addresses are followed without restarting the balancer.  A failed resolution keeps the last
known set (the replicas are probably still there; the health checks will say if they are not).

In an explicit list, an IP address is used as it is; a host name is one backend, at the first
address it resolves to, re-resolved the same way: the connect path never waits for a lookup.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Sequence

from common.net import host_port, is_ip_address, tcp_addresses
from lb.backends import BackendPool
from lb.periodic import Periodic

log = logging.getLogger("lb.discovery")

#: ``resolver(name, port)`` returns the ``(address, port)`` pairs of the replicas.
Resolver = Callable[[str, int], Awaitable[Sequence[tuple[str, int]]]]


async def resolve_all(name: str, port: int) -> list[tuple[str, int]]:
    """Every TCP address of ``name`` through the system resolver, IPv4 first, each family in
    numeric order, so the order is stable whatever order the DNS server answers in."""
    found = [(address, port) for address in await tcp_addresses(name, port)]
    return sorted(found, key=lambda a: (":" in a[0], ipaddress.ip_address(a[0])))


class DnsDiscovery(Periodic):
    """Owns one task that re-resolves ``name`` every ``interval`` seconds into ``pool``."""

    task_name = "lb-dns"

    def __init__(
        self,
        pool: BackendPool,
        name: str,
        port: int,
        *,
        interval: float = 5.0,
        expected: int = 1,
        resolver: Resolver | None = None,
    ) -> None:
        super().__init__()
        self.pool = pool
        self.name = name
        self.port = port
        self.interval = interval
        self.expected = expected
        self.resolver: Resolver = resolver or resolve_all
        self.resolved = asyncio.Event()
        self._last_count: int | None = None
        self._last_error: str | None = None

    async def lookup(self) -> list[tuple[str, int]]:
        """The backends' addresses now; OSError when the name does not resolve."""
        return list(await self.resolver(self.name, self.port))

    async def refresh(self) -> None:
        """Resolve once and apply the answer; errors are logged once per change."""
        try:
            addresses = await self.lookup()
        except OSError as exc:
            error = str(exc)
            if error != self._last_error:
                log.warning("cannot resolve %s: %s; keeping %d known backends",
                            self.name, error, len(self.pool))
            self._last_error = error
            return
        if not addresses:
            if self._last_error != "":
                log.warning("%s resolved to no address; keeping %d known backends",
                            self.name, len(self.pool))
            self._last_error = ""  # said once until something changes
            return
        self._last_error = None
        added, removed = self.pool.update(addresses)
        for backend in added:
            log.info("backend %s added (from %s)%s", backend.address, self.name,
                     "" if backend.up else f"; it gets clients once {self.pool.rise} checks pass")
        for backend in removed:
            log.info("backend %s removed (no longer in %s)", backend.address, self.name)
        count = len(self.pool)
        if count != self._last_count:
            if count != self.expected:
                log.warning("%s resolves to %d backends, SERVER_COUNT expects %d",
                            self.name, count, self.expected)
            self._last_count = count
        self.resolved.set()

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # a bug here must not end discovery for good
                log.exception("resolving %s failed", self.name)
            await asyncio.sleep(self.interval)


class NamedBackends(DnsDiscovery):
    """``LB_BACKENDS`` with host names in it: each entry is one backend, a name at the first
    address it resolves to (IPv4 first); a name that stops resolving keeps its last address.

    Each name is looked up on its own, within ``lookup_timeout``: a name whose DNS is slow
    holds up neither the others nor the IP addresses listed beside it.
    """

    task_name = "lb-names"

    def __init__(
        self,
        pool: BackendPool,
        entries: Sequence[tuple[str, int]],
        *,
        interval: float = 5.0,
        expected: int = 1,
        resolver: Resolver | None = None,
        lookup_timeout: float = 2.0,
    ) -> None:
        super().__init__(pool, "LB_BACKENDS", 0, interval=interval, expected=expected,
                         resolver=resolver)
        self.entries = tuple(entries)
        self.lookup_timeout = lookup_timeout
        self._known: dict[tuple[str, int], tuple[str, int]] = {}
        self._errors: dict[tuple[str, int], str] = {}

    async def lookup(self) -> list[tuple[str, int]]:
        found = await asyncio.gather(*(self._address_of(entry) for entry in self.entries))
        return [address for address in found if address is not None]

    async def _address_of(self, entry: tuple[str, int]) -> tuple[str, int] | None:
        host, port = entry
        if is_ip_address(host):
            return entry
        try:
            async with asyncio.timeout(self.lookup_timeout):
                found = list(await self.resolver(host, port))
            if not found:
                raise OSError(f"{host} resolves to no address")
        except (OSError, TimeoutError) as exc:
            timed_out = isinstance(exc, TimeoutError)
            error = f"no answer within {self.lookup_timeout:g}s" if timed_out else str(exc)
            known = self._known.get(entry)
            if self._errors.get(entry) != error:
                log.warning("cannot resolve %s: %s; %s", host, error,
                            f"keeping {host_port(*known)}" if known
                            else "not a backend until it does")
            self._errors[entry] = error
            return known
        self._errors.pop(entry, None)
        address = found[0]
        if self._known.get(entry) != address:
            log.info("%s is %s", host_port(host, port), host_port(*address))
            self._known[entry] = address
        return address
