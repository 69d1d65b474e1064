"""``LB_IO_URING``: under uvloop the balancer keeps libuv on plain epoll_ctl unless told to."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest

from tests.lb.lbkit import EchoBackend, LbProcess, exchange

RING = "anon_inode:[io_uring]"


def io_uring_rings(pid: int) -> int:
    rings = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):  # closed while we looked
            rings += os.readlink(f"/proc/{pid}/fd/{fd}") == RING
    return rings


@functools.cache
def libuv_gets_io_uring_here() -> bool:
    """Whether a plain uvloop loop gets a ring on this kernel, in this sandbox."""
    probe = (f"import os, uvloop; uvloop.new_event_loop(); print(any(os.readlink("
             f"f'/proc/self/fd/{{f}}') == {RING!r} for f in os.listdir('/proc/self/fd') "
             f"if os.path.exists(f'/proc/self/fd/{{f}}')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    return out.strip() == "True"


def seccomp_filters_per_thread(pid: int) -> set[int]:
    counts = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/task/{tid}/status") as f:
            match = re.search(r"^Seccomp_filters:\s+(\d+)", f.read(), re.M)
            if match is None:
                pytest.skip("this kernel (before 5.9) does not count seccomp filters in /proc")
            counts.add(int(match.group(1)))
    return counts


def lb_env(port: int, **extra: str) -> dict[str, str]:
    return {"LB_HOST": "127.0.0.1", "LB_PORT": "0", "LB_BACKENDS": f"127.0.0.1:{port}",
            "SERVER_COUNT": "1", "LB_ADMIN_PORT": "0", "LB_CHECK_MODE": "tcp", **extra}


@contextlib.asynccontextmanager
async def proxying(**env: str) -> AsyncIterator[LbProcess]:
    """The balancer under ``env``, in front of an echo backend, checked to proxy and not to warn."""
    async with EchoBackend() as echo, LbProcess(lb_env(echo.port, **env)) as lb:
        assert await exchange(lb.port, b"ping") == b"ping"
        yield lb
        assert "has no effect" not in lb.output()


async def test_off_gives_libuv_no_ring_and_leaves_no_filter_behind() -> None:
    async with proxying(LB_LOOP="uvloop", LB_IO_URING="off") as lb:
        assert io_uring_rings(lb.pid) == 0
        # The filter lived only in the thread that made the loop; every thread left runs as
        # this test process does.
        assert seccomp_filters_per_thread(lb.pid) == seccomp_filters_per_thread(os.getpid())
    if not libuv_gets_io_uring_here():
        pytest.skip("no io_uring here for anyone: 'no ring' above proves nothing more")


async def test_on_leaves_libuv_its_ring() -> None:
    if not libuv_gets_io_uring_here():
        pytest.skip("this kernel (or its sandbox) gives no io_uring to anyone")
    async with proxying(LB_LOOP="uvloop", LB_IO_URING="on") as lb:
        assert io_uring_rings(lb.pid) == 1


async def test_the_asyncio_loop_is_left_alone() -> None:
    async with proxying(LB_LOOP="asyncio", LB_IO_URING="off") as lb:
        assert io_uring_rings(lb.pid) == 0
