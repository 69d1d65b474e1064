"""The set of backends: who they are, which are up, and whose turn it is.

Discovery (:mod:`lb.discovery`) replaces the set, health checks (:mod:`lb.health`) and failed
connects (:mod:`lb.pipe`) move backends up and down; this module only keeps the state, so the hot
path imports it without importing any of the code that drives it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Collection, Iterable

from common.net import host_port

log = logging.getLogger("lb.backends")


class Backend:
    """One replica (``host:port``), its up/down state and its counters."""

    __slots__ = (
        "active",
        "address",
        "bytes_to_backend",
        "bytes_to_client",
        "checks_failed",
        "checks_passed",
        "failed_connects",
        "host",
        "last_change",
        "last_check",
        "port",
        "resets_unused",
        "total",
        "up",
    )

    def __init__(self, host: str, port: int, *, up: bool = True) -> None:
        self.host = host
        self.port = port
        self.address = host_port(host, port)
        self.up = up
        #: Connections piped to this backend now, and since it was discovered.
        self.active = 0
        self.total = 0
        self.failed_connects = 0
        #: Bytes of connections that have ended (the live ones are summed by the server).
        self.bytes_to_backend = 0
        self.bytes_to_client = 0
        #: Consecutive check results in the current streak (one of them is always 0).
        self.checks_passed = 0
        self.checks_failed = 0
        #: Connections in a row it reset before any byte passed (see Pipe._redispatch).
        self.resets_unused = 0
        self.last_check = "none"
        self.last_change = "discovered"

    def __repr__(self) -> str:
        return f"<Backend {self.address} {'up' if self.up else 'down'}>"


class BackendPool:
    """The backends in discovery order with a round-robin cursor.

    ``rise``/``fall`` are HAProxy's: consecutive check results needed to change state.  A failed
    connect takes a backend down at once (it refused or did not answer: the next client should
    not pay for it again); only ``rise`` passed checks bring it back.
    """

    def __init__(self, *, rise: int = 2, fall: int = 3) -> None:
        self.rise = rise
        self.fall = fall
        self.backends: list[Backend] = []
        self._next = 0
        #: Counters of backends that discovery dropped, so the totals never go backwards.
        self.retired_total = 0
        self.retired_failed_connects = 0
        self.retired_bytes_to_backend = 0
        self.retired_bytes_to_client = 0
        #: Whether an address is the balancer's own listening one (set once it listens).
        self.is_own_address: Callable[[str, int], bool] = lambda host, port: False
        self._own_reported: set[tuple[str, int]] = set()
        #: Whether the set has had a backend yet (see update).
        self._populated = False

    def __len__(self) -> int:
        return len(self.backends)

    @property
    def up_count(self) -> int:
        return sum(1 for b in self.backends if b.up)

    def choose(self, tried: Collection[Backend] = ()) -> Backend | None:
        """The next backend in turn that is up and not in ``tried``.

        With no such backend, the next one not in ``tried`` whatever its state ("panic": when
        everything looks down, the service's own answer beats a refusal).  None when every
        backend has been tried.
        """
        backends = self.backends
        n = len(backends)
        start = self._next
        fallback = -1
        for step in range(n):
            i = (start + step) % n
            backend = backends[i]
            if backend in tried:
                continue
            if backend.up:
                self._next = i + 1
                return backend
            if fallback < 0:
                fallback = i
        if fallback < 0:
            return None
        self._next = fallback + 1
        return backends[fallback]

    def update(self, addresses: Iterable[tuple[str, int]]) -> tuple[list[Backend], list[Backend]]:
        """Make the set exactly ``addresses``; known backends keep their state and counters.
        The first backends are up; one added to a set that had any starts down, and ``rise``
        passed checks bring it up.

        Returns the added and the removed backends.  Connections open to a removed backend
        keep running; it only gets no new ones.
        """
        known = {(b.host, b.port): b for b in self.backends}
        # Two names may resolve to one address: it is one backend, in the first one's place.
        by_address: dict[tuple[str, int], Backend] = {}
        added: list[Backend] = []
        for address in addresses:
            if address in by_address:
                continue
            if self.is_own_address(*address):
                if address not in self._own_reported:
                    self._own_reported.add(address)
                    log.error("backend %s is this balancer's own listening address: left out "
                              "(every connection to it would loop back until the cap is full)",
                              host_port(*address))
                continue
            backend = known.pop(address, None)
            if backend is None:
                # The first set serves at once (nothing else would); a replica that appears
                # later, perhaps still starting, gets clients once its checks pass.
                backend = Backend(*address, up=not self._populated)
                if self._populated:
                    backend.last_change = f"discovered: up after {self.rise} passed checks"
                added.append(backend)
            by_address[address] = backend
        wanted = list(by_address.values())
        removed = list(known.values())
        for backend in removed:
            self.retired_total += backend.total
            self.retired_failed_connects += backend.failed_connects
            self.retired_bytes_to_backend += backend.bytes_to_backend
            self.retired_bytes_to_client += backend.bytes_to_client
        if added or removed:
            cursor = self.backends[self._next % len(self.backends)] if self.backends else None
            self.backends = wanted
            self._next = wanted.index(cursor) if cursor in wanted else 0
        self._populated = self._populated or bool(wanted)
        return added, removed

    def connect_failed(self, backend: Backend, reason: str) -> None:
        """Passive check: a connect was refused or timed out."""
        backend.failed_connects += 1
        backend.checks_passed = 0
        if backend.up:
            self._set(backend, up=False, why=f"connect failed ({reason})")

    def check_passed(self, backend: Backend, detail: str) -> None:
        backend.last_check = detail
        backend.checks_failed = 0
        backend.checks_passed += 1
        if not backend.up and backend.checks_passed >= self.rise:
            self._set(backend, up=True, why=f"{backend.checks_passed} checks passed ({detail})")

    def check_failed(self, backend: Backend, detail: str) -> None:
        backend.last_check = detail
        backend.checks_passed = 0
        backend.checks_failed += 1
        if backend.up and backend.checks_failed >= self.fall:
            self._set(backend, up=False, why=f"{backend.checks_failed} checks failed ({detail})")

    def _set(self, backend: Backend, *, up: bool, why: str) -> None:
        backend.up = up
        backend.last_change = why
        if backend not in self.backends:
            return
        log.warning(
            "backend %s is %s: %s; %d of %d up",
            backend.address,
            "UP" if up else "DOWN",
            why,
            self.up_count,
            len(self.backends),
        )


def describe_error(exc: OSError) -> str:
    """``Connection refused`` rather than asyncio's ``Connect call failed ('10.0.0.5', 5000)``."""
    if exc.errno:
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__
