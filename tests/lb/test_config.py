"""The typed config: defaults, env and flags, errors that name the variable, exit status 2."""

from __future__ import annotations

import re
import socket
import subprocess
import sys

import pytest

from lb.config import ENV_VARS, SETTINGS, Config, ConfigError, parse_backends, table
from tests.lb.lbkit import ROOT


def test_defaults_match_the_documented_ones() -> None:
    config = Config.from_env({}, [])
    assert config == Config()
    for setting in SETTINGS:
        value = getattr(config, setting.attr)
        if setting.attr == "backends":
            assert value == ()
        else:
            assert str(value) in (setting.default, f"{setting.default}.0")


def test_env_vars_constant_lists_every_setting() -> None:
    assert tuple(s.env for s in SETTINGS) == ENV_VARS
    assert len(set(ENV_VARS)) == len(ENV_VARS)
    for name in ("LB_HOST", "LB_PORT", "SERVER_COUNT", "LB_BACKENDS", "LB_BACKEND_HOST",
                 "LB_BACKEND_PORT", "LB_RESOLVE_INTERVAL", "LB_ADMIN_HOST", "LB_ADMIN_PORT",
                 "LB_CHECK_MODE", "LB_CHECK_PATH", "LB_CHECK_INTERVAL", "LB_CHECK_RISE",
                 "LB_CHECK_FALL", "LB_CHECK_TIMEOUT", "LB_CONNECT_TIMEOUT", "LB_CONNECT_RETRIES",
                 "LB_IDLE_TIMEOUT", "LB_HALF_CLOSE_TIMEOUT", "LB_MAX_CONNECTIONS",
                 "LB_DRAIN_TIMEOUT", "LB_LOG_LEVEL"):
        assert name in ENV_VARS
    rows = table().splitlines()
    assert len(rows) == len(ENV_VARS) + 2
    assert all(name in table() for name in ENV_VARS)


def test_env_is_read_and_flags_win() -> None:
    env = {"LB_PORT": "4000", "SERVER_COUNT": "5", "LB_BACKENDS": "10.0.0.1:5000, 10.0.0.2:5001",
           "LB_CHECK_MODE": "TCP", "LB_DRAIN_TIMEOUT": "9.5", "LB_LOG_LEVEL": "DEBUG"}
    config = Config.from_env(env, ["--port", "4001", "--check-interval", "0.5"])
    assert config.port == 4001
    assert config.server_count == 5
    assert config.backends == (("10.0.0.1", 5000), ("10.0.0.2", 5001))
    assert config.check_mode == "tcp"
    assert config.check_interval == 0.5
    assert config.drain_timeout == 9.5
    assert config.log_level == "debug"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LB_PORT": "http"}, "LB_PORT: must be an integer"),
        ({"LB_PORT": "70000"}, "LB_PORT: must be a port number"),
        ({"SERVER_COUNT": "0"}, "SERVER_COUNT: must be an integer >= 1"),
        ({"LB_BACKENDS": "10.0.0.1"}, "LB_BACKENDS: '10.0.0.1' is not host:port"),
        ({"LB_BACKENDS": "a:0"}, "LB_BACKENDS: 'a:0' has no valid port"),
        ({"LB_BACKENDS": "a..b:5000"}, "LB_BACKENDS: host 'a..b' is not a valid host name in"),
        # A stray space made a backend that could never resolve, and the balancer ran without.
        ({"LB_BACKENDS": "127.0.0.1 :5000"}, "LB_BACKENDS: host '127.0.0.1 ' is not a valid"),
        ({"LB_BACKENDS": "a b:1"}, "LB_BACKENDS: host 'a b' is not a valid host name"),
        # Only commas: it fell back to discovering the name `backend`, silently.
        ({"LB_BACKENDS": ","}, "LB_BACKENDS: ',' names no backend"),
        ({"LB_BACKENDS": " , ,"}, "LB_BACKENDS: ', ,' names no backend: list host:port entries"),
        ({"LB_PORT": "\u0663\u0660\u0660\u0660"}, "LB_PORT: must be an integer"),
        ({"LB_BACKENDS": "127.0.0.1:\uff15\uff10\uff10\uff10"}, "LB_BACKENDS: '127.0.0.1:"),
        ({"LB_CHECK_TIMEOUT": "\uff11"}, "LB_CHECK_TIMEOUT: must be a number"),
        # Python's int() and float() read these; nobody types them in a setting meaning that.
        ({"LB_PORT": "3_208"}, "LB_PORT: must be an integer"),
        ({"LB_MAX_CONNECTIONS": "+5"}, "LB_MAX_CONNECTIONS: must be an integer"),
        ({"LB_CHECK_INTERVAL": "1_0"}, "LB_CHECK_INTERVAL: must be a number"),
        ({"LB_BACKEND_HOST": "x" * 64 + ".svc"}, "LB_BACKEND_HOST: 'xxxx"),
        ({"LB_CHECK_MODE": "udp"}, "LB_CHECK_MODE: must be one of http, tcp"),
        ({"LB_CHECK_PATH": "healthcheck"}, "LB_CHECK_PATH: must be a path"),
        ({"LB_CHECK_INTERVAL": "0"}, "LB_CHECK_INTERVAL: must be a number of seconds > 0"),
        # A period of a microsecond ran a check (or a lookup) back to back: a core kept busy.
        ({"LB_CHECK_INTERVAL": "0.000001"}, "LB_CHECK_INTERVAL: must be at least 0.01 s"),
        ({"LB_RESOLVE_INTERVAL": "1e-300"}, "LB_RESOLVE_INTERVAL: must be at least 0.01 s"),
        ({"LB_CHECK_TIMEOUT": "nan"}, "LB_CHECK_TIMEOUT: must be a number of seconds > 0"),
        ({"LB_CONNECT_RETRIES": "-1"}, "LB_CONNECT_RETRIES: must be an integer >= 0"),
        ({"LB_DRAIN_TIMEOUT": "10"}, "LB_DRAIN_TIMEOUT: must be below the 10 s stop grace"),
        ({"LB_MAX_CONNECTIONS": "0"}, "LB_MAX_CONNECTIONS: must be an integer >= 1"),
        ({"LB_LOG_LEVEL": "loud"}, "LB_LOG_LEVEL: must be one of"),
        ({"LB_LOOP": "trio"}, "LB_LOOP: must be one of"),
        ({"LB_IO_URING": "maybe"}, "LB_IO_URING: must be one of off, on, got 'maybe'"),
        ({"LB_CHECK_PATH": "/santé"}, "LB_CHECK_PATH: must be a path starting with '/', in "
                                      "printable ASCII without spaces"),
        ({"LB_CHECK_PATH": "/a\tb"}, "LB_CHECK_PATH: must be a path"),
        ({"LB_BUFFER_SIZE": "2147483648"}, "LB_BUFFER_SIZE: must be an integer <= 1073741824"),
        ({"LB_BACKLOG": "2147483648"}, "LB_BACKLOG: must be an integer <= 65535"),
        ({"LB_HOST": ""}, "LB_HOST: must not be empty"),
        ({"LB_ADMIN_HOST": " "}, "LB_ADMIN_HOST: must not be empty"),
        ({"LB_ADMIN_HOST": "a..b"}, "LB_ADMIN_HOST: 'a..b' is not a valid host name"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        Config.from_env(env, [])


def test_backend_list_forms() -> None:
    assert parse_backends("a:1,b:2,a:1,") == (("a", 1), ("b", 2))
    assert parse_backends("[::1]:5000") == (("::1", 5000),)
    with pytest.raises(ValueError, match="is not host:port"):
        parse_backends("::1:5000")


def test_bad_config_exits_2_without_a_traceback() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lb"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "LB_CHECK_RISE": "many"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "LB_CHECK_RISE: must be an integer, got 'many'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("host", "port_taken", "reason"),
    [
        ("127.0.0.1", True, "[Errno 98] Address already in use"),
        # The resolver's own words: "Name or service not known", or without a DNS server,
        # "Temporary failure in name resolution".
        ("nosuch.invalid", False, ""),
    ],
    ids=["port-in-use", "unresolvable-host"],
)
def test_a_main_listener_that_cannot_bind_exits_1_naming_its_variables(
    host: str, port_taken: bool, reason: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1] if port_taken else 0
        result = subprocess.run(
            [sys.executable, "-m", "lb"], cwd=ROOT, capture_output=True, text=True, timeout=30,
            check=False,
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "LB_HOST": host,
                 "LB_PORT": str(port), "LB_BACKENDS": "127.0.0.1:9", "LB_ADMIN_PORT": "0",
                 "LB_CHECK_MODE": "tcp"},
        )
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"cannot serve on {host}:{port} (LB_HOST, LB_PORT): " in result.stdout
    assert reason in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_help_lists_the_flags() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lb", "--help"], cwd=ROOT, capture_output=True, text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}, timeout=30, check=False,
    )
    assert result.returncode == 0
    assert "--backends LB_BACKENDS" in result.stdout
    assert "--server-count SERVER_COUNT" in result.stdout
