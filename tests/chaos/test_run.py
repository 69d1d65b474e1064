"""``python -m chaos run``: options refused before anything starts, and a run stopped by a signal
stops its stack and removes its scratch directory (a SIGTERMed run left PostgreSQL running)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from chaos import run

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
    env = {**os.environ, "TMPDIR": str(scratch), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "chaos", "run", "--faults", "kill", "--settle", "60"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    assert proc.stdout is not None
    output: list[str] = []
    reached = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            output.append(line)
            if when in line:
                reached.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert reached.wait(120), "".join(output)
        assert any(scratch.iterdir())  # the run's scratch directory exists
        proc.send_signal(signum)
        assert proc.wait(60) == 128 + signum.value, "".join(output)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(10)
        proc.stdout.close()
    text = "".join(output)
    assert "Traceback" not in text
    assert f"stopped by {signum.name}: the stack is stopped, its scratch data removed" in text
    assert processes_under(scratch) == []
    assert list(scratch.iterdir()) == []
