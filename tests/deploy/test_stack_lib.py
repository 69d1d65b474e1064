"""The supervisor's pieces: its config, the restart policy, and ``Stack`` as a library."""

from __future__ import annotations

import asyncio
import errno
import http.client
import io
import os
import random
import signal
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import lb.config
from stack.config import ENV_VARS, SETTINGS, ConfigError, StackConfig
from stack.pg import EmbeddedPostgres, EmbeddedPostgresError, _bin_dir, _let_traverse, free_port
from stack.process import Output, RestartPolicy
from stack.supervisor import Stack, StackError, database_connections, http_status, port_in_use


def test_defaults_are_compose_yaml_s() -> None:
    config = StackConfig.from_env({})
    assert (config.server_count, config.lb_host, config.lb_port) == (3, "0.0.0.0", 3000)
    assert (config.lb_admin_host, config.lb_admin_port) == ("127.0.0.1", 8404)
    assert config.embedded
    assert config.pg_dbname == "se_lab6"
    assert config.pg_user == "postgres"
    assert config.replica_ports == [5001, 5002, 5003]
    assert config.client_host == "127.0.0.1"
    # The documented defaults are the real ones.
    documented = {s.attr: s.default for s in SETTINGS}
    assert str(config.server_count) == documented["server_count"]
    assert str(config.lb_port) == documented["lb_port"]
    assert len(ENV_VARS) == len(set(ENV_VARS))


def test_pgsql_host_selects_an_external_database() -> None:
    config = StackConfig.from_env({"PGSQL_HOST": "db.internal", "PGSQL_PASSWORD": " pw "})
    assert not config.embedded
    assert config.pg_password == " pw "  # a password is taken as written
    assert "pw" not in repr(config)
    assert config.redacted()["pg_password"] == "***"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SERVER_COUNT": "0"}, "SERVER_COUNT must be between 1 and 200"),
        ({"LB_PORT": "http"}, "LB_PORT must be a whole number"),
        ({"LB_PORT": "5002"}, "LB_PORT 5002 collides with the replicas' ports 5001-5003"),
        ({"LB_ADMIN_PORT": "3000"}, "LB_ADMIN_PORT must differ from LB_PORT"),
        ({"STACK_BACKEND_PORT": "65535"}, "leaves no room for 3 replicas"),
        ({"STACK_RESTART_DELAY": "-1"}, "STACK_RESTART_DELAY must be between"),
        ({"STACK_PG_PORT": "3000"}, "STACK_PG_PORT must differ from LB_PORT"),
        ({"STACK_PG_PORT": "8404"}, "STACK_PG_PORT must differ from LB_ADMIN_PORT"),
        ({"STACK_PG_PORT": "5003"}, "STACK_PG_PORT 5003 collides with the replicas' ports"),
        ({"LB_HOST": "a..b"}, "LB_HOST 'a..b' is not a valid host name"),
        ({"LB_ADMIN_HOST": "a..b"}, "LB_ADMIN_HOST 'a..b' is not a valid host name"),
        ({"STACK_BACKEND_HOST": "a..b"}, "STACK_BACKEND_HOST 'a..b' is not a valid host name"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        StackConfig.from_env(env)


def test_restart_policy_is_at_most_three_in_the_window() -> None:
    policy = RestartPolicy(max_attempts=3, window=120.0, delay=5.0)
    assert [policy.allow(t) for t in (0.0, 1.0, 2.0, 3.0)] == [True, True, True, False]
    assert not policy.allow(119.0)
    assert policy.allow(120.5)  # the first attempt has left the window
    assert not policy.allow(120.9)  # 1.0, 2.0 and 120.5 are in it


async def test_stack_as_a_library_restarts_a_killed_replica(tmp_path: Path) -> None:
    backend = random.randrange(20000, 32000)  # below the ephemeral range (see test_stack)
    if port_in_use("127.0.0.1", backend):
        pytest.skip(f"port {backend} is taken")
    config = StackConfig.from_env(
        {"SERVICE_ACCESS_LOG": "off", "SERVICE_POOL_MAX_SIZE": "300"},
        server_count=1,
        lb_host="127.0.0.1",
        lb_port=free_port(),
        lb_admin_port=0,
        backend_port=backend,
        data_dir=tmp_path / "data",
        restart_delay=0.2,
    )
    out = io.StringIO()
    async with Stack(config, output=Output(out)) as stack:
        assert stack.ready
        assert stack.admin_url is None
        assert await http_status("127.0.0.1", config.lb_port, "/healthcheck") == 200
        # Sized for every replica's whole pool (it was 200 whatever the pools).
        assert stack.database is not None
        conn = await asyncpg.connect(stack.database.dsn)
        try:
            assert await conn.fetchval("SHOW max_connections") == "320"
        finally:
            await conn.close()
        replica = stack.replicas[0]
        first_pid = replica.pid
        replica.kill()
        async with asyncio.timeout(20):
            while replica.restarts < 1 or not replica.running:
                await asyncio.sleep(0.1)
            while await http_status("127.0.0.1", config.lb_port, "/healthcheck") != 200:
                await asyncio.sleep(0.2)
        assert replica.pid != first_pid
        assert replica.exit_codes == [-9]
    assert not stack.ready
    assert not replica.running
    assert not stack.balancer.running
    assert stack.database is not None
    assert not stack.database.running
    assert not port_in_use("127.0.0.1", config.lb_port)
    assert "backend-1    | was killed by SIGKILL; restarting in 0.2s" in out.getvalue()


# -- the programs' settings, checked up front ------------------------------------------------


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SERVICE_POOL_MAX_SIZE": "0"}, "SERVICE_POOL_MAX_SIZE must be between 1 and 1000"),
        ({"SERVICE_POOL_MIN_SIZE": "20"}, "SERVICE_POOL_MIN_SIZE must not exceed"),
        ({"SERVICE_LOG_LEVEL": "loud"}, "SERVICE_LOG_LEVEL must be one of"),
        ({"LB_CHECK_MODE": "udp"}, "LB_CHECK_MODE: must be one of"),
        ({"LB_DRAIN_TIMEOUT": "soon"}, "LB_DRAIN_TIMEOUT: must be a number"),
        ({"SERVER_COUNT": "200", "SERVICE_POOL_MAX_SIZE": "100"},
         "needs 20020 database connections; the embedded PostgreSQL allows at most 10000"),
    ],
)
def test_the_programs_settings_are_checked_before_anything_starts(
    env: dict[str, str], message: str
) -> None:
    stack = Stack(StackConfig.from_env(env))
    with pytest.raises(ConfigError, match=message):
        stack.check_config()


def test_an_external_database_s_port_may_be_any(tmp_path: Path) -> None:
    """STACK_PG_PORT is the embedded database's: with an external one it collides with nothing."""
    config = StackConfig.from_env({"PGSQL_HOST": "db", "STACK_PG_PORT": "3000"})
    assert not config.embedded


@pytest.mark.parametrize(
    ("variable", "host"),
    [("LB_HOST", "300.1.1.1"), ("LB_ADMIN_HOST", "no-such-host.invalid"),
     ("STACK_BACKEND_HOST", "300.1.1.1")],
)
def test_a_listening_address_that_does_not_resolve_is_refused_before_anything_starts(
    variable: str, host: str
) -> None:
    stack = Stack(StackConfig.from_env({variable: host}))
    with pytest.raises(ConfigError, match=f"{variable} '{host}' is not an address to listen on "
                                          r"\(cannot resolve it: "):
        stack.check_config()


def test_localhost_is_a_listening_address() -> None:
    Stack(StackConfig.from_env({"LB_HOST": "localhost"})).check_config()


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("file", "STACK_DATA_DIR {data} must be a directory"),
        ("under-a-file", "STACK_DATA_DIR {data}: {parent} is not a directory"),
        ("pgpassword-dir", "STACK_DATA_DIR's pgpassword {data}/pgpassword must be a file"),
        ("pgdata-file", "STACK_DATA_DIR's pgdata {data}/pgdata must be a directory"),
    ],
)
def test_a_data_directory_that_cannot_be_used_is_a_bad_setting(
    tmp_path: Path, layout: str, message: str
) -> None:
    data = tmp_path / "data"
    parent = data
    if layout == "file":
        data.write_text("")
    elif layout == "under-a-file":
        parent.write_text("")
        data = parent / "sub"
    else:
        data.mkdir()
        name = "pgpassword" if layout == "pgpassword-dir" else "pgdata"
        if layout == "pgpassword-dir":
            (data / name).mkdir()
        else:
            (data / name).write_text("")
    stack = Stack(StackConfig.from_env({}, data_dir=data))
    with pytest.raises(ConfigError) as refused:
        stack.check_config()
    assert str(refused.value) == message.format(data=data, parent=parent)


@pytest.mark.parametrize(("pool", "warned"), [("48", False), ("49", True)])
async def test_an_external_database_is_warned_of_past_the_97_slots_a_default_server_leaves(
    pool: str, warned: bool
) -> None:
    # PostgreSQL's default max_connections is 100, 3 of them kept for superusers: 2 x 48 = 96
    # fit, 2 x 49 = 98 do not.
    env = {"SERVER_COUNT": "2", "SERVICE_POOL_MAX_SIZE": pool, "PGSQL_HOST": "127.0.0.1"}
    log = io.StringIO()
    stack = Stack(StackConfig.from_env(env), output=Output(log))
    stack.check_config()
    await stack._start_database()
    assert ("warning: the replicas may open up to 98 connections (SERVER_COUNT 2 x "
            "SERVICE_POOL_MAX_SIZE 49), more than the 97 that PostgreSQL's default "
            "max_connections (100, 3 of them kept for superusers) leaves" in log.getvalue()
            ) is warned
    assert "database: external PostgreSQL at 127.0.0.1:5432" in log.getvalue()


def test_an_external_database_is_not_limited_by_the_embedded_one_s_ceiling() -> None:
    env = {"SERVER_COUNT": "200", "SERVICE_POOL_MAX_SIZE": "100", "PGSQL_HOST": "db"}
    assert Stack(StackConfig.from_env(env)).check_config().pool_max_size == 100


def test_the_embedded_database_allows_every_pool_and_some_headroom() -> None:
    assert database_connections(3, 10) == 100  # never below PostgreSQL's default
    assert database_connections(25, 10) == 270  # was 200 for any SERVER_COUNT
    assert database_connections(200, 10) == 2020


def test_each_replica_is_named_by_its_address_or_by_the_user_s_name() -> None:
    stack = Stack(StackConfig.from_env({}, backend_port=6001, server_count=2))
    env = stack._replica_env(2, 6002, {})
    assert env["SERVICE_NAME"] == "127.0.0.1:6002"
    assert env["SERVICE_PORT"] == "6002"
    named = Stack(StackConfig.from_env({"SERVICE_NAME": "web"}))
    assert named._replica_env(2, 5002, {})["SERVICE_NAME"] == "web-2"


def test_ipv6_addresses_are_bracketed_as_the_balancer_reads_them() -> None:
    config = StackConfig.from_env({"STACK_BACKEND_HOST": "::1", "LB_HOST": "::",
                                   "LB_ADMIN_HOST": "::1"})
    stack = Stack(config)
    env = stack._balancer_env()
    assert env["LB_BACKENDS"] == "[::1]:5001,[::1]:5002,[::1]:5003"
    balancer = lb.config.Config.from_env(env, argv=[])
    assert balancer.backends == (("::1", 5001), ("::1", 5002), ("::1", 5003))
    stack.check_config()
    assert stack.url == "http://[::1]:3000"
    assert stack.admin_url == "http://[::1]:8404"
    assert stack._replica_env(1, 5001, {})["SERVICE_NAME"] == "[::1]:5001"
    assert "  replicas: [::1]:5001, [::1]:5002, [::1]:5003" in stack.banner()


def test_the_start_line_shows_only_the_database_settings_that_apply() -> None:
    embedded = StackConfig.from_env({}).redacted()
    assert "pg_host" not in embedded
    assert "pg_port" not in embedded
    assert embedded["embedded_pg_port"] == "a free one"
    assert embedded["data_dir"] == Path(".varstack")
    external = StackConfig.from_env({"PGSQL_HOST": "db", "PGSQL_PASSWORD": "pw"}).redacted()
    assert (external["pg_host"], external["pg_port"], external["pg_password"]) == ("db", 5432,
                                                                                   "***")
    assert "data_dir" not in external
    assert "embedded_pg_port" not in external


def test_output_to_a_hung_up_terminal_is_dropped_not_raised() -> None:
    class HungUp(io.StringIO):
        def write(self, text: str) -> int:
            raise OSError(errno.EIO, "Input/output error")

    Output(HungUp()).line("stack", "stopping")  # no exception: the stack goes on stopping


# -- the embedded PostgreSQL's folders ---------------------------------------------------------


def test_the_folders_above_the_data_are_made_traversable_not_listable(tmp_path: Path) -> None:
    outer = tmp_path / "home"
    inner = outer / "checkout"
    (inner / ".varstack").mkdir(parents=True)
    outer.chmod(0o700)
    inner.chmod(0o750)
    _let_traverse(inner / ".varstack" / "pgdata")
    assert stat.S_IMODE(outer.stat().st_mode) == 0o701
    assert stat.S_IMODE(inner.stat().st_mode) == 0o751


@pytest.mark.skipif(os.geteuid() != 0, reason="as root PostgreSQL runs as another user")
def test_the_embedded_database_starts_as_root_from_a_private_folder(tmp_path: Path) -> None:
    private = Path(tempfile.mkdtemp(dir=tmp_path))  # 0700, as mktemp -d makes it
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    # A database name PostgreSQL allows, quotes and all (PGSQL_DBNAME is the user's to choose).
    name = "o'neil \"db\""
    server = EmbeddedPostgres(data_dir=private / "pgdata", max_connections=123, dbname=name)
    try:
        server.start()
        result = subprocess.run(
            [str(_bin_dir() / "psql"), "-h", server.host, "-p", str(server.port),
             "-U", server.user, "-d", server.dbname, "-tAc",
             "SHOW max_connections; SELECT current_database()"],
            env={**os.environ, "PGPASSWORD": server.password}, capture_output=True, text=True,
            check=True,
        )
        assert result.stdout.split("\n")[:2] == ["123", name]
    finally:
        server.stop("immediate")
    assert stat.S_IMODE(private.stat().st_mode) == 0o701  # searchable, still not listable
    # The wheel's PostgreSQL: the folders above it searchable by all, its programs runnable.
    install = _bin_dir().parent
    for parent in list(install.parents)[:-1]:
        assert parent.stat().st_mode & 0o001, parent
    assert (_bin_dir() / "postgres").stat().st_mode & 0o005 == 0o005


def test_a_user_the_data_directory_was_not_made_for_is_named_with_the_way_out(
    tmp_path: Path,
) -> None:
    private = Path(tempfile.mkdtemp(dir=tmp_path))
    first = EmbeddedPostgres(data_dir=private / "pgdata")
    first.start()
    first.stop("fast")
    other = EmbeddedPostgres(data_dir=private / "pgdata", user="alice")
    with pytest.raises(EmbeddedPostgresError) as failed:
        other.start()
    assert not other.running
    assert str(failed.value) == (
        f"PGSQL_USER 'alice' is no user of the PostgreSQL in {private / 'pgdata'}: its user is "
        "the one PGSQL_USER named when that directory was first made (postgres by default); "
        "name that one again, or choose a new STACK_DATA_DIR")


# -- parts the stack cannot serve without ----------------------------------------------------


def _lib_config(tmp_path: Path, **overrides: object) -> StackConfig:
    backend = random.randrange(20000, 32000)  # below the ephemeral range (see test_stack)
    if port_in_use("127.0.0.1", backend) or port_in_use("::1", backend):
        pytest.skip(f"port {backend} is taken")
    values: dict[str, object] = {
        "server_count": 1, "lb_host": "127.0.0.1", "lb_port": free_port(), "lb_admin_port": 0,
        "backend_port": backend, "data_dir": tmp_path / "data", "restart_delay": 0.2,
    }
    values.update(overrides)
    return StackConfig.from_env({"SERVICE_ACCESS_LOG": "off"}, **values)


async def test_when_the_only_replica_exits_0_the_stack_fails(tmp_path: Path) -> None:
    out = io.StringIO()
    async with Stack(_lib_config(tmp_path), output=Output(out)) as stack:
        [replica] = stack.replicas
        replica.signal(signal.SIGTERM)  # it drains and exits 0: not restarted (on-failure)
        async with asyncio.timeout(20):
            await stack.failed.wait()
        assert replica.exit_codes == [0]
        assert replica.restarts == 0
    log = out.getvalue()
    assert "every replica has ended: stopping the stack" in log
    assert "stopping 1 replica(s)" not in log  # none was running any more


async def test_over_ipv6_and_when_the_database_exits_0_the_stack_fails(tmp_path: Path) -> None:
    out = io.StringIO()
    config = _lib_config(tmp_path, backend_host="::1", lb_host="::1")
    async with Stack(config, output=Output(out)) as stack:
        assert stack.url == f"http://[::1]:{config.lb_port}"
        status, served_by = await asyncio.to_thread(_get, "::1", config.lb_port, "/healthcheck")
        assert (status, served_by) == (200, f"[::1]:{config.backend_port}")
        assert stack.database is not None
        pid = stack.database.pid
        assert pid is not None
        os.kill(pid, signal.SIGINT)  # someone stops PostgreSQL (fast shutdown): status 0
        async with asyncio.timeout(20):
            await stack.failed.wait()
    assert "database: exited with status 0; not restarted" in out.getvalue()


async def test_a_start_past_the_ready_timeout_says_what_it_was_waiting_for(
    tmp_path: Path, postgres: Any
) -> None:
    out = io.StringIO()
    config = _lib_config(tmp_path, pg_host=postgres.host, pg_port=postgres.port,
                         pg_password="not-the-password", ready_timeout=3.0)
    with pytest.raises(StackError) as failed:
        async with Stack(config, output=Output(out)):
            pass
    assert str(failed.value) == (
        f"the stack did not answer through http://127.0.0.1:{config.lb_port} within 3s "
        "(STACK_READY_TIMEOUT): it was waiting for backend-1 to answer 200 on "
        f"http://127.0.0.1:{config.backend_port}/healthcheck; see the logs above")


def _get(host: str, port: int, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status, resp.getheader("X-Served-By", "")
    finally:
        conn.close()
