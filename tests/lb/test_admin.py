"""The admin listener: /stats JSON, /metrics for Prometheus, the HTML page."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re

import pytest
from prometheus_client.parser import text_string_to_metric_families

import lb.admin
from chaos.system import free_port_run
from lb.admin import Admin
from tests.lb.lbkit import (
    HOST,
    EchoBackend,
    close,
    connect,
    connections,
    eventually,
    exchange,
    http_get,
    lb_config,
    refusing_addresses,
    running_lb,
)


async def test_stats_metrics_and_page() -> None:
    with refusing_addresses(1) as (dead,):
        async with EchoBackend() as echo, running_lb(
            lb_config(echo.address, dead, check_interval=60)
        ) as lb:
            admin = Admin(lb)
            await admin.start(HOST, 0)
            try:
                for i in range(4):
                    assert await exchange(lb.port, b"x" * (i + 1)) == b"x" * (i + 1)
                await eventually(lambda: not lb.pipes)

                status, headers, body = await http_get(admin.port, "/stats")
                assert status == 200
                assert headers["content-type"].startswith("application/json")
                stats = json.loads(body)
                live, gone = stats["backends"]
                assert live == {
                    "address": echo.label,
                    "state": "up",
                    "active_connections": 0,
                    "total_connections": 4,
                    "failed_connects": 0,
                    "bytes_to_backend": 10,
                    "bytes_to_client": 10,
                    "last_check": "connect ok",
                    "last_change": "discovered",
                }
                assert gone["state"] == "down"
                assert gone["failed_connects"] == 1
                assert stats["totals"]["total_connections"] == 4
                assert stats["totals"]["bytes_to_client"] == 10
                assert stats["totals"]["backends_up"] == 1

                status, headers, body = await http_get(admin.port, "/metrics")
                assert status == 200
                assert headers["content-type"].startswith("text/plain")
                samples = {
                    (s.name, tuple(sorted(s.labels.items()))): s.value
                    for family in text_string_to_metric_families(body.decode())
                    for s in family.samples
                }
                assert samples[("lb_backend_up", (("backend", echo.label),))] == 1.0
                assert samples[("lb_backend_up", (("backend", gone["address"]),))] == 0.0
                assert samples[("lb_backend_connections_total", (("backend", echo.label),))] == 4
                labels = (("backend", echo.label), ("direction", "to_client"))
                assert samples[("lb_backend_bytes_total", labels)] == 10
                assert samples[("lb_connections_active", ())] == 0

                status, headers, body = await http_get(admin.port, "/")
                assert status == 200
                assert headers["content-type"].startswith("text/html")
                page = body.decode()
                assert '<meta http-equiv="refresh"' in page
                assert echo.label in page
                assert gone["address"] in page
            finally:
                await admin.stop()


async def test_live_connection_counts_show_in_stats() -> None:
    async with EchoBackend() as echo, running_lb(lb_config(echo.address)) as lb:
        reader, writer = await connect(lb.port)
        writer.write(b"12345")
        await reader.readexactly(5)
        stats = lb.stats()
        assert stats["backends"][0]["active_connections"] == 1
        assert stats["backends"][0]["bytes_to_backend"] == 5
        assert stats["totals"]["active_connections"] == 1
        await close(writer)
        await eventually(lambda: lb.stats()["backends"][0]["active_connections"] == 0)
        assert lb.stats()["backends"][0]["bytes_to_backend"] == 5


async def test_clients_past_the_cap_show_as_waiting() -> None:
    """They wait in the listener's backlog, not accepted: the kernel's count of that queue is
    what /stats and /metrics give (a queue of accepted clients, as before, was always empty)."""
    async with EchoBackend() as echo, running_lb(
        lb_config(echo.address, max_connections=2)
    ) as lb:
        admin = Admin(lb)
        await admin.start(HOST, 0)
        try:
            async with connections(lb.port, 5) as clients:
                for reader, writer in clients[:2]:
                    writer.write(b"in")
                    assert await reader.readexactly(2) == b"in"
                # A connect returns once the kernel holds the connection: the backlog has 3.
                stats = lb.stats()["totals"]
                assert (stats["active_connections"], stats["waiting_connections"]) == (2, 3)
                _, _, body = await http_get(admin.port, "/metrics")
                samples = {s.name: s.value for family in
                           text_string_to_metric_families(body.decode()) for s in family.samples}
                assert samples["lb_connections_waiting"] == 3
                assert samples["lb_connections_active"] == 2
                _, _, page = await http_get(admin.port, "/")
                assert "2 connections open of 2,\n3 waiting" in page.decode()

                await close(clients[0][1])
                await eventually(lambda: lb.stats()["totals"]["waiting_connections"] == 2)
                for _, writer in clients[1:]:
                    await close(writer)
                # The last slots may free in the wakeup before the one that accepts the rest.
                await eventually(lambda: not lb.pipes and lb.waiting() == 0)
        finally:
            await admin.stop()


async def test_admin_listener_started_by_the_server() -> None:
    port = free_port_run(1)  # below the ephemeral range: not handed out meanwhile
    async with EchoBackend() as echo, running_lb(lb_config(echo.address, admin_port=port)) as lb:
        assert lb.admin_port == port
        status, _, body = await http_get(port, "/stats")
        assert status == 200
        assert json.loads(body)["backends"][0]["address"] == echo.label


def test_an_admin_port_in_use_is_named_as_the_admin_listener_s() -> None:
    import os
    import socket
    import subprocess
    import sys

    from tests.lb.lbkit import ROOT

    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen(1)
        admin_port = taken.getsockname()[1]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "LB_HOST": HOST, "LB_PORT": "0",
               "LB_BACKENDS": f"{HOST}:9", "LB_ADMIN_HOST": HOST,
               "LB_ADMIN_PORT": str(admin_port), "LB_CHECK_MODE": "tcp"}
        result = subprocess.run([sys.executable, "-m", "lb"], cwd=ROOT, env=env, text=True,
                                capture_output=True, timeout=30, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert (f"cannot serve on {HOST}:{admin_port} (the admin listener: LB_ADMIN_HOST, "
            "LB_ADMIN_PORT): [Errno 98] Address already in use") in result.stdout


async def test_connections_that_send_no_whole_request_are_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """aiohttp waits for a first request for ever: an admin connection sending nothing, or a
    header line now and then, is closed after ``REQUEST_TIMEOUT``; a prompt client is served,
    keep-alive included."""
    monkeypatch.setattr(lb.admin, "REQUEST_TIMEOUT", 0.5)
    async with EchoBackend() as echo, running_lb(lb_config(echo.address)) as lb_server:
        admin = Admin(lb_server)
        await admin.start(HOST, 0)
        try:
            silent_reader, silent_writer = await asyncio.open_connection(HOST, admin.port)
            slow_reader, slow_writer = await asyncio.open_connection(HOST, admin.port)
            slow_writer.write(b"GET /stats HTTP/1.1\r\n")

            async def trickle() -> None:
                with contextlib.suppress(ConnectionError):
                    for i in range(100):
                        slow_writer.write(b"X-Slow-%d: 1\r\n" % i)
                        await slow_writer.drain()
                        await asyncio.sleep(0.1)

            trickling = asyncio.create_task(trickle())
            reader, writer = await asyncio.open_connection(HOST, admin.port)
            for _ in range(2):  # keep-alive: two requests on one connection, each answered
                writer.write(b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n")
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                assert head.startswith(b"HTTP/1.1 200 ")
                length = int(re.search(rb"Content-Length: (\d+)", head, re.I).group(1))  # type: ignore[union-attr]
                await reader.readexactly(length)
            assert await asyncio.wait_for(silent_reader.read(), 5) == b""
            assert await asyncio.wait_for(slow_reader.read(), 5) == b""
            assert await asyncio.wait_for(reader.read(), 5) == b""  # idle after its answers
            trickling.cancel()
            for w in (silent_writer, slow_writer, writer):
                w.close()
        finally:
            await admin.stop()
