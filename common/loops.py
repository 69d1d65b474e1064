"""The event loop a program runs on: uvloop when installed (or asked for), else asyncio's."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import platform
import socket
import struct
import threading
from collections.abc import Callable, Coroutine
from typing import Any

from common.env import ConfigError
from common.net import OUT_OF_RESOURCES, ListenError

LOOPS = ("auto", "uvloop", "asyncio")
#: Whether libuv may use io_uring (in the balancer, only for its epoll_ctl calls).
IO_URING = ("off", "on")

# A seccomp filter (classic BPF) that fails io_uring_setup with ENOSYS and allows everything else.
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_SECCOMP_SET_MODE_FILTER = 1
#: Keep speculative store bypass as it was: kernels 4.17 to 5.15 otherwise turn on the SSBD and
#: STIBP mitigations for a thread that installs a filter, and for the threads it starts.
_SECCOMP_FILTER_FLAG_SPEC_ALLOW = 4
_SECCOMP_RET_ALLOW = 0x7FFF0000
_SECCOMP_RET_ERRNO = 0x00050000
_BPF_LD_W_ABS = 0x20
_BPF_JEQ_K = 0x15
_BPF_RET_K = 0x06
#: io_uring_setup is 425 on both architectures the filter knows.
_NR_IO_URING_SETUP = 425
#: Per 64-bit architecture the filter knows: seccomp_data.arch, and the number of seccomp(2).
_ARCHES = {"x86_64": (0xC000003E, 317), "aarch64": (0xC00000B7, 277)}


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_char_p))


def refuse_io_uring() -> str | None:
    """Make ``io_uring_setup`` fail with ENOSYS in the calling thread and the threads it starts
    from now on, for good (a seccomp filter, and no new privileges, are per thread).

    libuv (under uvloop) then does each ``epoll_ctl`` as a plain system call instead of through an
    io_uring it submits one entry at a time and waits on, as it does in containers, whose default
    seccomp profiles refuse io_uring.  Measured on the balancer, interleaved: new connections/s
    x0.98 to x1.17 over eight runs (median x1.03); keep-alive unchanged within the noise.
    Call it before the loop exists, in the thread that creates it: libuv sets up its ring there.
    Nothing else is filtered.

    Returns None once the filter is in place, or why it could not be installed.
    """
    known = _ARCHES.get(platform.machine())
    # A 32-bit Python on a 64-bit kernel makes its calls under another ABI, which the filter
    # would let through: say so instead of installing a filter that does nothing.
    if known is None or os.uname().sysname != "Linux" or struct.calcsize("P") != 8:
        return (f"no seccomp filter for {platform.system()} {platform.machine()} "
                f"with {struct.calcsize('P') * 8}-bit Python")
    arch, nr_seccomp = known
    program = b"".join((
        struct.pack("HBBI", _BPF_LD_W_ABS, 0, 0, 4),  # seccomp_data.arch
        struct.pack("HBBI", _BPF_JEQ_K, 0, 3, arch),  # another ABI: allow
        struct.pack("HBBI", _BPF_LD_W_ABS, 0, 0, 0),  # seccomp_data.nr
        struct.pack("HBBI", _BPF_JEQ_K, 0, 1, _NR_IO_URING_SETUP),
        struct.pack("HBBI", _BPF_RET_K, 0, 0, _SECCOMP_RET_ERRNO | errno.ENOSYS),
        struct.pack("HBBI", _BPF_RET_K, 0, 0, _SECCOMP_RET_ALLOW),
    ))
    fprog = _SockFprog(len(program) // 8, program)
    libc = ctypes.CDLL(None, use_errno=True)
    prctl = libc.prctl
    prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong,
                      ctypes.c_ulong)
    # No new privileges is what lets a process without CAP_SYS_ADMIN install a filter.
    if prctl(_PR_SET_NO_NEW_PRIVS, 1, None, 0, 0) != 0:
        return f"seccomp filter refused: {os.strerror(ctypes.get_errno())}"
    seccomp = libc.syscall
    seccomp.argtypes = (ctypes.c_long, ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p)
    if seccomp(nr_seccomp, _SECCOMP_SET_MODE_FILTER, _SECCOMP_FILTER_FLAG_SPEC_ALLOW,
               ctypes.addressof(fprog)) == 0:
        return None
    # Before 4.17 the flag is unknown (EINVAL), and so is the speculation default it avoids.
    if prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0) != 0:
        return f"seccomp filter refused: {os.strerror(ctypes.get_errno())}"
    return None


class _AcceptBatch:
    """The listening socket for one wakeup of the default loop's accept step: after the first
    accept() that finds this process out of descriptors (or memory), the rest of the batch
    finds none waiting.

    CPython before gh-151615 goes on calling accept() after that error, up to ``backlog``
    times, and schedules a retry for each failure: the retries multiply every second until
    the loop spins. With this, one failure ends the batch and one retry is scheduled, as
    the fixed CPython does.
    """

    __slots__ = ("_exhausted", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._exhausted = False

    def accept(self) -> tuple[socket.socket, Any]:
        if self._exhausted:
            raise BlockingIOError(errno.EAGAIN, "the batch ended at the first resource error")
        try:
            return self.sock.accept()
        except OSError as exc:
            if exc.errno in OUT_OF_RESOURCES:
                self._exhausted = True
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


class SelectorEventLoop(asyncio.SelectorEventLoop):
    """asyncio's default loop, whose accept step does not multiply its retries when out of
    descriptors (see :class:`_AcceptBatch`)."""

    def _accept_connection(self, protocol_factory: Any, sock: Any, *args: Any,
                           **kwargs: Any) -> None:
        if isinstance(sock, _AcceptBatch):  # a retry passes back the wrapper it was given
            sock = sock.sock
        super()._accept_connection(  # type: ignore[misc]
            protocol_factory, _AcceptBatch(sock), *args, **kwargs)

    def _start_serving(self, protocol_factory: Any, sock: Any, *args: Any,
                       **kwargs: Any) -> None:
        if isinstance(sock, _AcceptBatch):
            sock = sock.sock
        if sock.fileno() == -1:
            return  # the retry of a listener closed meanwhile
        super()._start_serving(  # type: ignore[misc]
            protocol_factory, sock, *args, **kwargs)


def loop_factory(choice: str, *, variable: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """The factory for ``choice`` (one of :data:`LOOPS`); ``variable`` names the setting."""
    if choice in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise ConfigError(f"{variable}=uvloop but uvloop is not installed") from None
        else:
            return uvloop.new_event_loop
    return SelectorEventLoop


def loop_name(factory: Callable[[], asyncio.AbstractEventLoop]) -> str:
    return "uvloop" if factory.__module__.startswith("uvloop") else "asyncio"


def apply_io_uring(
    factory: Callable[[], asyncio.AbstractEventLoop], io_uring: str, *, variable: str,
    log: logging.Logger,
) -> Callable[[], asyncio.AbstractEventLoop]:
    """``factory`` as the ``io_uring`` setting wants it: with uvloop and ``off``, the loop is made
    in a short-lived thread that cannot set up an io_uring, so libuv keeps to plain epoll_ctl for
    the loop's whole life while the thread that runs it carries no seccomp filter at all (no cost
    per system call, no lasting no-new-privileges)."""
    if io_uring != "off" or loop_name(factory) != "uvloop":
        return factory

    def create() -> asyncio.AbstractEventLoop:
        made: list[asyncio.AbstractEventLoop] = []
        failed: list[BaseException] = []

        def in_thread() -> None:
            why = refuse_io_uring()
            if why is not None:
                log.warning("%s=off has no effect here (%s): libuv may use io_uring",
                            variable, why)
            try:
                made.append(factory())
            except BaseException as exc:  # raised again in the caller's thread
                failed.append(exc)

        thread = threading.Thread(target=in_thread, name="loop-without-io-uring")
        thread.start()
        thread.join()
        if failed:
            raise failed[0]
        return made[0]

    return create


def run(
    main: Coroutine[Any, Any, None],
    *,
    factory: Callable[[], asyncio.AbstractEventLoop],
    address: str,
    log: logging.Logger,
) -> int:
    """Run a server's ``main`` to its end on a new loop: exit status 0, or 1 (logged) when it
    cannot listen on ``address``."""
    with asyncio.Runner(loop_factory=factory) as runner:
        try:
            runner.run(main)
        except OSError as exc:
            log.error("cannot serve on %s: %s",
                      exc.address if isinstance(exc, ListenError) else address, exc)
            return 1
    return 0
