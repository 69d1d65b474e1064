"""An embedded PostgreSQL server run as a child process on a TCP port.

The binaries come from the ``pgserver`` wheel (PostgreSQL 16), so a fresh machine
needs nothing from apt.  ``initdb`` and ``postgres`` refuse to run as root; as root
the server runs as the unprivileged system user ``pgserver`` (created if missing,
as pgserver itself does).

The process is ours, not pg_ctl's, so tests can stop it the three ways PostgreSQL
knows (smart, fast, immediate), kill it, and start it again on the same data
directory and port.

The postmaster runs in its own session (a Ctrl-C reaches its owner alone) and, unlike
the owner's other children, cannot be tied to the owner's life with PR_SET_PDEATHSIG
(it is spawned from a worker thread, which may end first, and runs as another user): an
owner killed with SIGKILL leaves it running.  The next start on the same data directory
finds it, proves it is an orphan of ours (our binary, our data directory, and its parent
is no longer the process that started it, as recorded beside the data directory) and
stops it before starting afresh.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
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


class EmbeddedPostgresCancelled(EmbeddedPostgresError):
    """``start()`` was cancelled from another thread; nothing it started is left running."""


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
    """Let every user traverse the folders above ``path``: o+x, the search bit alone, so a
    path through them resolves but none of them becomes listable (a checkout under /root
    must not make /root readable). Done at every start, not once: others may tighten them
    meanwhile (pytest resets /tmp/pytest-of-<user> to 0700)."""
    for parent in list(path.absolute().parents)[:-1]:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            parent.chmod(mode | 0o001)


def _give_to(path: Path, user: str) -> None:
    """Make ``user`` own ``path`` and all below it (PostgreSQL insists on owning PGDATA)."""
    entry = pwd.getpwnam(user)
    for root, dirs, files in os.walk(path):
        os.chown(root, entry.pw_uid, entry.pw_gid)
        for name in dirs + files:
            os.chown(os.path.join(root, name), entry.pw_uid, entry.pw_gid)


def _prepare_binaries(user: str) -> None:
    """Let ``user`` run the wheel's PostgreSQL: o+x on the folders above its install tree;
    inside the tree (the wheel's own files, nothing private) o+rx on folders (initdb lists
    share/timezone), o+r on files, o+x on the programs in bin/."""
    bin_dir = _bin_dir()
    install = bin_dir.parent
    _let_traverse(install)
    for root, dirs, files in os.walk(install):
        os.chmod(root, os.stat(root).st_mode | 0o005)
        for name in dirs + files:
            p = os.path.join(root, name)
            if not os.path.islink(p):
                executable = 0o001 if name in files and root == str(bin_dir) else 0
                os.chmod(p, os.stat(p).st_mode | 0o004 | executable)


class PostgresAddress:
    """Where a PostgreSQL answers and as whom: the DSN and the service's ``PGSQL_*`` names."""

    host: str
    port: int
    user: str
    password: str
    dbname: str

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


@dataclass
class EmbeddedPostgres(PostgresAddress):
    """One PostgreSQL server on ``host:port`` with its data in ``data_dir``.

    The database ``dbname`` is created on first start, owned by ``user`` whose
    password is ``password`` (TCP connections authenticate with scram-sha-256;
    the Unix socket in ``data_dir`` is left to ``trust`` for local tools).
    """

    data_dir: Path
    port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"
    user: str = "postgres"
    password: str = field(default="postgres", repr=False)
    dbname: str = "se_lab6"
    log_file: Path | None = None
    #: PostgreSQL's max_connections: what every client together may open (plus the 3 slots
    #: it keeps for superusers).
    max_connections: int = 200
    #: Where to say what start() does beyond the obvious (an orphan found and stopped).
    #: Called from the thread that runs start().
    log: Callable[[str], None] | None = field(default=None, repr=False, compare=False)
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(
        default_factory=threading.Lock, init=False, repr=False, compare=False
    )

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    @property
    def returncode(self) -> int | None:
        """The last server's exit status, once it has exited (None while it runs)."""
        proc = self._proc
        return proc.poll() if proc is not None else None

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
        try:
            self._create_database_once(run_as)
        except subprocess.CalledProcessError as exc:
            if f'role "{self.user}" does not exist' in (exc.stderr or ""):
                raise EmbeddedPostgresError(
                    f"PGSQL_USER {self.user!r} is no user of the PostgreSQL in {self.data_dir}: "
                    "its user is the one PGSQL_USER named when that directory was first made "
                    "(postgres by default); name that one again, or choose a new STACK_DATA_DIR"
                ) from None
            raise EmbeddedPostgresError(
                f"could not create the database {self.dbname!r}: {exc.stderr or exc}"
            ) from exc

    def _create_database_once(self, run_as: str | None) -> None:
        psql = str(_bin_dir() / "psql")
        base = [psql, "-h", str(self.data_dir), "-p", str(self.port), "-U", self.user]
        base += ["-d", "postgres"]
        exists = subprocess.run(
            [*base, "-tAc", f"SELECT 1 FROM pg_database WHERE datname = {_literal(self.dbname)}"],
            **_as_user(run_as), capture_output=True, text=True, check=True,
        ).stdout.strip()
        if exists != "1":
            subprocess.run(
                [*base, "-c", f"CREATE DATABASE {_identifier(self.dbname)}"],
                **_as_user(run_as), capture_output=True, text=True, check=True,
            )

    # -- process control ----------------------------------------------------

    def start(self, timeout: float = 30.0, *, cancel: threading.Event | None = None) -> None:
        """Start the server (initialising the cluster on first use) and wait until it accepts.

        ``cancel``, set from another thread, abandons a start in progress: whatever it had
        started is stopped and :class:`EmbeddedPostgresCancelled` raised, so a caller that
        gives up on a start (it runs in a thread, which cannot be interrupted) leaves
        nothing behind, whenever the thread gets to notice."""
        if self.running:
            return
        cancel = cancel if cancel is not None else threading.Event()
        run_as = _run_as()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if run_as:
            _let_traverse(self.data_dir)
        self._check_cancel(cancel)
        self._initdb(run_as)
        stale = self.data_dir / "postmaster.pid"
        if stale.exists():
            self._clear_stale_pid(stale, run_as)
        log = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        try:
            with self._lock:  # stop() and this start agree on whether there is a process
                self._check_cancel(cancel)
                self._proc = subprocess.Popen(
                    [
                        str(_bin_dir() / "postgres"),
                        "-D", str(self.data_dir),
                        "-h", self.host,
                        "-p", str(self.port),
                        "-k", str(self.data_dir),
                        "-c", "fsync=on",
                        "-c", f"max_connections={self.max_connections}",
                        "-c", "shared_buffers=64MB",
                    ],
                    **_as_user(run_as),
                    stdout=log,
                    stderr=log,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
                self._owner_file.write_text(f"{os.getpid()}\n")
        finally:
            if log is not subprocess.DEVNULL:
                log.close()  # type: ignore[union-attr]
        try:
            self._wait_ready(timeout, cancel)
            self._create_database(run_as)
            self._check_cancel(cancel)
        except BaseException:
            self.stop("fast", 10.0)
            raise

    def _check_cancel(self, cancel: threading.Event) -> None:
        if cancel.is_set():
            raise EmbeddedPostgresCancelled(f"the start of PostgreSQL on {self.data_dir} was "
                                            "cancelled")

    @property
    def _owner_file(self) -> Path:
        """Beside the data directory (ours; the data directory may be the server user's):
        the pid of the process that started the server on it last."""
        return self.data_dir.parent / f".{self.data_dir.name}.owner"

    def _say(self, text: str) -> None:
        if self.log is not None:
            self.log(text)

    def _clear_stale_pid(self, pidfile: Path, run_as: str | None) -> None:
        """A postmaster.pid is there: clear it if stale; stop the server it names if that is
        provably an orphan of ours; refuse when another live owner runs it."""
        try:
            pid = int(pidfile.read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            pid = 0
        if pid > 0 and process_alive(pid):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                cmdline = b""
            if b"postgres" in cmdline and str(self.data_dir).encode() in cmdline:
                orphan = self._orphan_reason(pid, run_as)
                if orphan is None:
                    raise EmbeddedPostgresError(
                        f"a PostgreSQL (pid {pid}) already runs on {self.data_dir}; stop it first"
                    )
                self._stop_orphan(pid, orphan)
        pidfile.unlink(missing_ok=True)

    def _orphan_reason(self, pid: int, run_as: str | None) -> str | None:
        """Why the postmaster ``pid`` is an orphan of ours, or None when that is not proven:
        it must run our binary, as our server user, in our data directory, and its parent must
        no longer be the process that started it (that one died; the kernel reparented it)."""
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
            cwd = os.readlink(f"/proc/{pid}/cwd")  # the postmaster chdirs into its PGDATA
            uid = os.stat(f"/proc/{pid}").st_uid
            ppid = _parent(pid)
        except OSError:
            return None
        if exe != os.path.realpath(_bin_dir() / "postgres"):
            return None
        if cwd != os.path.realpath(self.data_dir):
            return None
        if uid != (pwd.getpwnam(run_as).pw_uid if run_as else os.geteuid()):
            return None
        try:
            owner = int(self._owner_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            owner = None
        if owner is not None and ppid != owner:
            return (f"the process that started it (pid {owner}) is gone; "
                    f"its parent is now pid {ppid}")
        if owner is None and ppid == 1:
            return "its parent is now pid 1"
        return None

    def _stop_orphan(self, pid: int, reason: str, timeout: float = 30.0) -> None:
        self._say(f"a PostgreSQL (pid {pid}) left running on {self.data_dir} by a supervisor "
                  f"that died ({reason}): stopping it (fast shutdown)")
        for sig, wait in ((signal.SIGINT, timeout), (signal.SIGQUIT, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while process_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if not process_alive(pid):
                self._say(f"the orphaned PostgreSQL (pid {pid}) has stopped")
                return
        raise EmbeddedPostgresError(
            f"the orphaned PostgreSQL (pid {pid}) on {self.data_dir} did not stop; stop it first"
        )

    def _wait_ready(self, timeout: float, cancel: threading.Event) -> None:
        deadline = time.monotonic() + timeout
        isready = str(_bin_dir() / "pg_isready")
        while True:
            self._check_cancel(cancel)
            proc = self._proc
            if proc is None:  # stop() ran meanwhile
                raise EmbeddedPostgresCancelled("postgres was stopped during its start")
            if proc.poll() is not None:
                raise EmbeddedPostgresError(
                    f"postgres exited with code {proc.returncode} during start"
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
        with self._lock:
            proc = self._proc
        if proc is None or proc.poll() is not None:
            self._forget(proc)
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(_STOP_SIGNALS[mode])
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        self._forget(proc)

    def kill(self) -> None:
        """SIGKILL the postmaster and its children (a crash, not a shutdown)."""
        with self._lock:
            proc = self._proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        self._forget(proc)

    def _forget(self, proc: subprocess.Popen[bytes] | None) -> None:
        with self._lock:
            if self._proc is proc:
                self._proc = None

    def restart(self, mode: StopMode = "fast") -> None:
        self.stop(mode)
        self.start()

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop("fast")


def _literal(text: str) -> str:
    """``text`` as an SQL string literal (standard_conforming_strings, PostgreSQL's default)."""
    return "'" + text.replace("'", "''") + "'"


def _identifier(text: str) -> str:
    """``text`` as a quoted SQL identifier: any name PostgreSQL allows, quotes included."""
    return '"' + text.replace('"', '""') + '"'


def _parent(pid: int) -> int:
    # /proc/<pid>/stat: "pid (comm) state ppid ..."; comm may hold spaces and parentheses.
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[1])


def process_alive(pid: int) -> bool:
    """Does ``pid`` run (a zombie, waiting for a parent that is not us to reap it, does not)?"""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].split()[0] not in ("Z", "X")
