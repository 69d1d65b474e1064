"""The signals that stop each program: SIGINT, SIGTERM and SIGHUP (the terminal closed)."""

from __future__ import annotations

import signal


def stop_signals() -> tuple[signal.Signals, ...]:
    """The stop signals this process should handle: SIGHUP only if it was not started with it
    ignored, since under ``nohup`` a closed terminal must not stop it, and a handler would undo
    what ``nohup`` asked for."""
    hangup = () if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN else (signal.SIGHUP,)
    return (signal.SIGINT, signal.SIGTERM, *hangup)
