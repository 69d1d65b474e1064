"""An embedded PostgreSQL server run as a child process on a TCP port.

The binaries come from the ``pgserver`` wheel (PostgreSQL 16), so a fresh machine
needs nothing from apt.  ``initdb`` and ``postgres`` refuse to run as root; as root
the server runs as the unprivileged system user ``pgserver`` (created if missing,
as pgserver itself does).

The process is ours, not pg_ctl's, so tests can stop it the three ways PostgreSQL
knows (smart, fast, immediate), kill it, and start it again on the same data
directory and port.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypedDict

StopMode = Literal["smart", "fast", "immediate"]
_STOP_SIGNALS: dict[StopMode, signal.Signals] = {
    "smart": signal.SIGTERM,
    "fast": signal.SIGINT,
    "immediate": signal.SIGQUIT,
}
_SYSTEM_USER = "pgserver"


class EmbeddedPostgresError(RuntimeError):
    """The embedded PostgreSQL could not be set up or started."""


def _bin_dir() -> Path:
    # Found without importing pgserver: its import has side effects (runtime dirs, lock
    # files, a warning) that we do not need just to run its binaries.
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedPostgresError(
            "the embedded PostgreSQL needs the 'pgserver' package: pip install 'varstack[embedded]'"
        )
    bin_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (bin_dir / "postgres").exists():
        raise EmbeddedPostgresError(f"pgserver is installed but {bin_dir} has no postgres binary")
    return bin_dir


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _run_as() -> str | None:
    """The system user to run PostgreSQL as: ourselves, or ``pgserver`` when root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(_SYSTEM_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "-s", "/usr/sbin/nologin", _SYSTEM_USER],
            check=True,
            capture_output=True,
        )
    return _SYSTEM_USER


class _RunAs(TypedDict, total=False):
    user: str
    group: int
    extra_groups: list[int]


def _as_user(user: str | None) -> _RunAs:
    """subprocess arguments that drop root to ``user`` entirely (uid, gid and groups)."""
    if user is None:
        return {}
    return {"user": user, "group": pwd.getpwnam(user).pw_gid, "extra_groups": []}


def _let_traverse(path: Path) -> None:
    """Let every user traverse the folders above ``path`` (o+rx). Done at every start, not
    once: others may tighten them meanwhile (pytest resets /tmp/pytest-of-<user> to 0700)."""
    for parent in list(path.parents)[:-1]:
        mode = parent.stat().st_mode
        if mode & 0o005 != 0o005:
            parent.chmod(mode | 0o005)


def _give_to(path: Path, user: str) -> None:
    """Make ``user`` own ``path`` and all below it (PostgreSQL insists on owning PGDATA)."""
    entry = pwd.getpwnam(user)
    for root, dirs, files in os.walk(path):
        os.chown(root, entry.pw_uid, entry.pw_gid)
        for name in dirs + files:
            os.chown(os.path.join(root, name), entry.pw_uid, entry.pw_gid)


def _prepare_binaries(user: str) -> None:
    bin_dir = _bin_dir()
    install = bin_dir.parent
    _let_traverse(bin_dir)
    for root, dirs, files in os.walk(install):
        os.chmod(root, os.stat(root).st_mode | 0o005)
        for name in dirs + files:
            p = os.path.join(root, name)
            if not os.path.islink(p):
                executable = 0o001 if name in files and root == str(bin_dir) else 0
                os.chmod(p, os.stat(p).st_mode | 0o004 | executable)


@dataclass
class EmbeddedPostgres:
    """One PostgreSQL server on ``host:port`` with its data in ``data_dir``.

    The database ``dbname`` is created on first start, owned by ``user`` whose
    password is ``password`` (TCP connections authenticate with scram-sha-256;
    the Unix socket in ``data_dir`` is left to ``trust`` for local tools).
    """

    data_dir: Path
    port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"
    user: str = "postgres"
    password: str = "postgres"
    dbname: str = "se_lab6"
    log_file: Path | None = None
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def dsn(self) -> str:
        return f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{self.dbname}"

    @property
    def env(self) -> dict[str, str]:
        """The service's ``PGSQL_*`` variables pointing at this server."""
        return {
            "PGSQL_HOST": self.host,
            "PGSQL_PORT": str(self.port),
            "PGSQL_USER": self.user,
            "PGSQL_PASSWORD": self.password,
            "PGSQL_DBNAME": self.dbname,
        }

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    # -- set-up -----------------------------------------------------------

    def _initdb(self, run_as: str | None) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if (self.data_dir / "PG_VERSION").exists():
            return
        if any(self.data_dir.iterdir()):
            raise EmbeddedPostgresError(
                f"{self.data_dir} is not empty and holds no PostgreSQL cluster"
            )
        pwfile = self.data_dir.parent / f".{self.data_dir.name}.pw"
        pwfile.write_text(self.password + "\n")
        try:
            if run_as:
                _prepare_binaries(run_as)
                _give_to(self.data_dir, run_as)
                entry = pwd.getpwnam(run_as)
                os.chown(pwfile, entry.pw_uid, entry.pw_gid)
            result = subprocess.run(
                [
                    str(_bin_dir() / "initdb"),
                    "-D", str(self.data_dir),
                    "-U", self.user,
                    "--pwfile", str(pwfile),
                    "--auth-host=scram-sha-256",
                    "--auth-local=trust",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                ],
                **_as_user(run_as),
                capture_output=True,
                text=True,
                check=False,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            raise EmbeddedPostgresError(f"initdb failed:\n{result.stdout}\n{result.stderr}")

    def _create_database(self, run_as: str | None) -> None:
        psql = str(_bin_dir() / "psql")
        base = [psql, "-h", str(self.data_dir), "-p", str(self.port), "-U", self.user]
        base += ["-d", "postgres"]
        exists = subprocess.run(
            [*base, "-tAc", f"SELECT 1 FROM pg_database WHERE datname = '{self.dbname}'"],
            **_as_user(run_as), capture_output=True, text=True, check=True,
        ).stdout.strip()
        if exists != "1":
            subprocess.run(
                [*base, "-c", f'CREATE DATABASE "{self.dbname}"'],
                **_as_user(run_as), capture_output=True, text=True, check=True,
            )

    # -- process control ----------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Start the server (initialising the cluster on first use) and wait until it accepts."""
        if self.running:
            return
        run_as = _run_as()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if run_as:
            _let_traverse(self.data_dir)
        self._initdb(run_as)
        stale = self.data_dir / "postmaster.pid"
        if stale.exists():
            self._clear_stale_pid(stale)
        log = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        try:
            self._proc = subprocess.Popen(
                [
                    str(_bin_dir() / "postgres"),
                    "-D", str(self.data_dir),
                    "-h", self.host,
                    "-p", str(self.port),
                    "-k", str(self.data_dir),
                    "-c", "fsync=on",
                    "-c", "max_connections=200",
                    "-c", "shared_buffers=64MB",
                ],
                **_as_user(run_as),
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            if log is not subprocess.DEVNULL:
                log.close()  # type: ignore[union-attr]
        self._wait_ready(timeout)
        self._create_database(run_as)

    def _clear_stale_pid(self, pidfile: Path) -> None:
        try:
            pid = int(pidfile.read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            pid = 0
        if pid > 0:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                cmdline = b""
            if b"postgres" in cmdline and str(self.data_dir).encode() in cmdline:
                raise EmbeddedPostgresError(
                    f"a PostgreSQL (pid {pid}) already runs on {self.data_dir}; stop it first"
                )
        pidfile.unlink(missing_ok=True)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        isready = str(_bin_dir() / "pg_isready")
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise EmbeddedPostgresError(
                    f"postgres exited with code {self._proc.returncode} during start"
                    + (f"; see {self.log_file}" if self.log_file else "")
                )
            ready = subprocess.run(
                [isready, "-q", "-h", self.host, "-p", str(self.port)], check=False
            ).returncode == 0
            if ready:
                return
            if time.monotonic() > deadline:
                self.kill()
                raise EmbeddedPostgresError(
                    f"postgres did not accept connections within {timeout}s"
                )
            time.sleep(0.05)

    def stop(self, mode: StopMode = "fast", timeout: float = 30.0) -> None:
        """Stop the server as ``pg_ctl stop -m mode`` would, and reap it."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            self._proc = None
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(_STOP_SIGNALS[mode])
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self._proc = None

    def kill(self) -> None:
        """SIGKILL the postmaster and its children (a crash, not a shutdown)."""
        proc = self._proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        self._proc = None

    def restart(self, mode: StopMode = "fast") -> None:
        self.stop(mode)
        self.start()

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop("fast")
