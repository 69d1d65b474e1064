"""The real process: SIGTERM/SIGINT/SIGHUP drain in-flight requests, then exit; logs never show
the password; a bad setting stops the start with the variable's name."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from typing import Any

import aiohttp
import asyncpg
import pytest

from stack.pg import free_port
from tests.services.conftest import ROOT, service_process
from tests.services.test_database_faults import wait_for_lock_waiter


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
async def test_signal_lets_the_request_in_flight_finish(
    postgres: Any, clean_db: asyncpg.Connection, sig: signal.Signals
) -> None:
    await clean_db.execute("INSERT INTO public.variables VALUES ('k', 'v')")
    port = free_port()
    async with service_process(postgres.env, port) as service, aiohttp.ClientSession() as http:
        async with http.get(f"{service.url}/healthcheck") as r:
            assert r.status == 200
        await clean_db.execute("BEGIN; LOCK TABLE public.variables IN ACCESS EXCLUSIVE MODE")
        in_flight = asyncio.ensure_future(
            http.put(f"{service.url}/edit_var", json={"key": "k", "value": "w"})
        )
        await wait_for_lock_waiter(clean_db)
        service.signal(sig)
        # It stops accepting at once...
        async with asyncio.timeout(10):
            while True:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                except ConnectionRefusedError:
                    break
                except ConnectionResetError:
                    # Queued in the backlog as the listener closed: stopping, not yet refused.
                    continue
                writer.close()
                with contextlib.suppress(ConnectionResetError):
                    await writer.wait_closed()
                await asyncio.sleep(0.02)
        assert service.proc.returncode is None
        # ...and the request it holds still completes once the database lets it.
        await clean_db.execute("ROLLBACK")
        response = await in_flight
        assert (response.status, await response.text()) == (200, "variable edited")
        response.release()
        assert await service.wait() == 0
    assert await clean_db.fetchval("SELECT value FROM public.variables WHERE key='k'") == "w"
    log = "\n".join(service.output)
    assert f"{sig.name} received" in log
    assert "stopped" in log


async def test_a_request_that_never_ends_is_cut_at_the_shutdown_deadline(
    postgres: Any, clean_db: asyncpg.Connection
) -> None:
    await clean_db.execute("INSERT INTO public.variables VALUES ('k', 'v')")
    env = {**postgres.env, "SERVICE_SHUTDOWN_TIMEOUT": "0.5", "SERVICE_DB_COMMAND_TIMEOUT": "60"}
    async with service_process(env, free_port()) as service, aiohttp.ClientSession() as http:
        await clean_db.execute("BEGIN; LOCK TABLE public.variables IN ACCESS EXCLUSIVE MODE")
        in_flight = asyncio.ensure_future(http.get(f"{service.url}/get_var?key=k"))
        await wait_for_lock_waiter(clean_db)
        service.signal(signal.SIGTERM)
        assert await service.wait(timeout=15) == 0
        with pytest.raises(aiohttp.ClientError):
            await in_flight
        await clean_db.execute("ROLLBACK")


async def test_second_signal_exits_at_once(
    postgres: Any, clean_db: asyncpg.Connection
) -> None:
    await clean_db.execute("INSERT INTO public.variables VALUES ('k', 'v')")
    env = {**postgres.env, "SERVICE_SHUTDOWN_TIMEOUT": "60", "SERVICE_DB_COMMAND_TIMEOUT": "60"}
    async with service_process(env, free_port()) as service, aiohttp.ClientSession() as http:
        await clean_db.execute("BEGIN; LOCK TABLE public.variables IN ACCESS EXCLUSIVE MODE")
        in_flight = asyncio.ensure_future(http.get(f"{service.url}/get_var?key=k"))
        await wait_for_lock_waiter(clean_db)
        service.signal(signal.SIGTERM)
        await wait_for_line(service.output, "shutting down")
        service.signal(signal.SIGTERM)
        assert await service.wait(timeout=10) == 1
        with pytest.raises(aiohttp.ClientError):
            await in_flight
        await clean_db.execute("ROLLBACK")


async def test_a_body_still_arriving_at_the_signal_is_read_and_answered(
    postgres: Any, clean_db: asyncpg.Connection
) -> None:
    """A request whose head came before the signal is in flight: the rest of its body, sent
    during the drain, is read (aiohttp dropped it, and the client waited for the deadline)."""
    body = b'{"key": "late", "value": "body"}'
    port = free_port()
    async with service_process(postgres.env, port) as service:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"POST /set_var HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body[:10])
            await writer.drain()
            # A round trip through the server: by its end, the head above is read.
            async with aiohttp.ClientSession() as http, http.get(
                f"http://127.0.0.1:{port}/healthcheck"
            ) as r:
                assert r.status == 200
            service.signal(signal.SIGTERM)
            await wait_for_line(service.output, "shutting down")
            writer.write(body[10:])
            async with asyncio.timeout(10):
                status_line = await reader.readline()
                rest = await reader.read()
        finally:
            writer.close()
        assert status_line.startswith(b"HTTP/1.1 201"), status_line + rest
        assert await service.wait() == 0
    assert await clean_db.fetchval("SELECT value FROM public.variables WHERE key='late'") == "body"


async def test_under_nohup_a_hangup_does_not_stop_it(
    postgres: Any, clean_db: asyncpg.Connection
) -> None:
    async with service_process(postgres.env, free_port(), prefix=["nohup"]) as service, \
            aiohttp.ClientSession() as http:
        service.signal(signal.SIGHUP)
        async with http.get(f"{service.url}/healthcheck") as r:
            assert r.status == 200
        service.signal(signal.SIGTERM)
        assert await service.wait() == 0
    log = "\n".join(service.output)
    assert "SIGHUP" not in log
    assert "SIGTERM received" in log


async def wait_for_line(output: list[str], text: str, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while not any(text in line for line in output):
            await asyncio.sleep(0.02)


async def test_draining_replica_fails_its_healthcheck(postgres: Any, clean_db: Any) -> None:
    from tests.services.conftest import config_for, run_service

    async with run_service(config_for(postgres)) as service, aiohttp.ClientSession() as http:
        service.server.lifecycle.draining = True
        async with http.get(f"{service.url}/healthcheck") as r:
            assert (r.status, await r.text()) == (503, "server is draining")


async def test_logs_show_requests_but_never_the_password(
    postgres: Any, clean_db: asyncpg.Connection
) -> None:
    assert postgres.password, "the test database must have a password to hide"
    async with service_process(postgres.env, free_port()) as service, \
            aiohttp.ClientSession() as http:
        async with http.get(f"{service.url}/get_var?key=nothing") as r:
            assert r.status == 404
        service.signal(signal.SIGTERM)
        assert await service.wait() == 0
    log = "\n".join(service.output)
    assert '"GET /get_var?key=nothing" 404' in log
    assert postgres.password not in log.replace("PGSQL_PASSWORD", "")
    assert "'pg_password': '***'" in log


async def test_access_log_at_debug_is_hidden_at_info(
    postgres: Any, clean_db: asyncpg.Connection
) -> None:
    env = {**postgres.env, "SERVICE_ACCESS_LOG": "debug"}
    async with service_process(env, free_port()) as service, aiohttp.ClientSession() as http:
        async with http.get(f"{service.url}/get_var?key=nothing") as r:
            assert r.status == 404
        service.signal(signal.SIGTERM)
        assert await service.wait() == 0
    assert not any("/get_var" in line for line in service.output)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SERVICE_PORT": "http"}, "SERVICE_PORT must be a whole number, got 'http'"),
        ({"SERVICE_PORT": "70000"}, "SERVICE_PORT must be between 0 and 65535"),
        ({"PGSQL_PORT": "0"}, "PGSQL_PORT must be between 1 and 65535"),
        ({"SERVICE_POOL_ACQUIRE_TIMEOUT": "soon"}, "SERVICE_POOL_ACQUIRE_TIMEOUT must be a number"),
        ({"SERVICE_DB_COMMAND_TIMEOUT": "nan"}, "SERVICE_DB_COMMAND_TIMEOUT must be between"),
        ({"SERVICE_LOG_LEVEL": "loud"}, "SERVICE_LOG_LEVEL must be one of debug, info"),
        ({"SERVICE_LOOP": "trio"}, "SERVICE_LOOP must be one of auto, uvloop, asyncio"),
        ({"PGSQL_HOST": "  "}, "PGSQL_HOST must not be empty"),
        ({"SERVICE_POOL_MIN_SIZE": "5", "SERVICE_POOL_MAX_SIZE": "2"},
         "SERVICE_POOL_MIN_SIZE must not exceed SERVICE_POOL_MAX_SIZE"),
    ],
)
def test_bad_setting_stops_the_start_naming_the_variable(
    env: dict[str, str], message: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "services"],
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_port_in_use_is_a_clear_error(postgres: Any) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "services", "--host", "127.0.0.1", "--port", str(port)],
            env={**os.environ, "PYTHONPATH": str(ROOT), **postgres.env},
            capture_output=True, text=True, timeout=30, check=False,
        )
    assert result.returncode == 1
    assert (f"cannot serve on 127.0.0.1:{port} (SERVICE_HOST, SERVICE_PORT): "
            "[Errno 98] Address already in use") in result.stdout
