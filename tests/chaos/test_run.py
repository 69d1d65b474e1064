"""``python -m chaos run``: options refused before anything starts, a fault that met no load
fails the verdict, and a run stopped by a signal stops its stack and removes its scratch
directory (a SIGTERMed run left PostgreSQL running)."""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import psutil
import pytest

from chaos import run
from chaos.system import Fault, Judged

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--faults", "kill,bogus"], "--faults: unknown fault bogus; choose from kill, hang,"),
        (["--faults", "hang", "--url", "http://127.0.0.1:3000"],
         "--faults needs a stack of our own"),
        (["--settle", "-1"], "--settle must be a number of seconds >= 0, got -1.0"),
        (["--settle", "nan"], "--settle must be a number of seconds >= 0, got nan"),
        (["--workers", "0"], "--workers must be at least 1"),
        (["--faults", ","], "--faults ',' names no fault; choose from kill, hang,"),
        (["--faults", ""], "--faults '' names no fault; choose from kill, hang,"),
        (["--log", "/nonexistent-chaos-dir/run.log"],
         "--log /nonexistent-chaos-dir/run.log: cannot write it: No such file or directory"),
        (["--log", "/"], "--log /: cannot write it: Is a directory"),
        (["--url", "http://[::1"], "--url is not a URL like http://127.0.0.1:3000"),
        (["--url", "ftp://x"], "--url must be an http:// URL"),
        (["--url", "http://127.0.0.1:99999"], "--url is not a URL"),
        (["--url", "http://127.0.0.1:3000/api"], "--url must be the stack's address alone"),
    ],
)
def test_bad_options_are_refused_before_anything_starts(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert run.main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.fixture
def scratch() -> Iterator[Path]:
    """The TMPDIR of the run: under /tmp, where the embedded PostgreSQL's own user can reach its
    data (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="chaos-signal-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def processes_under(path: Path) -> list[str]:
    """Command lines of processes that name ``path`` (a PostgreSQL started there names its -D)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if str(path) in cmdline:
                found.append(cmdline)
    return found


def postgres_of(path: Path) -> list[psutil.Process]:
    """The PostgreSQL running on the one data directory under ``path``: the postmaster its
    postmaster.pid names, and the postmaster's children."""
    (pidfile,) = path.glob("**/pgdata/postmaster.pid")
    postmaster = psutil.Process(int(pidfile.read_text().split()[0]))
    return [postmaster, *postmaster.children(recursive=True)]


def running(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running (the same processes: psutil checks the start time, not just the pid;
    a zombie left to a parent that does not reap it is not running)."""
    left = []
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                left.append(process)
    return left


class ChaosRun:
    """``python -m chaos run ARGS`` in a child process with ``TMPDIR`` at ``scratch`` (under
    ``prefix``, ``nohup`` say), its output read as it comes."""

    def __init__(self, args: list[str], scratch: Path, prefix: Sequence[str] = ()) -> None:
        env = {**os.environ, "TMPDIR": str(scratch), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "chaos", "run", *args],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._ended = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    @property
    def text(self) -> str:
        with self._changed:
            return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = 120.0) -> str:
        """Until a line holding ``text`` is out (fails if the run ends or the time is up first);
        returns that line."""
        def seen() -> str | None:
            return next((line for line in self.lines if text in line), None)

        with self._changed:
            self._changed.wait_for(lambda: seen() is not None or self._ended, timeout)
            line = seen()
        assert line is not None, f"no {text!r} in:\n{self.text}"
        return line

    def signal(self, signum: signal.Signals) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 60.0) -> int:
        status = self.proc.wait(timeout)
        self._reader.join(10)
        return status

    def __enter__(self) -> ChaosRun:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def test_a_fault_whose_window_holds_no_request_fails_the_verdict() -> None:
    """A fault that met no load tested nothing. A full run once passed with its last two faults
    after the load had ended (a fixed request budget ran out first): the row now says so, and
    the verdict is FAIL."""
    quiet = Judged(Fault("PostgreSQL restarted (fast)", "database", 10.0, 10.5, 12.0),
                   0, [], [], [])
    assert not quiet.ok
    # A steady window is empty by choice under --settle 0: that is no failure.
    assert Judged(Fault("steady load (no fault)", "none", 0.0, 0.0, 0.0), 0, [], [], []).ok
    report = run.Report(judged=[quiet])
    assert not report.ok
    assert re.search(r"PostgreSQL restarted \(fast\) +0 +0 +0 +0 +- +no request ended in "
                     r"this window \(the load had stopped\): nothing was tested",
                     run.table(report))


@pytest.mark.parametrize(
    ("signum", "when"),
    [(signal.SIGTERM, "running: faults"), (signal.SIGHUP, "running: faults"),
     (signal.SIGINT, "running: faults"), (signal.SIGTERM, "starting the stack")],
    ids=["SIGTERM under load", "SIGHUP under load", "Ctrl-C under load",
         "SIGTERM while starting"],
)
def test_a_signal_stops_the_stack_and_removes_the_scratch_directory(
    scratch: Path, signum: signal.Signals, when: str
) -> None:
    with ChaosRun(["--faults", "kill", "--settle", "60"], scratch) as chaos:
        chaos.wait_for(when)
        assert any(scratch.iterdir())  # the run's scratch directory exists
        chaos.signal(signum)
        assert chaos.wait() == 128 + signum.value, chaos.text
    text = chaos.text
    assert "Traceback" not in text
    assert f"stopped by {signum.name}: the stack is stopped, its scratch data removed" in text
    assert processes_under(scratch) == []
    assert list(scratch.iterdir()) == []


#: What the stack's log shows when a stop was hurried: a child killed without its drain, or
#: PostgreSQL stopped (or killed) without its fast shutdown.
HURRIED = ("the stop is forced: SIGKILL", "stopping the database (immediate)",
           "killing the database")


@pytest.mark.parametrize("data_dir", [False, True], ids=["scratch directory", "--data-dir"])
def test_a_second_signal_hurries_the_stop_instead_of_cutting_it_short(
    scratch: Path, tmp_path: Path, data_dir: bool
) -> None:
    """The stop after a first signal is under way (the balancer drains a request the test
    leaves half sent) when a second signal comes: the stop goes on, killing what still runs;
    no PostgreSQL of the run is left, and the first signal gives the exit status."""
    log = tmp_path / "programs.log"
    data = scratch / "data"
    args = ["--faults", "kill", "--settle", "60", "--log", str(log)]
    with ChaosRun(args + (["--data-dir", str(data)] if data_dir else []), scratch) as chaos:
        started = chaos.wait_for("starting the stack")
        balancer = re.search(r"balancer at http://127\.0\.0\.1:(\d+)", started)
        assert balancer is not None, started
        chaos.wait_for("running: faults")
        postgres = postgres_of(scratch)
        with socket.create_connection(("127.0.0.1", int(balancer[1]))) as held:
            held.sendall(b"POST /set_var HTTP/1.1\r\nHost: chaos\r\nContent-Type: "
                         b"application/json\r\nContent-Length: 100\r\n\r\n{")
            chaos.signal(signal.SIGTERM)
            chaos.wait_for("stopping the stack")
            chaos.signal(signal.SIGINT)
            assert chaos.wait() == 128 + signal.SIGTERM.value, chaos.text
    text = chaos.text
    assert "Traceback" not in text
    assert "SIGTERM: stopping (another signal stops at once)" in text
    assert "SIGINT again: stopping at once" in text
    assert any(line in log.read_text() for line in HURRIED), log.read_text()
    assert running(postgres) == []
    assert processes_under(scratch) == []
    if data_dir:
        assert f"stopped by SIGTERM: the stack is stopped, its data kept in {data}" in text
        assert (data / "stack" / "pgdata" / "PG_VERSION").exists()
        assert not (data / "stack" / "pgdata" / "postmaster.pid").exists()
    else:
        assert "stopped by SIGTERM: the stack is stopped, its scratch data removed" in text
        assert list(scratch.iterdir()) == []


def test_a_signal_while_the_stack_stops_at_the_end_of_a_run_hurries_it_and_the_report_stands(
    scratch: Path,
) -> None:
    """The run is over and measured; a signal during its stop hurries the stop, which still
    ends with no PostgreSQL left and the scratch directory gone; the report is printed and
    gives the exit status (the signal stopped nothing the run was doing)."""
    with ChaosRun(["--faults", "kill", "--settle", "0"], scratch) as chaos:
        chaos.wait_for("running: faults")
        postgres = postgres_of(scratch)
        chaos.wait_for("stopping the stack")
        chaos.signal(signal.SIGTERM)
        status = chaos.wait()
    text = chaos.text
    assert "Traceback" not in text
    assert "SIGTERM while the stack stops: stopping at once" in text
    assert "stopped by" not in text
    assert "verdict: " in text
    assert status == (0 if "verdict: PASS" in text else 1), text
    assert running(postgres) == []
    assert processes_under(scratch) == []
    assert list(scratch.iterdir()) == []


def test_a_signal_with_url_stops_the_load_and_says_the_stack_is_left_running(
    scratch: Path,
) -> None:
    """--url: nothing of ours to stop but the load; the message does not claim a stack or a
    scratch directory of ours."""
    with socket.create_server(("127.0.0.1", 0), backlog=64) as target:  # accepts nothing
        url = f"http://127.0.0.1:{target.getsockname()[1]}"
        with ChaosRun(["--url", url, "--quick"], scratch) as chaos:
            chaos.wait_for("targeting")
            chaos.signal(signal.SIGTERM)
            assert chaos.wait() == 128 + signal.SIGTERM.value, chaos.text
    text = chaos.text
    assert "Traceback" not in text
    assert "SIGTERM: stopping the load" in text
    assert (f"stopped by SIGTERM: the load is stopped; the stack at {url} is not ours, it keeps "
            "running") in text


def test_a_url_nobody_answers_on_is_named_before_any_load(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as holder:  # bound, never listening: connects are refused
        holder.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{holder.getsockname()[1]}"
        assert run.main(["--url", url + "/", "--quick"]) == 1  # a trailing slash is fine
    out = capsys.readouterr().out
    assert f"cannot run against {url}: nothing answers at {url} (ClientConnectorError" in out
    assert "Traceback" not in out
    assert "requests:" not in out


class _HealthyButStoresNothing(http.server.BaseHTTPRequestHandler):
    """Answers /healthcheck 200 and every other request 404: not a stack that stores."""

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        status = 200 if self.path == "/healthcheck" else 404
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = do_PUT = do_DELETE = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_a_url_that_acknowledges_no_write_fails_the_verdict(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Every 4xx is an answer, so the load sees no failure; but with no write acknowledged
    nothing was tested, and that is no PASS."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HealthyButStoresNothing)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert run.main(["--url", url, "--quick"]) == 1
    finally:
        server.shutdown()
        server.server_close()
    out = capsys.readouterr().out
    assert "final state read from the API; NOTHING WAS ACKNOWLEDGED: no write was tested" in out
    assert "verdict: FAIL" in out


def test_under_nohup_a_hangup_does_not_stop_the_run(scratch: Path) -> None:
    """``nohup`` asks that a closed terminal not stop the program: SIGHUP stays ignored (the
    handler undid that), and a SIGTERM after it is the one that stops the run."""
    with ChaosRun(["--faults", "kill", "--settle", "60"], scratch, prefix=["nohup"]) as chaos:
        chaos.wait_for("running: faults")
        chaos.signal(signal.SIGHUP)  # ignored at once: never pending, never handled
        chaos.signal(signal.SIGTERM)
        assert chaos.wait() == 128 + signal.SIGTERM.value, chaos.text
    assert "SIGHUP" not in chaos.text
    assert "stopped by SIGTERM: the stack is stopped, its scratch data removed" in chaos.text
    assert processes_under(scratch) == []
    assert list(scratch.iterdir()) == []
