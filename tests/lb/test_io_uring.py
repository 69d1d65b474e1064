"""``LB_IO_URING``: under uvloop the balancer keeps libuv on plain epoll_ctl unless told to."""

from __future__ import annotations

import contextlib
import os
import re

import pytest

from tests.lb.lbkit import EchoBackend, LbProcess, exchange


def io_uring_rings(pid: int) -> int:
    rings = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):  # closed while we looked
            rings += os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[io_uring]"
    return rings


def seccomp_filters(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        match = re.search(r"^Seccomp_filters:\s+(\d+)", status.read(), re.M)
    if match is None:
        pytest.skip("this kernel (before 5.9) does not count seccomp filters in /proc")
    return int(match.group(1))


def lb_env(port: int, **extra: str) -> dict[str, str]:
    return {"LB_HOST": "127.0.0.1", "LB_PORT": "0", "LB_BACKENDS": f"127.0.0.1:{port}",
            "SERVER_COUNT": "1", "LB_ADMIN_PORT": "0", "LB_CHECK_MODE": "tcp", **extra}


async def test_by_default_uvloop_gets_no_io_uring_and_proxies_as_usual() -> None:
    async with EchoBackend() as echo, LbProcess(
        lb_env(echo.port, LB_LOOP="uvloop", LB_IO_URING="off")
    ) as lb:
        assert await exchange(lb.port, b"ping") == b"ping"
        # The filter count is the proof; no ring also holds where io_uring is refused anyway.
        assert seccomp_filters(lb.pid) == seccomp_filters(os.getpid()) + 1
        assert io_uring_rings(lb.pid) == 0
        assert "has no effect" not in lb.output()


async def test_on_leaves_libuv_its_io_uring() -> None:
    async with EchoBackend() as echo, LbProcess(
        lb_env(echo.port, LB_LOOP="uvloop", LB_IO_URING="on")
    ) as lb:
        assert await exchange(lb.port, b"ping") == b"ping"
        assert seccomp_filters(lb.pid) == seccomp_filters(os.getpid())
        if io_uring_rings(lb.pid) == 0:
            pytest.skip("this kernel (or its sandbox) gives no io_uring to anyone")


async def test_the_asyncio_loop_is_left_alone() -> None:
    async with EchoBackend() as echo, LbProcess(
        lb_env(echo.port, LB_LOOP="asyncio", LB_IO_URING="off")
    ) as lb:
        assert await exchange(lb.port, b"ping") == b"ping"
        assert seccomp_filters(lb.pid) == seccomp_filters(os.getpid())
