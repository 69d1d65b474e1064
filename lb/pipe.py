"""One proxied connection on raw sockets: connect with failover, both directions, half-close,
timeouts, close once.

Every proxied socket is a non-blocking socket on one epoll set (:class:`Reactor`), and the event
loop watches that set as one reader.  A ready socket costs no transport, no protocol callback
and no loop handle: :meth:`Reactor._ready` reads a chunk into one shared buffer and sends it to
the other side in the same step.  Per new connection this saves what uvloop's transports spend
(their name lookups, weak references, and libuv's extra epoll changes): the README gives the
numbers that chose it.

Backpressure: a chunk the other side does not take whole waits in :attr:`Side.pending`, and the
side it came from is not read until it is written out, so at most one chunk (``buffer_size``)
is held per direction.  The client is read only once a backend is connected.  Half-close is
passed on with ``shutdown(SHUT_WR)``, each socket is closed once, and a reset is carried across
as a reset.  No task or timer handle lives per connection once it is connected: the idle and
half-close timeouts are two timers shared by every pipe.

This module is the hot path: it imports the backend state and nothing from health, discovery or
admin code.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import errno
import logging
import os
import select
import socket
import struct
from collections.abc import Callable
from typing import Final

from common.logs import Throttled
from common.net import OUT_OF_RESOURCES, TCPI_BYTES_ACKED, host_port, tcp_info_field
from lb.backends import Backend, BackendPool, describe_error

if not hasattr(select, "epoll"):
    raise ImportError("the balancer needs Linux: its pipe runs on epoll (select.epoll)")

log = logging.getLogger("lb.pipe")

#: SO_LINGER on, zero seconds: close() sends RST, so a reset is carried across as a reset.
_LINGER_RESET: Final = struct.pack("ii", 1, 0)
#: A shared timeout timer ticks this many times per timeout: a connection is closed after between
#: 1 and 1 + 1/_TICKS timeouts of silence, and a chunk costs no timer work at all.
_TICKS: Final = 4
#: At most one log line per this many seconds about this process running out of resources.
_LOCAL_ERROR_LOG_INTERVAL: Final = 10.0
_IN: Final = select.EPOLLIN
_OUT: Final = select.EPOLLOUT
#: A side that waits for no data stays on the set for errors only, edge-triggered: a peer's RST
#: is seen at once, and a condition that lasts (its FIN while the side is paused) wakes nobody
#: over and over.
_PARKED: Final = select.EPOLLET
#: Events handled per wakeup; more stay ready, and the loop calls again.
_MAX_EVENTS: Final = 256
_STREAM_NONBLOCK: Final = socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
_NODELAY: Final = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Reactor:
    """The epoll set of every proxied socket, watched by the event loop as one reader.

    Sockets closed while a batch of events is handled are closed when the batch ends: until
    then their descriptor numbers cannot be reused, so an event of the batch never reaches a
    socket made after it. The other descriptors' callbacks (the listener's accept) run after
    those closes: the connections that ended in the batch have given their descriptors back
    by then, so the cap, counted in connections, bounds the descriptors too (but for a
    moment's third one, while a pipe moves on from a backend that failed its connect).
    """

    __slots__ = ("_deferred", "_in_batch", "buffer", "epoll", "loop", "others", "sides", "view")

    def __init__(self, loop: asyncio.AbstractEventLoop, *, chunk_size: int) -> None:
        self.loop = loop
        self.epoll = select.epoll()
        #: The registered sides of pipes, by descriptor (parked ones too; not a client waiting
        #: for its backend's connect).
        self.sides: dict[int, Side] = {}
        #: Other registered descriptors (the listening socket) and what to call on their events.
        self.others: dict[int, Callable[[int], None]] = {}
        #: One read buffer for every socket: a chunk is sent on before the next read.
        self.buffer = bytearray(chunk_size)
        self.view = memoryview(self.buffer)
        self._deferred: list[_socket.socket] = []
        self._in_batch = False
        loop.add_reader(self.epoll.fileno(), self._ready)

    def close(self) -> None:
        """Stop watching, and close every socket still registered."""
        with contextlib.suppress(ValueError, OSError, RuntimeError):  # the loop is closed
            self.loop.remove_reader(self.epoll.fileno())
        for side in list(self.sides.values()):
            side.sock.close()
        self.sides.clear()
        self.others.clear()
        self.epoll.close()

    def watch(self, fd: int, events: int, callback: Callable[[int], None]) -> None:
        """Call ``callback(events)`` when ``fd`` is ready for ``events`` (0: not at all)."""
        if fd in self.others:
            if events:
                self.epoll.modify(fd, events)
            else:
                del self.others[fd]
                self.epoll.unregister(fd)
        elif events:
            self.epoll.register(fd, events)
            self.others[fd] = callback

    def release(self, sock: _socket.socket) -> None:
        """Close ``sock`` (its side already removed from :attr:`sides`), at the end of the
        batch when one is being handled."""
        if self._in_batch:
            self._deferred.append(sock)
        else:
            sock.close()

    def _ready(self) -> None:
        sides = self.sides
        buffer = self.buffer
        view = self.view
        others: list[tuple[int, int]] | None = None
        self._in_batch = True
        try:
            for fd, events in self.epoll.poll(0, _MAX_EVENTS):
                side = sides.get(fd)
                try:
                    if side is None:
                        if others is None:
                            others = []
                        others.append((fd, events))
                        continue
                    # A side can stop reading earlier in the same batch (its backend reset it,
                    # and it waits for the next one): its readiness is then no order to read.
                    if (events != _IN or not side.mask & _IN) and not side.event(events):
                        continue
                    # Read a chunk, send it on: inline, as this runs for every chunk. The bound
                    # methods are read as attributes first: called straight from a slot, each
                    # would take the interpreter's slow path for method calls.
                    recv_into = side.recv_into
                    try:
                        n = recv_into(buffer)
                    except OSError as exc:
                        side.read_failed(exc)
                        continue
                    if not n:
                        side.pipe.eof_read(side)
                        continue
                    side.received += n
                    send = side.peer_send
                    try:
                        sent = send(view[:n])
                    except BlockingIOError:
                        sent = 0
                    except OSError as exc:
                        side.write_failed(exc, view[:n])
                        continue
                    if sent != n:
                        side.held_back(view[sent:n])
                except Exception:  # a bug here must not take the other connections with it
                    log.exception("internal error on descriptor %d", fd)
                    if side is not None:
                        side.pipe.internal_error()
        finally:
            self._in_batch = False
            if self._deferred:
                deferred, self._deferred = self._deferred, []
                for sock in deferred:
                    with contextlib.suppress(OSError):
                        sock.close()
        for fd, events in others or ():
            # Looked up now: a callback of this batch may have taken another off the set.
            callback = self.others.get(fd)
            if callback is not None:
                try:
                    callback(events)
                except Exception:  # as above: the connections go on
                    log.exception("internal error on descriptor %d", fd)


class Side:
    """One socket of a pipe: the client's or the backend's."""

    __slots__ = (
        "connecting",
        "dropped",
        "eof",
        "fd",
        "mask",
        "open",
        "peer",
        "peer_send",
        "pending",
        "pipe",
        "reactor",
        "received",
        "recv_into",
        "sock",
    )

    def __init__(self, pipe: Pipe, sock: _socket.socket) -> None:
        self.pipe = pipe
        self.reactor = pipe.relay.reactor
        self.sock = sock
        self.fd = sock.fileno()
        self.recv_into = sock.recv_into
        #: The other side, and its socket's ``send`` (set once both exist).
        self.peer: Side | None = None
        self.peer_send: Callable[[memoryview], int] = _no_peer
        #: Bytes read from this socket (and sent on, or held in the other side's pending).
        self.received = 0
        #: Bytes for this socket that it did not take yet; the other side is not read meanwhile.
        self.pending: bytes | memoryview = b""
        #: Of what was read from the other side, the bytes dropped unsent when this side ended.
        self.dropped = 0
        #: The events this side is registered for (0: not registered; _PARKED: errors only).
        self.mask = 0
        self.eof = False
        self.open = True
        self.connecting = False

    def want(self, mask: int) -> None:
        """Wait for exactly ``mask`` (readable, writable); a side that waits for neither is
        parked (see :data:`_PARKED`)."""
        mask = (mask & (_IN | _OUT)) or _PARKED
        old = self.mask
        if mask == old or not self.open:
            return
        if old:
            self.reactor.epoll.modify(self.fd, mask)
        else:
            self.reactor.epoll.register(self.fd, mask)
            self.reactor.sides[self.fd] = self
        self.mask = mask

    def close(self, *, reset: bool = False) -> None:
        """Close the socket (once), with an RST when ``reset``."""
        if not self.open:
            return
        self.open = False
        if self.mask:
            self.reactor.sides.pop(self.fd, None)  # (gone already once the reactor closed)
            self.mask = 0
        if reset:
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        self.reactor.release(self.sock)

    def event(self, events: int) -> bool:
        """Anything but plain readability: a connect that ended, room to write, an error.
        True when the side is to be read now (by :meth:`Reactor._ready`)."""
        pipe = self.pipe
        if self.connecting:
            pipe.connect_ended(self, events)
            return False
        if self.mask == _PARKED:  # waiting for nothing: only a reset is news (a FIN is read later)
            if events & select.EPOLLERR:
                pipe.failed(self, _socket_error(self.sock))
            return False
        if self.pending and events & (_OUT | select.EPOLLERR | select.EPOLLHUP):
            pipe.flush(self)
        return bool(self.open and self.mask & _IN
                    and events & (_IN | select.EPOLLERR | select.EPOLLHUP))

    def held_back(self, rest: memoryview) -> None:
        """The other side took part of a chunk: keep the rest, stop reading until it is written."""
        peer = self.peer
        assert peer is not None
        # A copy (the buffer is read into next), seen through a view: writing it out in parts
        # slices the view, not the bytes.
        peer.pending = memoryview(bytes(rest))
        peer.want(peer.mask | _OUT)
        self.want(self.mask & ~_IN)

    def read_failed(self, exc: OSError) -> None:
        if not isinstance(exc, BlockingIOError):  # ready, then not: nothing to do
            self.pipe.failed(self, exc)

    def write_failed(self, exc: OSError, chunk: memoryview) -> None:
        """Sending ``chunk``, read from this side, failed: it did not pass."""
        assert self.peer is not None
        self.received -= len(chunk)
        self.pipe.failed(self.peer, exc, unsent=chunk)


def _socket_error(sock: _socket.socket) -> OSError:
    """The error a socket reported (a reset, when it does not say)."""
    try:
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    except OSError as exc:
        return exc
    return _os_error(code or errno.ECONNRESET)


def _os_error(code: int) -> OSError:
    """The OSError of an errno a system call returned instead of raising."""
    return OSError(code, os.strerror(code))


def _no_peer(_: memoryview) -> int:
    raise AssertionError("a side is read only once the other side exists")


class Relay:
    """What every pipe of one server shares: the backends, the limits, the epoll set, and the
    server's hooks."""

    __slots__ = (
        "buffer_size",
        "connect_retries",
        "connect_timeout",
        "debug",
        "half_close_sweep",
        "idle_sweep",
        "local_errors",
        "loop",
        "on_finish",
        "on_shortage",
        "pool",
        "reactor",
    )

    def __init__(
        self,
        pool: BackendPool,
        *,
        loop: asyncio.AbstractEventLoop,
        on_finish: Callable[[Pipe], None],
        on_shortage: Callable[[], None] | None = None,
        connect_timeout: float = 3.0,
        connect_retries: int = 3,
        idle_timeout: float = 300.0,
        half_close_timeout: float = 30.0,
        buffer_size: int = 262144,
    ) -> None:
        self.pool = pool
        self.loop = loop
        #: Called once when both sockets are closed and the connect step is over.
        self.on_finish = on_finish
        #: Called when a socket to a backend cannot be made for want of descriptors or memory:
        #: the next client accepted would meet the same shortage.
        self.on_shortage = on_shortage
        self.connect_timeout = connect_timeout
        self.connect_retries = connect_retries
        self.buffer_size = buffer_size
        self.reactor = Reactor(loop, chunk_size=buffer_size)
        self.debug = log.isEnabledFor(logging.DEBUG)
        self.local_errors = Throttled(log, logging.ERROR, interval=_LOCAL_ERROR_LOG_INTERVAL)
        # One shared timer per timeout ticks every pipe it watches, instead of one timer handle
        # per connection: less memory per idle connection and no reschedule per connection.
        self.idle_sweep = _Sweep(loop, idle_timeout, "idle timeout")
        self.half_close_sweep = _Sweep(
            loop, min(half_close_timeout, idle_timeout), "half-close timeout"
        )

    def stop_timeouts(self) -> None:
        """No more idle or half-close ticks: the drain's last look at activity (see
        :meth:`Pipe.forget_activity`) must not be taken by a tick meanwhile."""
        self.idle_sweep.stop()
        self.half_close_sweep.stop()

    def close(self) -> None:
        self.stop_timeouts()
        self.local_errors.close()
        self.reactor.close()

    def log_local_error(self, address: str, exc: OSError) -> None:
        """Out of descriptors, memory or local ports hits every client at once: one line per
        interval."""
        self.local_errors.log("cannot connect to %s: %s", address, exc)

    def shortage(self, address: str, exc: OSError) -> None:
        """No descriptor or memory for a socket to a backend: logged, and the server told."""
        self.log_local_error(address, exc)
        if self.on_shortage is not None:
            self.on_shortage()


class Pipe:
    """One proxied connection: its two sides and its state."""

    __slots__ = (
        "_active",
        "_carry",
        "_closing",
        "_done",
        "_expiry",
        "_idle_ticks",
        "_redispatched",
        "_seen",
        "_sweep",
        "_timeouts_left",
        "_tried",
        "address",
        "backend",
        "client",
        "end",
        "relay",
        "started",
        "upstream",
    )

    def __init__(self, relay: Relay, sock: _socket.socket, address: object) -> None:
        self.relay = relay
        #: The client's address as accept() gave it (formatted only for a log line).
        self.address = address
        self.client = Side(self, sock)
        self.upstream: Side | None = None
        self.backend: Backend | None = None
        self.started = relay.loop.time() if relay.debug else 0.0
        #: Why the connection ended, for the log line (set once, by whoever ends it first).
        self.end = ""
        self._tried: list[Backend] = []
        self._timeouts_left = 0
        self._expiry: asyncio.TimerHandle | None = None
        self._sweep: _Sweep | None = None
        self._active = False
        self._idle_ticks = 0
        #: The byte counts at the last look (see _movement); None: not looked at yet.
        self._seen: int | None = None
        self._closing = False
        self._done = False
        self._redispatched = False
        #: The client's first chunk, which met a backend's reset: sent to the next backend.
        self._carry = b""

    @property
    def peer(self) -> str:
        address = self.address
        return host_port(address[0], address[1]) if isinstance(address, tuple) else "?"

    @property
    def bytes_to_backend(self) -> int:
        """Bytes read from the client and sent to the backend (or waiting to be)."""
        upstream = self.upstream
        return self.client.received - (upstream.dropped if upstream is not None else 0)

    @property
    def bytes_to_client(self) -> int:
        upstream = self.upstream
        return upstream.received - self.client.dropped if upstream is not None else 0

    @property
    def closing(self) -> bool:
        return self._closing

    # --- the connect step ---------------------------------------------------------------------

    def start(self) -> None:
        """Connect to a backend and start piping (the server calls this once a slot is free)."""
        if self._closing:
            self._maybe_done()
            return
        self._timeouts_left = self.relay.connect_retries
        self._connect_next()

    def _connect_next(self) -> None:
        """Connect to the next backend in turn not tried yet; each is tried at most once,
        and at most 1 + ``connect_retries`` connects may time out."""
        try:
            self._connect_step()
        except Exception:  # the step runs from timers and the accept path too: end this pipe
            log.exception("connect step failed for client %s", self.peer)
            self.internal_error()

    def _connect_step(self) -> None:
        relay = self.relay
        pool = relay.pool
        tried = self._tried
        while not self._closing:
            backend = pool.choose(tried)
            if backend is None:
                break
            tried.append(backend)
            try:
                sock = _socket.socket(
                    socket.AF_INET6 if ":" in backend.host else socket.AF_INET, _STREAM_NONBLOCK)
            except OSError as exc:
                if exc.errno in OUT_OF_RESOURCES:
                    relay.shortage(backend.address, exc)
                    break
                # (An address family the host lacks, a policy refusing sockets, ...)
                pool.connect_failed(backend, describe_error(exc))
                continue
            try:
                sock.setsockopt(*_NODELAY)
                code = sock.connect_ex((backend.host, backend.port))
            except OSError as exc:
                code = exc.errno or errno.EINVAL
            if code == errno.EINPROGRESS:
                side = Side(self, sock)
                side.connecting = True
                self.upstream = side
                self.backend = backend
                self._expiry = relay.loop.call_later(relay.connect_timeout, self._timed_out)
                side.want(_OUT)
                return
            if code == 0:  # connected at once (a local socket may be)
                side = Side(self, sock)
                self.upstream = side
                self.backend = backend
                self._attached(side)
                return
            sock.close()
            if code in OUT_OF_RESOURCES:  # ours, not the backend's
                relay.shortage(backend.address, _os_error(code))
                break
            if code == errno.EADDRNOTAVAIL:  # no local port left for this backend's address
                relay.log_local_error(backend.address, _os_error(code))
                break
            pool.connect_failed(backend, describe_error(_os_error(code)))
        if not self._closing:
            self._abort("no backend accepted" if tried else "no backends", reset=False)

    def connect_ended(self, side: Side, events: int) -> None:
        """The connect of ``side`` succeeded or failed (its socket became writable)."""
        self._cancel_expiry()
        code = 0
        # Writable with no error or hang-up is a connect that succeeded: the system call that
        # would ask is needed only when it did not.
        if events & (select.EPOLLERR | select.EPOLLHUP):
            try:
                code = side.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            except OSError as exc:
                code = exc.errno or errno.EINVAL
        if code == 0:
            self._attached(side)
            return
        self.relay.pool.connect_failed(self._drop_connect(side), describe_error(_os_error(code)))
        self._connect_next()

    def _timed_out(self) -> None:
        self._expiry = None
        side = self.upstream
        if side is None or not side.connecting or self._closing:
            return
        self.relay.pool.connect_failed(self._drop_connect(side), "timeout")
        if self._timeouts_left == 0:
            self._abort("no backend accepted", reset=False)
            return
        self._timeouts_left -= 1
        self._connect_next()

    def _drop_connect(self, side: Side) -> Backend:
        """Give up the connect of ``side``; the backend it was to."""
        side.connecting = False
        side.close()
        self.upstream = None
        backend, self.backend = self.backend, None
        assert backend is not None
        return backend

    def _cancel_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None

    def _attached(self, upstream: Side) -> None:
        """The backend is connected: count it, and read both sides."""
        backend = self.backend
        assert backend is not None
        backend.active += 1
        backend.total += 1
        upstream.connecting = False
        client = self.client
        upstream.peer = client
        client.peer = upstream
        upstream.peer_send = client.sock.send
        client.peer_send = upstream.sock.send
        self._arm_timer()
        if self._carry:
            carry, self._carry = self._carry, b""
            client.received += len(carry)
            try:
                sent = upstream.sock.send(carry)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                client.received -= len(carry)
                upstream.want(_IN)
                self.failed(upstream, exc)
                return
            if sent < len(carry):  # the client is read once the rest is written (flush)
                upstream.pending = memoryview(carry)[sent:]
                upstream.want(_IN | _OUT)
                return
        upstream.want(_IN)
        # Read from the client only now: until the backend existed, its bytes had nowhere to go
        # and the kernel's buffer was the right place for them.
        client.want(_IN)

    # --- piping -------------------------------------------------------------------------------

    def flush(self, side: Side) -> None:
        """``side`` can take more of what is pending for it."""
        pending = side.pending
        try:
            sent = side.sock.send(pending)
        except BlockingIOError:
            return
        except OSError as exc:
            self.failed(side, exc)
            return
        self._active = True
        if sent < len(pending):
            side.pending = pending[sent:]
            return
        side.pending = b""
        side.want(side.mask & ~_OUT)
        source = side.peer
        assert source is not None
        if not source.eof:
            source.want(source.mask | _IN)

    def eof_read(self, side: Side) -> None:
        """``side``'s peer ended its direction: pass the EOF on; when both have, close."""
        side.eof = True
        peer = side.peer
        assert peer is not None
        if peer.eof:  # both directions ended
            self._close("done")
            return
        side.want(side.mask & ~_IN)
        # Nothing waits to be written to the peer: a side is read only while nothing does.
        if self._shut(peer):
            self._arm_timer()

    def internal_error(self) -> None:
        """A bug met this pipe: end it, whatever state it was left in."""
        with contextlib.suppress(Exception):
            self._abort("internal error", reset=True)
        for side in (self.client, self.upstream):
            if side is not None and side.open:
                with contextlib.suppress(Exception):
                    self._drop(side, reset=True)
        with contextlib.suppress(Exception):
            self._maybe_done()

    def _shut(self, side: Side) -> bool:
        """Pass an EOF on to ``side``; False when that found it reset (the pipe is ended)."""
        try:
            side.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._abort("reset during half-close", reset=True)
            return False
        return True

    def failed(self, side: Side, exc: OSError, *, unsent: memoryview | None = None) -> None:
        """A read from or a write to ``side`` failed: its peer reset the connection. ``unsent``:
        the chunk that could not be sent to it."""
        if side is self.upstream and self._unused():
            # The client's first bytes met the reset: they go to the next backend.
            self._carry = bytes(unsent) if unsent is not None else b""
            self._redispatch()
            return
        self._abort("client reset" if side is self.client else "backend reset", reset=True)

    def _unused(self) -> bool:
        """Nothing has passed in either direction yet (so the backend saw nothing of the
        client's), and the connection has not been moved once already."""
        upstream = self.upstream
        return (self.client.received == 0 and not self.client.eof and upstream is not None
                and upstream.received == 0 and not upstream.eof and not self._redispatched)

    def _redispatch(self) -> None:
        """The backend reset the connection before any byte passed: the client is moved to
        another backend, as if the connect had failed.

        A replica killed with connections still in its accept queue resets them: without
        this, each such client would get a reset for a request it has not even sent. One
        such reset does not mark the backend down: a healthy one may reset a connection left
        silent too long (nginx's reset_timedout_connection), and a dead one refuses the next
        connect, which does. ``fall`` of them in a row, with no answer from it in between (a
        port forward whose target is gone, a TCP check passing all the while), do.
        """
        self._redispatched = True
        upstream, backend = self.upstream, self.backend
        assert upstream is not None
        assert backend is not None
        backend.resets_unused += 1
        pool = self.relay.pool
        if backend.resets_unused >= pool.fall:
            pool.connect_failed(
                backend, f"{backend.resets_unused} connections in a row reset before any byte")
        self._release_upstream()
        self.upstream = None
        self.backend = None
        self._cancel_timer()
        client = self.client
        client.peer = None
        client.peer_send = _no_peer
        client.want(client.mask & ~_IN)  # what the client sends meanwhile waits in the kernel
        self._tried = [backend]
        self._timeouts_left = self.relay.connect_retries
        self._connect_next()

    def _release_upstream(self, *, reset: bool = False) -> None:
        upstream = self.upstream
        if upstream is None or not upstream.open:
            return
        if not upstream.connecting and self.backend is not None:
            self.backend.active -= 1
        upstream.close(reset=reset)

    # --- endings ------------------------------------------------------------------------------

    def _close(self, why: str) -> None:
        """Close both sides with a FIN. Called once both EOFs were read: nothing is pending
        then, as a side is read only while nothing waits to be written to its peer."""
        if not self._ending(why):
            return
        for side in self._sides():
            assert not side.pending, "closing with bytes still to write"
            self._close_side(side)
        self._maybe_done()

    def _abort(self, why: str, *, reset: bool) -> None:
        """Close both sides now, dropping pending bytes; with ``reset``, peers get an RST."""
        if not self._ending(why):
            return
        for side in self._sides():
            self._drop(side, reset=reset)
        self._maybe_done()

    def _drop(self, side: Side, *, reset: bool) -> None:
        side.dropped += len(side.pending)  # the count is of bytes that left, not dropped ones
        side.pending = b""
        self._close_side(side, reset=reset)

    def _close_side(self, side: Side, *, reset: bool = False) -> None:
        if side is self.upstream:
            self._release_upstream(reset=reset)
        else:
            side.close(reset=reset)

    def _sides(self) -> tuple[Side, ...]:
        """The sides whose sockets are still open."""
        upstream = self.upstream
        if upstream is None or not upstream.open:
            return (self.client,) if self.client.open else ()
        return (self.client, upstream) if self.client.open else (upstream,)

    def _cut(self, why: str) -> None:
        """The balancer ends the connection on its own (a timeout, the drain deadline). A FIN
        would tell each peer that the other's stream ended there, so when bytes are in flight
        (pending here, or moving since the last tick or :meth:`forget_activity`) the peers get
        an RST: a cut-short answer never looks whole. A quiet connection is closed."""
        if self._closing:  # its sockets are closed already
            return
        in_flight = (self._active or any(side.pending for side in self._sides())
                     or (self._seen is not None and self._movement() != self._seen))
        self._abort(why, reset=in_flight)

    def _ending(self, why: str) -> bool:
        """Mark the connection as ending (once: later calls get False), stop its timer and
        its connect step."""
        if self._closing:
            return False
        self._closing = True
        self.end = why
        self._cancel_timer()
        self._cancel_expiry()
        upstream = self.upstream
        if upstream is not None and upstream.connecting:
            self._drop_connect(upstream)
        return True

    def shutdown(self, why: str) -> None:
        """The server is stopping and cannot wait any longer for this connection."""
        self._cut(why)

    def forget_activity(self) -> None:
        """Start a new look at whether bytes move, which :meth:`shutdown` then asks."""
        self._active = False
        self._seen = self._movement()

    def _movement(self) -> int:
        """A number that grows whenever bytes are read from either side, or a peer
        acknowledges bytes the kernel held for it (a slow reader draining its socket's buffer
        while nothing passes through Python)."""
        moved = 0
        for side in self._sides():
            moved += side.received + tcp_info_field(side.sock, TCPI_BYTES_ACKED)
        return moved

    def _maybe_done(self) -> None:
        if self._done or self.client.open:
            return
        upstream = self.upstream
        if upstream is not None and upstream.open:
            return
        self._done = True
        self._cancel_timer()
        self._cancel_expiry()
        backend = self.backend
        if backend is not None:
            backend.bytes_to_backend += self.bytes_to_backend
            backend.bytes_to_client += self.bytes_to_client
            if self.bytes_to_client:
                backend.resets_unused = 0
        if self.relay.debug:
            log.debug(
                "client=%s backend=%s to_backend=%d to_client=%d duration=%.3fs end=%s",
                self.peer,
                backend.address if backend is not None else "-",
                self.bytes_to_backend,
                self.bytes_to_client,
                self.relay.loop.time() - self.started,
                self.end or "closed",
            )
        self.relay.on_finish(self)

    # --- idle and half-close timeouts ---------------------------------------------------------

    def _arm_timer(self) -> None:
        """(Re)start the idle timeout, or the half-close one once a direction has ended."""
        relay = self.relay
        upstream = self.upstream
        ended = self.client.eof or (upstream is not None and upstream.eof)
        self._watch(relay.half_close_sweep if ended else relay.idle_sweep)

    def _watch(self, sweep: _Sweep) -> None:
        if self._sweep is not sweep:
            self._cancel_timer()
            sweep.add(self)
            self._sweep = sweep
        self._idle_ticks = 0
        # Counted as activity, so the first tick (which may come at once) does not count as
        # silence: a pipe is ended after between 1 and 1 + 1/_TICKS timeouts of silence.
        self._active = True

    def _cancel_timer(self) -> None:
        if self._sweep is not None:
            self._sweep.pipes.pop(self, None)
            self._sweep = None

    def _tick(self, sweep: _Sweep) -> None:
        """One tick of the shared timer of ``sweep``.

        Activity is a chunk read from either side since the last tick, or pending bytes a
        slow peer took: so a slow reader draining them counts as traffic, while one that takes
        nothing, its buffers full, is still silence."""
        if self._done:
            self._cancel_timer()
            return
        seen = self._movement()
        moved = self._active or seen != self._seen
        self._active = False
        self._seen = seen
        if moved:
            self._idle_ticks = 0
            return
        self._idle_ticks += 1
        if self._idle_ticks >= _TICKS:
            self._cut(sweep.why)


class _Sweep:
    """The pipes that share one timeout, and the one timer that ticks them all ``_TICKS`` times
    per timeout while any are watched."""

    __slots__ = ("_handle", "_stopped", "loop", "pipes", "tick", "why")

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float, why: str) -> None:
        self.loop = loop
        self.tick = timeout / _TICKS
        self.why = why
        #: A dict used as a set: about 30 bytes per entry where a set takes 100 at 5,000.
        self.pipes: dict[Pipe, None] = {}
        self._handle: asyncio.TimerHandle | None = None
        self._stopped = False

    def add(self, pipe: Pipe) -> None:
        self.pipes[pipe] = None
        if self._handle is None and not self._stopped:
            self._handle = self.loop.call_later(self.tick, self._run)

    def stop(self) -> None:
        self._stopped = True
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _run(self) -> None:
        self._handle = None
        for pipe in list(self.pipes):
            pipe._tick(self)
        if self.pipes:
            self._handle = self.loop.call_later(self.tick, self._run)


def accepted(relay: Relay, fd: int, family: int, address: object) -> Pipe:
    """The pipe of a client socket ``fd`` that accept() returned."""
    try:
        sock = _socket.socket(family, socket.SOCK_STREAM, 0, fd)
    except OSError:
        os.close(fd)
        raise
    try:  # TCP_NODELAY comes from the listening socket (Linux copies it to accepted ones)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return Pipe(relay, sock, address)
