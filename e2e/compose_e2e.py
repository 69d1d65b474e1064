"""End to end, for real: build the images and run compose.yaml under podman, then check it.

``make e2e`` runs this as root on a fresh Debian 12 machine with no Docker engine and no
reachable image registry.  It installs what it needs (podman from apt, podman-compose from
PyPI in its own venv), builds local stand-ins for the official base images from a Debian
rootfs (cached as podman images, so only the first run pays for debootstrap), builds the
three images from ``docker/`` and starts ``compose.yaml`` the way users do, only under its own
project name.  Every check goes through the published port 3000, prints one line, and the
first failure ends the run with a non-zero status after printing the containers' logs.
Whatever happens, the project's containers, network and volume are removed at the end; the
base images and the build cache stay for the next run.

Usage: python3 e2e/compose_e2e.py [--keep] [--replicas N]
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("VARSTACK_E2E_CACHE", "/var/cache/varstack"))
PROJECT = "varstack-e2e"
PODMAN_COMPOSE_VERSION = "1.6.0"
APT_PACKAGES = (
    "podman", "runc", "conmon", "netavark", "aardvark-dns", "slirp4netns", "uidmap",
    "iptables", "debootstrap", "fuse-overlayfs", "python3-venv",
)
# Local stand-ins for the official base images; the Dockerfiles take them as build arguments.
# (rootfs packages, stand-in Containerfile, the stand-in's tag, the Dockerfiles' build arg)
STANDINS = {
    "python": (
        ("python3", "python3-venv", "python-is-python3", "ca-certificates"),
        HERE / "standins" / "python.Containerfile",
        "localhost/varstack-e2e/python:3.11-bookworm",
        "PYTHON_IMAGE",
    ),
    "postgres": (
        ("postgresql",),
        HERE / "standins" / "postgres.Containerfile",
        "localhost/varstack-e2e/postgres:15-bookworm",
        "POSTGRES_IMAGE",
    ),
}
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
LB_URL_HOST, LB_PORT = "127.0.0.1", 3000
PG_PASS = "e2e-" + uuid.uuid4().hex[:12]  # a throwaway password, never written to a file

T0 = time.monotonic()


class CheckFailed(Exception):
    pass


def say(message: str) -> None:
    print(f"[e2e {time.monotonic() - T0:6.1f}s] {message}", flush=True)


def check(ok: bool, what: str, detail: str = "") -> None:
    """One printed check; the first failed one ends the run."""
    say(f"{'PASS' if ok else 'FAIL'}: {what}" + (f" ({detail})" if detail else ""))
    if not ok:
        raise CheckFailed(what + (f": {detail}" if detail else ""))


def run(
    cmd: Sequence[str],
    *,
    timeout: float,
    check_rc: bool = True,
    capture: bool = False,
    env: dict[str, str] | None = None,
    stdin: int | None = None,
) -> subprocess.CompletedProcess[str]:
    """A command with a deadline: nothing here may hang CI."""
    try:
        result = subprocess.run(
            list(cmd), timeout=timeout, text=True, env=env, stdin=stdin,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.STDOUT if capture else None,
        )
    except subprocess.TimeoutExpired as exc:
        raise CheckFailed(f"timed out after {timeout:g}s: {' '.join(cmd)}") from exc
    if check_rc and result.returncode != 0:
        out = f"\n{result.stdout}" if capture and result.stdout else ""
        raise CheckFailed(f"exit {result.returncode}: {' '.join(cmd)}{out}")
    return result


def podman_env() -> dict[str, str]:
    env = dict(os.environ)
    env["CONTAINERS_CONF"] = str(HERE / "containers.conf")
    return env


# -- set-up: host packages, podman-compose, base images -------------------------------


def ensure_host_packages() -> None:
    missing = [
        p for p in APT_PACKAGES
        if run(["dpkg-query", "-W", "-f=${Status}", p], timeout=30, check_rc=False,
               capture=True).stdout.strip() != "install ok installed"
    ]
    if not missing:
        say("host packages: present")
        return
    say(f"host packages: installing {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(["apt-get", "update", "-q"], timeout=300, env=env, capture=True)
    run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
        timeout=900, env=env, capture=True)


def ensure_podman_compose() -> Path:
    venv = CACHE / f"podman-compose-{PODMAN_COMPOSE_VERSION}"
    exe = venv / "bin" / "podman-compose"
    if exe.exists():
        return exe
    say(f"podman-compose {PODMAN_COMPOSE_VERSION}: installing in {venv}")
    shutil.rmtree(venv, ignore_errors=True)
    run([sys.executable, "-m", "venv", str(venv)], timeout=120)
    run([str(venv / "bin" / "pip"), "install", "-q", f"podman-compose=={PODMAN_COMPOSE_VERSION}"],
        timeout=600, capture=True)
    return exe


def image_exists(tag: str) -> bool:
    return run(["podman", "image", "exists", tag], timeout=60, check_rc=False,
               env=podman_env()).returncode == 0


def rootfs_tag(name: str, packages: Sequence[str]) -> str:
    # The package list is the cache key: change it and a new rootfs is built.
    key = hashlib.sha256(" ".join(("bookworm", *packages)).encode()).hexdigest()[:12]
    return f"localhost/varstack-e2e/rootfs-{name}:{key}"


def ensure_base_images() -> dict[str, str]:
    """Build-arg -> local stand-in tag; debootstrap only what is not cached yet."""
    jobs: dict[str, tuple[subprocess.Popen[bytes], Path, Path]] = {}
    for name, (packages, _, _, _) in STANDINS.items():
        tag = rootfs_tag(name, packages)
        if image_exists(tag):
            say(f"base rootfs {tag}: cached")
            continue
        target = CACHE / f"rootfs-{name}.tmp"
        shutil.rmtree(target, ignore_errors=True)
        CACHE.mkdir(parents=True, exist_ok=True)
        log = CACHE / f"debootstrap-{name}.log"
        say(f"base rootfs {tag}: debootstrap bookworm (+{','.join(packages)})")
        # No mirror given: debootstrap's default (or the host's apt source) is the one that works.
        with log.open("wb") as out:
            proc = subprocess.Popen(
                ["debootstrap", "--variant=minbase", f"--include={','.join(packages)}",
                 "bookworm", str(target)],
                stdout=out, stderr=subprocess.STDOUT,
            )
        jobs[name] = (proc, target, log)
    deadline = time.monotonic() + 900
    for name, (proc, target, log) in jobs.items():
        try:
            rc = proc.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = -1
        if rc != 0:
            raise CheckFailed(f"debootstrap {name} failed (exit {rc}); see {log}")
        # The packaged cluster and caches are dead weight in an image.
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists", "var/lib/postgresql/15",
                     "etc/postgresql/15"):
            shutil.rmtree(target / junk, ignore_errors=True)
        tag = rootfs_tag(name, STANDINS[name][0])
        tar = subprocess.Popen(["tar", "-C", str(target), "-c", "."], stdout=subprocess.PIPE)
        run(["podman", "import", "-", tag], timeout=600, stdin=tar.stdout, env=podman_env(),
            capture=True)
        if tar.wait(60) != 0:
            raise CheckFailed(f"tar of {target} failed")
        shutil.rmtree(target, ignore_errors=True)
        say(f"base rootfs {tag}: imported")
    args: dict[str, str] = {}
    for name, (packages, containerfile, tag, build_arg) in STANDINS.items():
        run(["podman", "build", "-q", "-f", str(containerfile), "-t", tag,
             "--build-arg", f"ROOTFS={rootfs_tag(name, packages)}", str(containerfile.parent)],
            timeout=300, env=podman_env(), capture=True)
        args[build_arg] = tag
    say(f"stand-ins ready: {', '.join(args.values())}")
    return args


# -- compose -----------------------------------------------------------------------------


class Compose:
    def __init__(self, exe: Path, replicas: int) -> None:
        self.exe = exe
        self.env = podman_env() | {"PG_PASS": PG_PASS, "SERVER_COUNT": str(replicas)}

    def __call__(self, *args: str, timeout: float = 300, capture: bool = True,
                 check_rc: bool = True, global_args: Sequence[str] = ()) -> str:
        cmd = [str(self.exe), *global_args, "-f", str(ROOT / "compose.yaml"), "-p", PROJECT, *args]
        return run(cmd, timeout=timeout, capture=capture, check_rc=check_rc, env=self.env,
                   ).stdout or ""

    def containers(
        self, service: str | None = None, *, running: bool = True
    ) -> list[dict[str, str]]:
        """id, name, service of this project's containers (running only by default)."""
        cmd = ["podman", "ps", "--filter", f"label=io.podman.compose.project={PROJECT}",
               "--format", "json"]
        if not running:
            cmd.insert(2, "-a")
        rows = json.loads(run(cmd, timeout=60, capture=True, env=self.env).stdout or "[]")
        out = []
        for row in rows:
            labels = row.get("Labels") or {}
            svc = labels.get("com.docker.compose.service", "")
            if service is None or svc == service:
                out.append({"id": row["Id"], "name": row["Names"][0], "service": svc})
        return sorted(out, key=lambda c: c["name"])

    def inspect(self, name: str, fmt: str) -> str:
        return run(["podman", "inspect", "-f", fmt, name], timeout=60, capture=True,
                   env=self.env).stdout.strip()


# -- HTTP through the balancer -----------------------------------------------------------


def request(method: str, path: str, body: dict[str, str] | None = None,
            timeout: float = 5.0) -> tuple[int, str, str]:
    """One request on a new connection (so the balancer picks a replica for each):
    status, body text, X-Served-By."""
    conn = http.client.HTTPConnection(LB_URL_HOST, LB_PORT, timeout=timeout)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if payload else {}
        conn.request(method, path, body=payload, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read().decode("utf-8", "replace"), resp.getheader(
            "X-Served-By", "")
    finally:
        conn.close()


def try_request(method: str, path: str, body: dict[str, str] | None = None,
                ) -> tuple[int, str, str]:
    try:
        return request(method, path, body)
    except (OSError, http.client.HTTPException) as exc:
        return 0, repr(exc), ""


def wait_for(what: str, probe: Callable[[], bool], timeout: float, interval: float = 0.5) -> float:
    """Poll ``probe`` until true (bounded in time); the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if probe():
            return time.monotonic() - start
        time.sleep(interval)
    check(False, what, f"not within {timeout:g}s")
    return timeout


def served_by(n: int) -> tuple[dict[str, int], int]:
    """n requests on n connections: replica -> count, and how many failed."""
    seen: dict[str, int] = {}
    failed = 0
    for _ in range(n):
        status, _, who = try_request("GET", "/healthcheck")
        if status == 200 and who:
            seen[who] = seen.get(who, 0) + 1
        else:
            failed += 1
    return seen, failed


def replica_names(compose: Compose) -> set[str]:
    """The X-Served-By each running replica announces: its hostname (the container id's
    first 12 characters, as in Docker) and port 5000."""
    return {c["id"][:12] + ":5000" for c in compose.containers("backend")}


def spread_covers(compose: Compose, timeout: float) -> dict[str, int]:
    expected = replica_names(compose)
    last: dict[str, int] = {}

    def probe() -> bool:
        nonlocal last
        last, _ = served_by(4 * len(expected))
        return expected <= set(last)

    wait_for(f"balancer reaches all {len(expected)} replicas", probe, timeout, interval=1.0)
    return last


# -- the scenario ------------------------------------------------------------------------


def scenario(compose: Compose, replicas: int) -> None:
    say("up: podman-compose up -d")
    compose("up", "-d", timeout=300)
    took = wait_for("the stack answers through port 3000",
                    lambda: try_request("GET", "/healthcheck")[0] == 200, timeout=120)
    check(True, "GET /healthcheck through port 3000 is 200", f"{took:.1f}s after up")

    backends = compose.containers("backend")
    check(len(backends) == replicas, f"{replicas} backend replicas running",
          ", ".join(c["name"] for c in backends))
    published = run(["podman", "port", f"{PROJECT}_load_balancer_1"], timeout=30, capture=True,
                    env=compose.env).stdout.split()
    others = [c["name"] for c in compose.containers() if c["service"] != "load_balancer"
              and run(["podman", "port", c["name"]], timeout=30, capture=True,
                      env=compose.env).stdout.strip()]
    check(not others and any(p.endswith(":3000") for p in published),
          "only the balancer publishes a port (3000)", " ".join(published))

    # The images' and compose's health checks really pass (podman 4.3 without systemd never
    # runs them by itself, so run each one on demand).
    def all_healthy() -> bool:
        return all(run(["podman", "healthcheck", "run", c["name"]], timeout=30,
                       check_rc=False, capture=True, env=compose.env).returncode == 0
                   for c in compose.containers())
    wait_for("every container's healthcheck passes", all_healthy, timeout=60, interval=2.0)
    check(True, "every container's healthcheck passes")

    # The API, through the balancer.
    key = "e2e-" + uuid.uuid4().hex[:8]
    status, text, _ = request("POST", "/set_var", {"key": key, "value": "one"})
    check(status == 201, "POST /set_var creates", f"{status} {text!r}")
    status, text, _ = request("POST", "/set_var", {"key": key, "value": "two"})
    check(status == 409, "POST /set_var on an existing key is 409", f"{status}")
    status, text, _ = request("GET", f"/get_var?key={key}")
    check(status == 200 and text == "one", "GET /get_var reads it", f"{status} {text!r}")
    status, text, _ = request("PUT", "/edit_var", {"key": key, "value": "two"})
    check(status == 200, "PUT /edit_var edits", f"{status} {text!r}")
    status, text, _ = request("GET", "/get_var", {"key": key})  # the original's JSON body on GET
    check(status == 200 and text == "two", "GET /get_var with a JSON body reads the edit",
          f"{status} {text!r}")
    status, text, _ = request("DELETE", "/delete_var", {"key": key})
    check(status == 204, "DELETE /delete_var deletes", f"{status}")
    status, text, _ = request("GET", f"/get_var?key={key}")
    check(status == 404, "GET /get_var after delete is 404", f"{status}")

    # Spread: every replica serves (X-Served-By), counted per connection.
    seen = spread_covers(compose, timeout=30)
    check(True, f"connections spread over all {replicas} replicas",
          ", ".join(f"{k}={v}" for k, v in sorted(seen.items())))

    # A replica that dies (SIGKILL from outside, as a crash) is restarted by the engine
    # (restart: on-failure) and taken back by the balancer.
    victim = compose.containers("backend")[0]
    pid = int(compose.inspect(victim["name"], "{{.State.Pid}}"))
    restarts = int(compose.inspect(victim["name"], "{{.RestartCount}}") or 0)
    say(f"killing {victim['name']} (pid {pid}) with SIGKILL")
    os.kill(pid, signal.SIGKILL)
    failures: list[str] = []
    ok = 0

    def restarted() -> bool:
        nonlocal ok
        status, text, _ = try_request("GET", "/healthcheck")
        if status == 200:
            ok += 1
        else:
            failures.append(f"{status} {text[:80]}")
        state = compose.inspect(victim["name"], "{{.State.Running}} {{.RestartCount}}").split()
        return state[0] == "true" and int(state[1]) > restarts

    took = wait_for(f"{victim['name']} restarted by the engine", restarted, timeout=60,
                    interval=0.25)
    check(True, f"{victim['name']} restarted by the engine", f"{took:.1f}s")
    say(f"info: during the restart {ok} requests answered 200, {len(failures)} did not"
        + (f" (first: {failures[0]})" if failures else ""))
    seen = spread_covers(compose, timeout=45)
    check(victim["id"][:12] + ":5000" in seen, "the balancer takes the restarted replica back",
          ", ".join(f"{k}={v}" for k, v in sorted(seen.items())))

    # Data survives down / up (the named volume).
    key = "e2e-persist-" + uuid.uuid4().hex[:8]
    status, _, _ = request("POST", "/set_var", {"key": key, "value": "kept"})
    check(status == 201, "POST /set_var before down", f"{status}")
    # `stop` first, to see how each program ends on SIGTERM: 0 (or 143, killed by the
    # signal's default action) quickly, not 137 after the grace period.
    start = time.monotonic()
    compose("stop", timeout=180)
    took = time.monotonic() - start
    codes = {c["name"]: compose.inspect(c["name"], "{{.State.ExitCode}}")
             for c in compose.containers(running=False)}
    check(all(code in ("0", "143") for code in codes.values()),
          "every container ends cleanly on SIGTERM",
          f"{took:.1f}s; " + ", ".join(f"{k}={v}" for k, v in sorted(codes.items())))
    compose("down", timeout=180)
    check(not compose.containers(running=False), "down removes every container")
    volumes = run(["podman", "volume", "ls", "-q"], timeout=30, capture=True,
                  env=compose.env).stdout.split()
    check(f"{PROJECT}_pgdata" in volumes, "the named volume survives down", f"{PROJECT}_pgdata")
    compose("up", "-d", timeout=300)
    took = wait_for("the stack answers again after up",
                    lambda: try_request("GET", f"/get_var?key={key}")[0] == 200, timeout=120)
    status, text, _ = request("GET", f"/get_var?key={key}")
    check(status == 200 and text == "kept", "data written before down is read after up",
          f"{text!r}, {took:.1f}s after up")

    # Scale out without touching the balancer.
    lb_before = compose.inspect(f"{PROJECT}_load_balancer_1", "{{.Id}} {{.State.StartedAt}}")
    bigger = replicas + 1
    say(f"scale: podman-compose up -d --no-recreate --scale backend={bigger}")
    compose("up", "-d", "--no-recreate", "--scale", f"backend={bigger}", timeout=300)
    backends = compose.containers("backend")
    check(len(backends) == bigger, f"{bigger} backend replicas running after --scale",
          ", ".join(c["name"] for c in backends))
    seen = spread_covers(compose, timeout=45)
    check(True, f"the balancer finds the new replica (DNS) and spreads over all {bigger}",
          ", ".join(f"{k}={v}" for k, v in sorted(seen.items())))
    lb_after = compose.inspect(f"{PROJECT}_load_balancer_1", "{{.Id}} {{.State.StartedAt}}")
    check(lb_before == lb_after, "the balancer was not restarted by scaling", lb_after)


@contextmanager
def cleanup(compose: Compose, keep: bool) -> Iterator[None]:
    try:
        yield
    except BaseException:
        for c in compose.containers(running=False):
            print(f"----- logs of {c['name']} (last 40 lines) -----", flush=True)
            run(["podman", "logs", "--tail", "40", c["name"]], timeout=30, check_rc=False,
                env=compose.env)
        raise
    finally:
        if keep:
            say(f"--keep: leaving project {PROJECT} running")
        else:
            purge(compose)


def purge(compose: Compose) -> None:
    """Remove the project's containers, network and volume; images stay as the build cache.

    `down` alone is not enough: it only knows SERVER_COUNT replicas, not those added by
    --scale, and podman keeps the database while a replica that requires it exists."""
    # Everything but the database first, in one call (podman stops them in parallel), so
    # nothing holds it: then `down` stops it in a second.
    others = [c["name"] for c in compose.containers() if c["service"] != "database"]
    if others:
        run(["podman", "stop", "-t", "15", *others], timeout=120, check_rc=False,
            capture=True, env=compose.env)
    compose("down", "-v", "-t", "15", timeout=180, check_rc=False, capture=True)
    for _ in range(3):
        left = compose.containers(running=False)
        if not left:
            break
        # Dependents first: podman refuses to remove a container another one requires.
        # (`stop` then `rm`: podman 4.3's `rm -f -t` waits out the whole timeout.)
        names = [c["name"] for c in sorted(left, key=lambda c: c["service"] == "database")]
        run(["podman", "stop", "-t", "15", *names], timeout=120, check_rc=False, capture=True,
            env=compose.env)
        run(["podman", "rm", "-f", *names], timeout=120, check_rc=False, capture=True,
            env=compose.env)
    run(["podman", "pod", "rm", "-f", f"pod_{PROJECT}"], timeout=60, check_rc=False,
        capture=True, env=compose.env)
    run(["podman", "network", "rm", "-f", f"{PROJECT}_default"], timeout=60, check_rc=False,
        capture=True, env=compose.env)
    run(["podman", "volume", "rm", "-f", f"{PROJECT}_pgdata"], timeout=60, check_rc=False,
        capture=True, env=compose.env)
    left = compose.containers(running=False)
    volumes = run(["podman", "volume", "ls", "-q"], timeout=60, capture=True,
                  env=compose.env).stdout.split()
    networks = run(["podman", "network", "ls", "--format", "{{.Name}}"], timeout=60,
                   capture=True, env=compose.env).stdout.split()
    pods = run(["podman", "pod", "ls", "--format", "{{.Name}}"], timeout=60, capture=True,
               env=compose.env).stdout.split()
    leftovers = [c["name"] for c in left] + [v for v in volumes if v.startswith(PROJECT)] + [
        n for n in networks if n.startswith(PROJECT)] + [p for p in pods if PROJECT in p]
    say("cleanup: project removed (containers, pod, network, volume)" if not leftovers
        else f"cleanup: could not remove {leftovers}")


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((LB_URL_HOST, port)) != 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--replicas", type=int, default=3, help="SERVER_COUNT (default 3)")
    parser.add_argument("--keep", action="store_true", help="leave the stack running")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("e2e: run as root (podman, apt-get and debootstrap need it)", file=sys.stderr)
        return 2
    try:
        ensure_host_packages()
        exe = ensure_podman_compose()
        compose = Compose(exe, args.replicas)
        # Left over by an interrupted run: start from nothing.
        purge(compose)
        if not port_free(LB_PORT):
            raise CheckFailed(f"port {LB_PORT} is in use; compose.yaml publishes it")
        build_args = ensure_base_images()
        say("build: podman-compose build (the Dockerfiles in docker/, stand-in bases)")
        # docker format: the OCI format would drop the images' HEALTHCHECK.
        extra = ["--format docker", *(f"--build-arg {k}={v}" for k, v in build_args.items())]
        if HOST_CA.exists():
            # This host re-signs HTTPS with a CA only it trusts: lend pip the bundle for the
            # build only (a mount, so it is in no layer).
            extra += [f"-v {HOST_CA}:/etc/host-ca.crt:ro", "--build-arg PIP_CERT=/etc/host-ca.crt"]
        start = time.monotonic()
        build = ["--podman-build-args", " ".join(extra)]
        # The service first, alone: the balancer's image then finds the dependency layer they
        # share in the cache instead of installing it again in a parallel build.
        compose("build", "backend", timeout=900, global_args=build)
        compose("build", timeout=900, global_args=build)
        say(f"build: done in {time.monotonic() - start:.1f}s")
        with cleanup(compose, args.keep):
            scenario(compose, args.replicas)
    except CheckFailed as exc:
        say(f"FAILED: {exc}")
        return 1
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    say("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
