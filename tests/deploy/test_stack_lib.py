"""The supervisor's pieces: its config, the restart policy, and ``Stack`` as a library."""

from __future__ import annotations

import asyncio
import io
import random
from pathlib import Path

import pytest

from stack.config import ENV_VARS, SETTINGS, ConfigError, StackConfig
from stack.pg import free_port
from stack.process import Output, RestartPolicy
from stack.supervisor import Stack, http_status, port_in_use


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
        {"SERVICE_ACCESS_LOG": "off"},
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
    assert "backend-1    | exited with status -9; restarting in 0.2s" in out.getvalue()
