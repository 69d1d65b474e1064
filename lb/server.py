"""The balancer: accept, connection cap, tracking, drain and stop.

One :class:`Server` is built from one :class:`~lb.config.Config` (uvicorn's shape).  It owns every
long-lived part (the listening socket, discovery, health checks, the admin listener) and stops
them in :meth:`Server.shutdown`, one ordered method: stop accepting, let open connections finish
until the drain deadline, close the rest, stop the helpers.

Accept path: the listening socket is non-blocking and sits on the pipes' epoll set
(:class:`~lb.pipe.Reactor`); each wakeup accepts no more clients than there is room for, and at
the cap the socket leaves the set, so clients beyond it wait in the kernel backlog (the README
gives the numbers that chose this over ``asyncio.start_server`` and over uvloop's transports).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import select
import socket
from collections.abc import Callable
from types import TracebackType
from typing import Any, Final

from common.logs import Throttled
from common.net import (
    OUT_OF_RESOURCES,
    TCPI_UNACKED,
    ListenError,
    host_port,
    is_ip_address,
    is_local_address,
    listening_socket,
    tcp_info_field,
)
from lb.backends import BackendPool
from lb.config import Config
from lb.discovery import DnsDiscovery, NamedBackends, Resolver
from lb.health import HealthChecker
from lb.pipe import Pipe, Relay, accepted

log = logging.getLogger("lb.server")

#: Seconds the drain deadline watches the connections it is about to end: those that move bytes
#: meanwhile are reset (a cut-short answer must not look whole), the quiet ones get a FIN.
LAST_LOOK: Final = 0.1
#: The most clients accepted per wakeup (HAProxy's ``tune.maxaccept``): the listener stays ready,
#: so the rest come next round, after the events of the connections already open.
ACCEPT_BATCH: Final = 64
#: Seconds accepting pauses when this process is out of descriptors or memory.
ACCEPT_RETRY_DELAY: Final = 1.0


class Server:
    """The Layer-4 round-robin proxy and its helpers, for one :class:`Config`."""

    def __init__(self, config: Config, *, resolver: Resolver | None = None) -> None:
        self.config = config
        self.pool = BackendPool(rise=config.check_rise, fall=config.check_fall)
        #: Connections that hold a slot (connecting or piping); past the cap, clients wait in
        #: the kernel backlog, not accepted (:meth:`waiting`).
        #: A dict used as a set: about 30 bytes per entry where a set takes 100 at 5,000.
        self.pipes: dict[Pipe, None] = {}
        self.accepted_total = 0
        self.finished_total = 0
        self.closed_bytes_to_backend = 0
        self.closed_bytes_to_client = 0
        self.health = HealthChecker(
            self.pool,
            mode=config.check_mode,
            path=config.check_path,
            interval=config.check_interval,
            timeout=config.check_timeout,
        )
        self.discovery: DnsDiscovery | None = None
        if any(not is_ip_address(host) for host, _ in config.backends):
            self.discovery = NamedBackends(
                self.pool,
                config.backends,
                interval=config.resolve_interval,
                expected=config.server_count,
                resolver=resolver,
                # Inside the start's wait for the first answer (check_timeout + 1 s): the IP
                # addresses and the names that answer are in place before the first client.
                lookup_timeout=config.check_timeout,
            )
        elif not config.backends:
            self.discovery = DnsDiscovery(
                self.pool,
                config.backend_host,
                config.backend_port,
                interval=config.resolve_interval,
                expected=config.server_count,
                resolver=resolver,
            )
        self.admin: Any = None  # lb.admin.Admin, imported lazily: the proxy runs without it
        self._relay: Relay | None = None
        self._sock: socket.socket | None = None
        self._accept_wanted = False
        #: Whether the listening socket is on the epoll set now.
        self._accepting = False
        #: Out of descriptors or memory: accepting waits until this timer.
        self._accept_retry: asyncio.TimerHandle | None = None
        self._accept_errors = Throttled(log, logging.ERROR, interval=10.0)
        self._started = False
        self._stopping = False
        self._stopped = asyncio.Event()
        self._force = asyncio.Event()
        self._idle = asyncio.Event()

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind, find the backends, start the checks and the admin listener, accept."""
        if self._started:
            return
        self._started = True
        config = self.config
        try:
            sock = listening_socket(config.host, config.port, backlog=config.backlog)
        except OSError as exc:
            raise ListenError(f"{host_port(config.host, config.port)} (LB_HOST, LB_PORT)",
                              exc) from exc
        self._sock = sock
        try:
            sock.setblocking(False)
            # Accepted sockets inherit it: no system call per client for it.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._relay = Relay(
                self.pool,
                loop=asyncio.get_running_loop(),
                on_finish=self._finish,
                on_shortage=self._pause_accepting,
                connect_timeout=config.connect_timeout,
                connect_retries=config.connect_retries,
                idle_timeout=config.idle_timeout,
                half_close_timeout=config.half_close_timeout,
                buffer_size=config.buffer_size,
            )
        except BaseException:
            sock.close()
            raise
        self.pool.is_own_address = own_address_check(sock)
        try:
            if self.discovery is None:
                self.pool.update(config.backends)
                if len(self.pool) != config.server_count:
                    log.warning("LB_BACKENDS lists %d backend%s, SERVER_COUNT expects %d",
                                len(self.pool), "" if len(self.pool) == 1 else "s",
                                config.server_count)
            else:
                # The first answer before the first client, but never wait for DNS for long.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(config.check_timeout + 1.0):
                        await self.discovery.refresh()
                self.discovery.start()
            self.health.start()
            if config.admin_port:
                from lb.admin import Admin

                self.admin = Admin(self)
                try:
                    await self.admin.start(config.admin_host, config.admin_port)
                except OSError as exc:
                    where = host_port(config.admin_host, config.admin_port)
                    raise ListenError(f"{where} (the admin listener: LB_ADMIN_HOST, "
                                      "LB_ADMIN_PORT)", exc) from exc
            self._set_accepting(True)
        except BaseException:
            await self.shutdown()
            raise
        log.info(
            "listening on %s; backends %s; admin %s",
            host_port(config.host, self.port),
            ", ".join(b.address for b in self.pool.backends) or "(none yet)",
            f"http://{host_port(config.admin_host, self.admin.port)}/" if self.admin else "off",
        )

    @property
    def port(self) -> int:
        """The port actually bound (useful with ``LB_PORT=0``)."""
        assert self._sock is not None, "start() first"
        return int(self._sock.getsockname()[1])

    @property
    def admin_port(self) -> int | None:
        return None if self.admin is None else int(self.admin.port)

    async def serve(self, stop: asyncio.Event) -> None:
        """Start, run until ``stop`` is set, then shut down (the ``python -m lb`` main)."""
        await self.start()
        await stop.wait()
        await self.shutdown()

    def force_stop(self) -> None:
        """Give up on the drain: open connections are closed at once (a second signal)."""
        self._force.set()

    async def shutdown(self, drain_timeout: float | None = None) -> None:
        """Stop accepting, let connections finish until the deadline, close the rest, stop."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        deadline = self.config.drain_timeout if drain_timeout is None else drain_timeout
        try:
            # 1. No new clients: the listening socket goes, so the kernel backlog is refused too.
            self._set_accepting(False)
            if self._accept_retry is not None:
                self._accept_retry.cancel()
            if self._sock is not None:
                self._sock.close()
            # 2. The drain: open connections finish on their own until the deadline...
            if self.pipes:
                log.info("draining %d connections (up to %.1f s)", len(self.pipes), deadline)
                self._idle.clear()
                await self._wait_idle(deadline)
            # 3. ...then the rest are closed.
            if self.pipes:
                forced = self._force.is_set()
                if not forced:
                    log.warning("closing %d connections still open at the drain deadline",
                                len(self.pipes))
                # A last look, so that "bytes moving" means now: a keep-alive connection
                # answered a while ago is quiet and gets a FIN, not an RST.
                if self._relay is not None:
                    self._relay.stop_timeouts()
                for pipe in self.pipes:
                    pipe.forget_activity()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._idle.wait(), LAST_LOOK)
                for pipe in list(self.pipes):
                    pipe.shutdown("second signal" if forced else "drain deadline")
                self._idle.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2.0):
                        await self._wait_idle(None)
            # 4. The helpers.
            if self._relay is not None:
                self._relay.close()
            self._accept_errors.close()
            await self.health.stop()
            if self.discovery is not None:
                await self.discovery.stop()
            if self.admin is not None:
                await self.admin.stop()
        finally:
            self._stopped.set()
        log.info("stopped after %d connections", self.accepted_total)

    async def _wait_idle(self, deadline: float | None) -> None:
        if not self.pipes:
            return
        idle = asyncio.ensure_future(self._idle.wait())
        force = asyncio.ensure_future(self._force.wait())
        try:
            await asyncio.wait({idle, force}, timeout=deadline,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            idle.cancel()
            force.cancel()
            await asyncio.gather(idle, force, return_exceptions=True)

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown()

    # --- accepting and the cap ----------------------------------------------------------------

    def _room(self) -> int:
        """How many more clients may be accepted now: the rest wait in the kernel backlog."""
        if self._stopping:
            return 0
        return self.config.max_connections - len(self.pipes)

    def _accept(self, _events: int) -> None:
        relay, sock = self._relay, self._sock
        assert relay is not None
        assert sock is not None
        family = sock.family
        for _ in range(min(self._room(), ACCEPT_BATCH)):
            try:
                fd, address = sock._accept()  # type: ignore[attr-defined]  # no socket object
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in OUT_OF_RESOURCES:
                    self._accept_errors.log("cannot accept a client: %s; accepting again in "
                                            "%.0f s", exc, ACCEPT_RETRY_DELAY)
                    self._pause_accepting()
                    return
                continue  # that client left before its accept (ECONNABORTED, ...)
            try:
                pipe = accepted(relay, fd, family, address)
            except OSError as exc:
                self._accept_errors.log("cannot set up an accepted client: %s", exc)
                continue
            self.accepted_total += 1
            self.pipes[pipe] = None
            pipe.start()
            if self._accept_retry is not None:  # its connect met a shortage: the next would too
                return
        if self._room() <= 0:
            self._set_accepting(False)

    def _pause_accepting(self) -> None:
        """Out of descriptors or memory: clients wait in the backlog for a second."""
        self._listen(False)
        if self._accept_retry is None and not self._stopping:
            self._accept_retry = asyncio.get_running_loop().call_later(
                ACCEPT_RETRY_DELAY, self._retry_accept)

    def _retry_accept(self) -> None:
        self._accept_retry = None
        self._set_accepting(self._accept_wanted)

    def _finish(self, pipe: Pipe) -> None:
        self.finished_total += 1
        self.closed_bytes_to_backend += pipe.bytes_to_backend
        self.closed_bytes_to_client += pipe.bytes_to_client
        self.pipes.pop(pipe, None)
        if not self.pipes:
            self._idle.set()
        if (not self._accepting and not self._stopping
                and len(self.pipes) < self.config.max_connections):
            self._set_accepting(True)

    def _set_accepting(self, wanted: bool) -> None:
        if self._stopping:
            wanted = False
        self._accept_wanted = wanted
        self._listen(wanted and self._accept_retry is None)

    def _listen(self, on: bool) -> None:
        """Put the listening socket on the epoll set, or take it off (clients wait in the
        kernel backlog meanwhile)."""
        if on == self._accepting or self._relay is None or self._sock is None:
            return
        self._accepting = on
        self._relay.reactor.watch(self._sock.fileno(), select.EPOLLIN if on else 0, self._accept)

    # --- numbers ------------------------------------------------------------------------------

    def waiting(self) -> int:
        """Clients whose handshake is done, waiting in the listener's backlog to be accepted
        (the cap reached, accepting paused, or the next wakeup to come; one that left while
        queued counts until accepted); for a listening socket the kernel's TCP_INFO gives its
        accept queue's length as ``tcpi_unacked``."""
        sock = self._sock
        if sock is None or sock.fileno() < 0:
            return 0
        return tcp_info_field(sock, TCPI_UNACKED)

    def stats(self) -> dict[str, Any]:
        """Per backend and in total: state, connections, failed connects, bytes, last check."""
        live: dict[int, tuple[int, int]] = {}
        live_up = live_down = 0
        for pipe in self.pipes:
            live_up += pipe.bytes_to_backend
            live_down += pipe.bytes_to_client
            if pipe.backend is not None:
                up, down = live.get(id(pipe.backend), (0, 0))
                live[id(pipe.backend)] = (up + pipe.bytes_to_backend, down + pipe.bytes_to_client)
        backends = []
        for b in self.pool.backends:
            up, down = live.get(id(b), (0, 0))
            backends.append({
                "address": b.address,
                "state": "up" if b.up else "down",
                "active_connections": b.active,
                "total_connections": b.total,
                "failed_connects": b.failed_connects,
                "bytes_to_backend": b.bytes_to_backend + up,
                "bytes_to_client": b.bytes_to_client + down,
                "last_check": b.last_check,
                "last_change": b.last_change,
            })
        pool = self.pool
        return {
            "backends": backends,
            "totals": {
                "backends": len(pool),
                "backends_up": pool.up_count,
                "backends_expected": self.config.server_count,
                "active_connections": len(self.pipes),
                "waiting_connections": self.waiting(),
                "max_connections": self.config.max_connections,
                "accepted_connections": self.accepted_total,
                "finished_connections": self.finished_total,
                "total_connections": pool.retired_total + sum(b.total for b in pool.backends),
                "failed_connects": pool.retired_failed_connects
                + sum(b.failed_connects for b in pool.backends),
                "bytes_to_backend": self.closed_bytes_to_backend + live_up,
                "bytes_to_client": self.closed_bytes_to_client + live_down,
                "accepting": self._accepting,
                "stopping": self._stopping,
            },
        }


def own_address_check(sock: socket.socket) -> Callable[[str, int], bool]:
    """Whether a backend address is where ``sock`` listens: its own address and port, or, on a
    wildcard address, any of this machine's on that port (of the families it takes)."""
    own_host, own_port = sock.getsockname()[:2]
    own_ip = _unmapped(ipaddress.ip_address(own_host.partition("%")[0]))
    takes_ipv4 = own_ip.version == 4 or (
        own_ip.is_unspecified
        and not sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))
    local: dict[str, bool] = {}

    def is_own(host: str, port: int) -> bool:
        if port != own_port:
            return False
        ip = _unmapped(ipaddress.ip_address(host.partition("%")[0]))
        if ip.is_unspecified:  # a connect to 0.0.0.0 or :: reaches this machine's loopback
            ip = _LOOPBACK[ip.version]
        if not own_ip.is_unspecified:
            return ip == own_ip
        if ip.version != own_ip.version and not (ip.version == 4 and takes_ipv4):
            return False
        address = str(ip)
        if address not in local:
            local[address] = is_local_address(address)
        return local[address]

    return is_own


_LOOPBACK: Final = {4: ipaddress.ip_address("127.0.0.1"), 6: ipaddress.ip_address("::1")}


def _unmapped(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """``::ffff:127.0.0.1`` as ``127.0.0.1``: a dual-stack socket takes IPv4 clients so."""
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return mapped or ip

