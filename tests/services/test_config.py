from __future__ import annotations

import pytest

from services.config import ENV_VARS, SETTINGS, Config, ConfigError, load_config


def test_defaults_are_the_originals_contract() -> None:
    config = load_config({})
    assert (config.host, config.port) == ("0.0.0.0", 5000)
    assert (config.pg_host, config.pg_port, config.pg_dbname, config.pg_user) == (
        "database", 5432, "se_lab6", "postgres",
    )
    assert config.shutdown_timeout < 10, "must finish inside a container's stop grace"


def test_defaults_table_matches_the_config() -> None:
    defaults = {s.env: s.default for s in SETTINGS}
    derived = load_config({})
    for env, default in defaults.items():
        if default.startswith("<"):
            continue
        assert load_config({env: default}) == derived, env


def test_flags_override_the_environment() -> None:
    config = load_config({"SERVICE_PORT": "5001", "SERVICE_HOST": "0.0.0.0"},
                         ["--port", "5002", "--host", "127.0.0.1"])
    assert (config.host, config.port) == ("127.0.0.1", 5002)


def test_unrelated_variables_are_ignored() -> None:
    assert load_config({"PATH": "/bin", "LB_PORT": "nonsense"}) == Config()


def test_served_by_defaults_to_host_and_bound_port() -> None:
    assert load_config({}).served_by_for(5123).endswith(":5123")
    assert load_config({"SERVICE_NAME": "replica-2"}).served_by_for(5123) == "replica-2"
    assert load_config({"SERVICE_NAME": "réplica\t2"}).served_by_for(5123) == "réplica\t2"


@pytest.mark.parametrize("name", ["r1\nX-Injected: 1", "r1\r", "r1\x00", "r1\x7f"])
def test_a_service_name_that_cannot_be_a_header_is_refused_at_start(name: str) -> None:
    # aiohttp refuses to send such a header: every answer would have failed.
    with pytest.raises(ConfigError, match="SERVICE_NAME must not contain control characters"):
        load_config({"SERVICE_NAME": name})


def test_password_is_redacted() -> None:
    config = load_config({"PGSQL_PASSWORD": "s3cret"})
    assert config.pg_password == "s3cret"
    assert "s3cret" not in repr(config)
    assert "s3cret" not in str(config.redacted())


def test_every_variable_has_a_setting_row() -> None:
    assert len(ENV_VARS) == len(set(ENV_VARS))
    assert all(s.help for s in SETTINGS)


def test_error_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="SERVICE_MAX_KEY_BYTES must be between 1 and 2000"):
        load_config({"SERVICE_MAX_KEY_BYTES": "4000"})


@pytest.mark.parametrize("host", ["a..b", "x" * 64 + ".example", " ", "db host", "db/1",
                                  "db:5432"])
def test_a_database_host_no_resolver_could_look_up_is_refused_naming_it(host: str) -> None:
    with pytest.raises(ConfigError, match=r"^PGSQL_HOST (must not be empty|'.*' is not a valid)"):
        load_config({"PGSQL_HOST": host})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        # Python's int() and float() read these as 5001 and 2: no user meant them.
        ({"SERVICE_PORT": "\uff15\uff10\uff10\uff11"}, "SERVICE_PORT must be a whole number"),
        ({"SERVICE_PORT": "\u0665\u0660\u0660\u0661"}, "SERVICE_PORT must be a whole number"),
        ({"SERVICE_PORT": "5_001"}, "SERVICE_PORT must be a whole number"),
        ({"SERVICE_POOL_ACQUIRE_TIMEOUT": "+2"}, "SERVICE_POOL_ACQUIRE_TIMEOUT must be a number"),
        ({"SERVICE_HEALTH_TIMEOUT": "\uff12"}, "SERVICE_HEALTH_TIMEOUT must be a number of"),
    ],
)
def test_numbers_in_other_scripts_digits_are_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(env)


def test_a_database_host_may_be_an_address_or_a_socket_directory() -> None:
    for host in ("10.0.0.7", "::1", "/var/run/postgresql", "db.example", "my_db", "bücher.example"):
        assert load_config({"PGSQL_HOST": host}).pg_host == host
