"""A background process with its output in a log file, started until it is ready and
always stopped: SIGTERM, then SIGKILL after a grace period."""

from __future__ import annotations

import contextlib
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from tests.harness.lifecycle import StartStop
from tests.harness.waiting import wait_for


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; always reaps."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class ManagedProcess(StartStop):
    """``argv`` run with stdout and stderr appended to ``log_path``.

    ``start`` returns once ``ready()`` is true, and raises (after stopping it) if the
    process exits first or ``start_timeout`` passes. ``stop_timeout`` is the grace
    period after SIGTERM (libmilter may need ~5 s to wind down)."""

    def __init__(
        self,
        argv: Sequence[str],
        log_path: Path,
        *,
        what: str,
        ready: Callable[[], bool],
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        start_timeout: float = 20.0,
        stop_timeout: float = 10.0,
    ) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self._what = what
        self._ready = ready
        self._env = dict(env) if env is not None else None
        self._cwd = cwd
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                self.argv,
                env=self._env,
                cwd=self._cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_for(
                lambda: self.exited() or self._ready(),
                self._start_timeout,
                what=self._what,
            )
        except BaseException:
            self.stop()
            raise
        if self.exited():
            self.stop()
            raise RuntimeError(f"{self._what} exited at start:\n{self.log()}")

    def exited(self) -> bool:
        return self._proc is not None and self._proc.poll() is not None

    @property
    def returncode(self) -> int | None:
        """The exit status once it has exited (negative: killed by that signal)."""
        return None if self._proc is None else self._proc.poll()

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc, self._stop_timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
