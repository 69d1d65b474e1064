"""One proxied connection: connect with failover, both directions, half-close, timeouts, close once.

The pipe works at the transport/protocol level: bytes a side delivers in ``data_received`` go
straight to the other side's ``transport.write``; when a side's write buffer passes its high-water
mark, its ``pause_writing`` pauses reading on the other side (backpressure both ways, memory bounded
by the buffer limits).  No task lives per connection: the connect step is a coroutine driven by the
futures it awaits (:class:`_Driven`), and the idle and half-close timeouts are two timers shared by
every pipe.

From its second chunk on, a direction is handed to the event loop (:class:`_HandedOff`): its
transport calls the other side's ``write`` itself, with no Python frame per chunk.  The byte
counts and the activity that the Python callbacks kept are then read from the kernel.

This module is the hot path: it imports the backend state and nothing from health, discovery or
admin code.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import fcntl
import logging
import socket
import struct
import sys
import termios
from collections.abc import Callable, Coroutine
from typing import Any, Final, cast

from common.logs import Throttled
from common.net import OUT_OF_RESOURCES, host_port
from lb.backends import Backend, BackendPool, describe_error

log = logging.getLogger("lb.pipe")

#: SO_LINGER on, zero seconds: close() sends RST, so a reset is carried across as a reset.
_LINGER_RESET: Final = struct.pack("ii", 1, 0)
#: A shared timeout timer ticks this many times per timeout: a connection is closed after between
#: 1 and 1 + 1/_TICKS timeouts of silence, and a chunk only sets a flag.
_TICKS: Final = 4
#: At most one log line per this many seconds about this process running out of resources.
_LOCAL_ERROR_LOG_INTERVAL: Final = 10.0
#: Linux counts the bytes of each TCP socket: struct tcp_info holds tcpi_bytes_acked (bytes the
#: peer acknowledged) and tcpi_bytes_received (bytes received in order), two u64 from byte 120
#: (kernel 4.2 on).  Without these counts no direction is handed to the event loop.
_KERNEL_COUNTS: Final = sys.platform.startswith("linux") and hasattr(socket, "TCP_INFO")
_TCP_INFO_BYTES: Final = struct.Struct("=QQ")
_TCP_INFO_BYTES_AT: Final = 120
_TCP_INFO_LENGTH: Final = _TCP_INFO_BYTES_AT + _TCP_INFO_BYTES.size
#: tcpi_bytes_received counts the peer's FIN as a byte. It has come in these states (tcpi_state,
#: byte 0: TIME_WAIT, CLOSE_WAIT, LAST_ACK, CLOSING), or once the EOF was read, as a socket
#: closed both ways reports CLOSE.
_FIN_RECEIVED_STATES: Final = frozenset({6, 8, 9, 11})
#: Taking a descriptor into a socket object of this type sets nothing on it (see _tcp_info).
_NONBLOCK: Final = getattr(socket, "SOCK_NONBLOCK", 0)
#: SIOCINQ (FIONREAD on a TCP socket): bytes received, not read yet.
_SIOCINQ: Final = termios.FIONREAD


class Relay:
    """What every pipe of one server shares: the backends, the limits, and the server's hooks."""

    __slots__ = (
        "buffer_size",
        "connect_retries",
        "connect_timeout",
        "debug",
        "half_close_sweep",
        "idle_sweep",
        "local_errors",
        "loop",
        "on_admit",
        "on_finish",
        "pool",
    )

    def __init__(
        self,
        pool: BackendPool,
        *,
        loop: asyncio.AbstractEventLoop,
        on_admit: Callable[[Pipe], bool],
        on_finish: Callable[[Pipe], None],
        connect_timeout: float = 3.0,
        connect_retries: int = 3,
        idle_timeout: float = 300.0,
        half_close_timeout: float = 30.0,
        buffer_size: int = 262144,
    ) -> None:
        self.pool = pool
        self.loop = loop
        #: Called when a client is accepted; False means "over the cap, wait for start()".
        self.on_admit = on_admit
        #: Called once when both sockets are closed and the connect step is over.
        self.on_finish = on_finish
        self.connect_timeout = connect_timeout
        self.connect_retries = connect_retries
        self.buffer_size = buffer_size
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

    def log_local_error(self, address: str, exc: OSError) -> None:
        """Out of descriptors or memory hits every client at once: one line per interval."""
        self.local_errors.log("cannot connect to %s: %s", address, exc)


class Pipe(asyncio.Protocol):
    """The client side of one proxied connection, and the state of the whole connection."""

    __slots__ = (
        "_active",
        "_client_full",
        "_closing",
        "_connect_expired",
        "_connector",
        "_done",
        "_idle_ticks",
        "_pending",
        "_redispatched",
        "_seen",
        "_sweep",
        "_upstream_full",
        "backend",
        "bytes_to_backend",
        "bytes_to_client",
        "client",
        "client_eof",
        "client_open",
        "end",
        "peer",
        "relay",
        "started",
        "upstream",
        "upstream_eof",
        "upstream_open",
    )

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.client: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        self.backend: Backend | None = None
        self.peer = "?"
        self.started = 0.0
        self.bytes_to_backend = 0
        self.bytes_to_client = 0
        self.client_eof = False
        self.upstream_eof = False
        self.client_open = False
        self.upstream_open = False
        #: Why the connection ended, for the log line (set once, by whoever ends it first).
        self.end = ""
        # Client bytes that arrive before the backend is connected (uvloop can deliver data
        # even after pause_reading() in connection_made).
        self._pending: list[bytes] | None = []
        self._connector: _Driven | None = None
        self._connect_expired = False
        self._sweep: _Sweep | None = None
        self._active = False
        self._idle_ticks = 0
        #: The kernel's byte counts at the last look (see _movement); None: not looked at yet.
        self._seen: int | None = None
        self._client_full = False
        self._upstream_full = False
        self._closing = False
        self._done = False
        self._redispatched = False

    # --- the client side (asyncio.Protocol) ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport
        self.client = transport
        self.client_open = True
        # Read from the client only once the backend exists: until then, its bytes have nowhere
        # to go and the kernel's buffer is the right place for them.
        transport.pause_reading()
        transport.set_write_buffer_limits(high=self.relay.buffer_size)
        if self.relay.debug:  # only the debug line uses these: no objects per connection
            self.started = self.relay.loop.time()
            self.peer = _address(transport)
        if self.relay.on_admit(self):
            self.start()

    def data_received(self, data: bytes) -> None:
        upstream = self.upstream
        if upstream is None:
            if self._pending is not None:
                self._pending.append(data)
                # uvloop starts reading after connection_made, whatever it asked: pause now,
                # or a client could push without limit while the connect is pending.
                self.client.pause_reading()  # type: ignore[union-attr]  # set in connection_made
            return
        if self.bytes_to_backend and _KERNEL_COUNTS:  # the second chunk: a stream
            self.client.set_protocol(  # type: ignore[union-attr]  # set in connection_made
                _HandedOff(upstream.write, self))
        self.bytes_to_backend += len(data)
        self._active = True
        try:
            upstream.write(data)
        except RuntimeError:  # uvloop: the handle closed before connection_lost arrived
            self._abort("backend reset", reset=True)

    def eof_received(self) -> bool:
        self.client_eof = True
        upstream = self.upstream
        if upstream is not None:
            self._half_closed(upstream, self.upstream_eof)
        # Keep the transport open: the other direction may still be flowing.
        return True

    def pause_writing(self) -> None:
        # The client reads slower than the backend writes: stop reading the backend.
        self._client_full = True
        if not (self.upstream_eof or self._closing) and self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        self._client_full = False
        if not (self.upstream_eof or self._closing) and self.upstream is not None:
            self.upstream.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.client_open = False
        if not self._closing:
            if self.upstream is None:
                self._abort("client left before a backend was connected", reset=False)
            elif exc is not None:
                self._abort("client reset", reset=True)
            else:
                self._close("client closed")
        self._maybe_done()

    # --- the connect step ---------------------------------------------------------------------

    def start(self) -> None:
        """Connect to a backend and start piping (the server calls this once a slot is free)."""
        if self._closing:
            self._maybe_done()
            return
        self._connector = _Driven(self.relay.loop, self._connect(), self._connect_ended)

    def _connect_ended(self, connector: _Driven) -> None:
        # A backend lost during the attach may have started the next connect step already.
        if self._connector is connector:
            self._connector = None
        self._maybe_done()

    async def _connect(self, failed: Backend | None = None) -> None:
        relay = self.relay
        pool = relay.pool
        tried: list[Backend] = [] if failed is None else [failed]
        timeouts_left = relay.connect_retries
        try:
            while not self._closing:
                backend = pool.choose(tried)
                if backend is None:
                    break
                tried.append(backend)
                # One timer handle, not an asyncio.timeout() context: its object, reschedule
                # and exit per connection were about 12% of the Python time py-spy saw on the
                # new-connection path.
                expiry = relay.loop.call_later(relay.connect_timeout, self._connect_timed_out)
                try:
                    transport, upstream = await relay.loop.create_connection(
                        _Upstream, backend.host, backend.port
                    )
                except (asyncio.CancelledError, TimeoutError) as exc:
                    if isinstance(exc, asyncio.CancelledError):
                        if not self._connect_expired:  # the pipe is closing: stop here
                            raise
                        self._connect_expired = False
                    pool.connect_failed(backend, "timeout")
                    if timeouts_left == 0:
                        break
                    timeouts_left -= 1
                    continue
                except OSError as exc:
                    if exc.errno in OUT_OF_RESOURCES:
                        relay.log_local_error(backend.address, exc)
                        break
                    pool.connect_failed(backend, describe_error(exc))
                    continue
                finally:
                    expiry.cancel()
                self._attached(backend, transport, upstream)
                return
            if not self._closing:
                self._abort("no backend accepted" if tried else "no backends", reset=False)
        except Exception:
            log.exception("connect step failed for client %s", _address(self.client))
            self._abort("internal error", reset=False)

    def _connect_timed_out(self) -> None:
        connector = self._connector
        # A pipe already closing cancelled its connect step: that is no timeout to blame on
        # the backend, even when this timer comes in the same loop round.
        if connector is not None and not connector.finished and not self._closing:
            self._connect_expired = True
            connector.cancel()

    def _attached(
        self, backend: Backend, transport: asyncio.Transport, upstream: _Upstream
    ) -> None:
        """The backend is connected: count it, send what the client already sent, start reading."""
        client = self.client
        assert client is not None
        self.backend = backend
        self.upstream = transport
        self.upstream_open = True
        backend.active += 1
        backend.total += 1
        transport.set_write_buffer_limits(high=self.relay.buffer_size)
        upstream.attach(self)
        if self._closing:  # defensive: the client left in the same loop step
            transport.abort()
            return
        if not self.upstream_open:  # the backend connected and went away at once
            return
        pending, self._pending = self._pending, None
        if pending:
            data = b"".join(pending)
            self.bytes_to_backend += len(data)
            transport.write(data)
        if self.closing:  # the write failed and ended the connection
            return
        self._arm_timer()
        if self.client_eof:
            self._half_closed(transport, self.upstream_eof)
        elif not self._upstream_full:
            client.resume_reading()

    # --- the backend side (called by _Upstream) -----------------------------------------------

    def upstream_eof_received(self) -> None:
        self.upstream_eof = True
        client = self.client
        assert client is not None
        self._half_closed(client, self.client_eof)

    def upstream_pause_writing(self) -> None:
        # The backend reads slower than the client writes: stop reading the client.
        self._upstream_full = True
        if not (self.client_eof or self._closing) and self.client is not None:
            self.client.pause_reading()

    def upstream_resume_writing(self) -> None:
        self._upstream_full = False
        if not (self.client_eof or self._closing or self._pending) and self.client is not None:
            self.client.resume_reading()

    def upstream_lost(self, exc: Exception | None) -> None:
        self.upstream_open = False
        backend = self.backend
        if backend is not None:
            backend.active -= 1
        if not self._closing:
            if exc is not None and self._unused() and backend is not None:
                self._redispatch(backend)
            elif exc is not None:
                self._abort("backend reset", reset=True)
            else:
                self._close("backend closed")
        self._maybe_done()

    def _unused(self) -> bool:
        """Nothing has passed in either direction yet (so the backend saw nothing of the
        client's), and the connection has not been moved once already."""
        return (self.bytes_to_backend == 0 and self.bytes_to_client == 0
                and not self.upstream_eof and self.client_open and not self._redispatched)

    def _redispatch(self, backend: Backend) -> None:
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
        backend.resets_unused += 1
        pool = self.relay.pool
        if backend.resets_unused >= pool.fall:
            pool.connect_failed(
                backend, f"{backend.resets_unused} connections in a row reset before any byte")
        self.upstream = None
        self._pending = []  # what the client sends meanwhile waits for the next backend
        self._upstream_full = False
        self._cancel_timer()
        if not self.client_eof:
            self.client.pause_reading()  # type: ignore[union-attr]  # set before any attach
        self._connector = _Driven(self.relay.loop, self._connect(backend), self._connect_ended)

    # --- endings ------------------------------------------------------------------------------

    def _half_closed(self, towards: asyncio.Transport, other_direction_ended: bool) -> None:
        """One direction ended: pass the EOF on; when both have, the connection is done."""
        if other_direction_ended:
            self._close("done")
            return
        try:
            towards.write_eof()
        except (RuntimeError, OSError):
            self._abort("reset during half-close", reset=True)
            return
        self._arm_timer()

    def _close(self, why: str) -> None:
        """Close both sides once their buffered bytes are written. A peer that takes none of
        them would hold the connection (and its slot) for ever: the half-close timeout, the
        drain deadline and a second signal still end it (see :meth:`_cut`)."""
        unsent = False
        for transport in self._ending(why):
            unsent = unsent or transport.get_write_buffer_size() > 0
            transport.close()
        if unsent:
            self._watch(self.relay.half_close_sweep)

    def _abort(self, why: str, *, reset: bool) -> None:
        """Close both sides now, dropping buffered bytes; with ``reset``, peers get an RST."""
        for transport in self._ending(why):
            self._drop(transport, reset=reset)

    def _drop(self, transport: asyncio.Transport, *, reset: bool) -> None:
        if transport is self.client:  # the count is of bytes that left, not of dropped ones
            self.bytes_to_client -= transport.get_write_buffer_size()
        else:
            self.bytes_to_backend -= transport.get_write_buffer_size()
        if reset:
            _linger_reset(transport)
        transport.abort()

    def _cut(self, why: str) -> None:
        """The balancer ends the connection on its own (a timeout, the drain deadline). A FIN
        would tell each peer that the other's stream ended there, so when bytes are in flight
        (held in a buffer here, held back from a peer that does not read, or moving since the
        last tick or :meth:`forget_activity`) the peers get an RST: a cut-short answer never
        looks whole. A quiet connection is closed."""
        if self._closing:
            if self._sweep is None:  # aborted already, or closing with nothing left to write
                return
            # Closed already, waiting for a peer to take its last bytes: it gets an RST
            # instead of them (its side of the stream is cut short).
            self.end = f"{why} while closing"
            self._cancel_timer()
            for transport, still_open in ((self.client, self.client_open),
                                          (self.upstream, self.upstream_open)):
                if transport is not None and still_open:
                    self._drop(transport, reset=transport.get_write_buffer_size() > 0)
            return
        in_flight = (
            self._active or self._client_full or self._upstream_full
            or any(t.get_write_buffer_size() for t in (self.client, self.upstream) if t is not None)
            or (self._seen is not None and self._movement() != self._seen))
        self._abort(why, reset=in_flight)

    def _ending(self, why: str) -> tuple[asyncio.Transport, ...]:
        """Mark the connection as ending (once: later calls get nothing to close), stop its
        timer and its connect step; the open transports, for the caller to close."""
        if self._closing:
            return ()
        self._closing = True
        self.end = why
        self._count_handed_off()  # before the sockets close
        self._cancel_timer()
        if self._connector is not None:
            self._connector.cancel()
        return tuple(t for t in (self.client, self.upstream) if t is not None)

    @property
    def closing(self) -> bool:
        return self._closing

    def shutdown(self, why: str) -> None:
        """The server is stopping and cannot wait any longer for this connection."""
        self._cut(why)

    def forget_activity(self) -> None:
        """Start a new look at whether bytes move, which :meth:`shutdown` then asks."""
        self._active = False
        self._seen = self._movement()

    def _count_handed_off(self) -> None:
        """A handed-off direction passed on every byte read from its socket, and the kernel
        counts those: bytes received, less those not read yet."""
        client, upstream = self.client, self.upstream
        if client is not None and isinstance(client.get_protocol(), _HandedOff):
            read = _bytes_read(client, eof_read=self.client_eof)
            if read is not None:
                self.bytes_to_backend = read
        if upstream is not None and isinstance(upstream.get_protocol(), _HandedOff):
            read = _bytes_read(upstream, eof_read=self.upstream_eof)
            if read is not None:
                self.bytes_to_client = read

    def _movement(self, *, count: bool = False) -> int:
        """A number that changes whenever bytes move through either socket: on Linux, the
        kernel's bytes received plus bytes acknowledged by the peer; elsewhere (where nothing
        is handed off), minus what waits in the write buffers, which shrink as peers take bytes.

        With ``count``, the same look brings the counts of handed-off directions up to date
        (bytes not read yet count as read: one system call fewer, for a tick's estimate)."""
        moved = 0
        for transport, eof_read in ((self.client, self.client_eof),
                                    (self.upstream, self.upstream_eof)):
            if transport is None:
                continue
            info = _tcp_info(_fileno(transport)) if _KERNEL_COUNTS else None
            if info is None:
                moved -= transport.get_write_buffer_size()
                continue
            moved += info[1] + info[2]
            if count and isinstance(transport.get_protocol(), _HandedOff):
                read = _received(info, eof_read=eof_read)
                if transport is self.client:
                    self.bytes_to_backend = read
                else:
                    self.bytes_to_client = read
        return moved

    def _maybe_done(self) -> None:
        if self._done or self.client_open or self.upstream_open or self._connector is not None:
            return
        self._done = True
        self._pending = None
        self._cancel_timer()
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
        self._watch(
            relay.half_close_sweep if self.client_eof or self.upstream_eof else relay.idle_sweep)

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

        Activity is a chunk that passed through Python (a flag, nothing more per chunk) or
        bytes the kernel counted since the last tick: received on either socket (a handed-off
        direction's chunks), or acknowledged by a peer. So a slow reader draining the buffers
        counts as traffic, while one that takes nothing, its buffers full, is still silence."""
        if self._closing and not (self.client_open or self.upstream_open):
            self._cancel_timer()
            return
        # (A closing pipe in a sweep is one still writing its last bytes out.)
        # What the stats show of a handed-off direction while it is open: the count at the
        # last tick (a stats page asking the kernel for every connection would stall the loop).
        seen = self._movement(count=not self._closing)  # closing: the counts are final
        moved = self._active or seen != self._seen
        self._active = False
        self._seen = seen
        if moved:
            self._idle_ticks = 0
            return
        self._idle_ticks += 1
        if self._idle_ticks >= _TICKS:
            self._cut(sweep.why)


class _Driven:
    """A coroutine run without a Task: each future it awaits resumes it from its done callback.

    Per connection, a Task's registry entry (a WeakSet, in Python) and bookkeeping were about a
    tenth of the balancer's user time on the new-connection path. This keeps what the connect
    step needs of a Task: the first step runs from the loop (never inside the caller), and
    :meth:`cancel` cancels the awaited future, or throws CancelledError in at the next step when
    there is none. The coroutine awaits asyncio futures only (as ``loop.create_connection``
    does) and catches its own exceptions; ``on_end`` is called once it ends.
    """

    __slots__ = ("_cancelling", "_coro", "_loop", "_on_end", "_waiting", "finished")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        coro: Coroutine[Any, Any, None],
        on_end: Callable[[_Driven], None],
    ) -> None:
        self._loop = loop
        self._coro = coro
        self._on_end = on_end
        self._waiting: asyncio.Future[Any] | None = None
        self._cancelling = False
        self.finished = False
        loop.call_soon(self._step)

    def cancel(self) -> None:
        if self.finished:
            return
        waiting, self._waiting = self._waiting, None
        # A future already done (its callback not run yet) cannot be cancelled: throw instead.
        if waiting is None or not waiting.cancel():
            self._cancelling = True

    def _step(self, _: object = None) -> None:
        self._waiting = None
        try:
            if self._cancelling:
                self._cancelling = False
                awaited = self._coro.throw(asyncio.CancelledError())
            else:
                awaited = self._coro.send(None)
        except BaseException as exc:
            self.finished = True
            self._on_end(self)
            if not isinstance(exc, (StopIteration, asyncio.CancelledError)):
                raise
            return
        if awaited is None:  # a bare yield (asyncio.sleep(0)): the next step comes next round
            self._loop.call_soon(self._step)
            return
        awaited._asyncio_future_blocking = False
        if self._cancelling:  # cancelled while it ran: the future it now awaits is cancelled
            self._cancelling = False
            awaited.cancel()
        self._waiting = awaited
        awaited.add_done_callback(self._step)


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


class _Upstream(asyncio.Protocol):
    """The backend side of a pipe: forwards everything to its :class:`Pipe` once attached.

    Until the connect step attaches it, what the backend does is only recorded: a backend that
    speaks first may send bytes before ``create_connection`` returns.
    """

    __slots__ = ("_early", "_eof", "_lost", "_lost_exc", "_pipe")

    def __init__(self) -> None:
        self._pipe: Pipe | None = None
        #: What the backend sent before the pipe attached (None once attached).
        self._early: list[bytes] | None = []
        self._eof = False
        self._lost = False
        self._lost_exc: Exception | None = None

    def attach(self, pipe: Pipe) -> None:
        self._pipe = pipe
        early, self._early = self._early, None
        for data in early or ():
            self.data_received(data)
        if self._eof:
            pipe.upstream_eof_received()
        if self._lost:
            pipe.upstream_lost(self._lost_exc)

    def data_received(self, data: bytes) -> None:
        pipe = self._pipe
        if pipe is None:
            self._early.append(data)  # type: ignore[union-attr]  # None only once attached
            return
        client = pipe.client
        if pipe.bytes_to_client and _KERNEL_COUNTS:  # the second chunk: a stream
            pipe.upstream.set_protocol(  # type: ignore[union-attr]  # set before attaching
                _HandedOff(client.write, self))  # type: ignore[union-attr]
        pipe.bytes_to_client += len(data)
        pipe._active = True
        try:
            client.write(data)  # type: ignore[union-attr]  # set before any attach
        except RuntimeError:  # uvloop: the handle closed before connection_lost arrived
            pipe._abort("client reset", reset=True)

    def eof_received(self) -> bool:
        if self._pipe is None:
            self._eof = True
        else:
            self._pipe.upstream_eof_received()
        return True

    def pause_writing(self) -> None:
        if self._pipe is not None:
            self._pipe.upstream_pause_writing()

    def resume_writing(self) -> None:
        if self._pipe is not None:
            self._pipe.upstream_resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._pipe is None:
            self._lost = True
            self._lost_exc = exc
        else:
            self._pipe.upstream_lost(exc)


class _HandedOff(asyncio.Protocol):
    """One direction of a pipe, handed to the event loop: its transport calls the other side's
    ``write`` with each chunk itself (a C call under uvloop), and passes every other event on
    to the protocol it replaced.

    A direction is handed off at its second chunk, so a connection carrying one request and
    one answer never pays for the switch. The target's ``write`` never raises here: a target
    that is closing drops the bytes, its EOF follows only the source's own EOF, and its handle
    closes only after its ``connection_lost``, which closes this transport too.
    """

    __slots__ = ("data_received", "protocol")

    data_received: Callable[[bytes], None]  # type: ignore[assignment]  # a slot: any callable

    def __init__(self, write: Callable[[bytes], None], protocol: asyncio.Protocol) -> None:
        self.data_received = write
        self.protocol = protocol

    def eof_received(self) -> bool | None:
        return self.protocol.eof_received()

    def pause_writing(self) -> None:
        self.protocol.pause_writing()

    def resume_writing(self) -> None:
        self.protocol.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.protocol.connection_lost(exc)


def _fileno(transport: asyncio.BaseTransport) -> int:
    """The descriptor of ``transport``'s socket (-1 once closed)."""
    sock = transport.get_extra_info("socket")
    return sock.fileno() if sock is not None else -1


def _tcp_info(fd: int) -> tuple[int, int, int] | None:
    """The kernel's (state, bytes acknowledged by the peer, bytes received) of a TCP socket;
    both counts take the SYN and FIN for a byte each."""
    if fd < 0:
        return None
    # A stats page asks this of every connection: socket.socket(fileno=...) would run a Python
    # __init__ (about 1.5 us, more than the system call); its C base class takes the descriptor
    # as it is, and detach() hands it back unclosed.
    sock = _socket.socket(socket.AF_INET, socket.SOCK_STREAM | _NONBLOCK, 0, fd)
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LENGTH)
    except OSError:  # closed meanwhile
        return None
    finally:
        sock.detach()
    if len(info) < _TCP_INFO_LENGTH:  # a kernel older than 4.2
        return None
    acked, received = _TCP_INFO_BYTES.unpack_from(info, _TCP_INFO_BYTES_AT)
    return info[0], acked, received


def _received(info: tuple[int, int, int], *, eof_read: bool) -> int:
    """Bytes received on a socket, from its ``_tcp_info``: less the peer's FIN, once it came."""
    state, _, received = info
    return received - (1 if eof_read or state in _FIN_RECEIVED_STATES else 0)


def _bytes_read(transport: asyncio.BaseTransport, *, eof_read: bool) -> int | None:
    """Bytes this process has read from ``transport``'s socket: received, less the FIN and
    what waits unread."""
    fd = _fileno(transport)
    info = _tcp_info(fd)
    if info is None:
        return None
    try:
        unread = struct.unpack("i", fcntl.ioctl(fd, _SIOCINQ, b"\0" * 4))[0]
    except OSError:
        return None
    return int(_received(info, eof_read=eof_read) - unread)


def _linger_reset(transport: asyncio.Transport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError, ValueError):  # already closed: nothing left to reset
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


def _address(transport: asyncio.BaseTransport | None) -> str:
    peer = transport.get_extra_info("peername") if transport is not None else None
    return host_port(peer[0], peer[1]) if isinstance(peer, tuple) else "?"
