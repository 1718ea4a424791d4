"""smtp-source and smtp-sink as bounded subprocesses, and small /proc readers."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from tests.harness.ports import free_port
from tests.harness.waiting import wait_for


def tool(name: str) -> str:
    found = shutil.which(name)
    return found if found is not None else f"/usr/sbin/{name}"


SMTP_SOURCE = tool("smtp-source")
SMTP_SINK = tool("smtp-sink")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------
# smtp-sink: where the backup delivers
# --------------------------------------------------------------------------------------


class SmtpSink:
    """``smtp-sink`` on a fresh 127.0.0.1 port: answers 250 to everything, keeps nothing."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self._log = workdir / "smtp-sink.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self._log.open("ab") as log:
            # -u: it refuses to run as root otherwise; 256: the listen backlog.
            self._proc = subprocess.Popen(
                [SMTP_SINK, "-u", "nobody", f"127.0.0.1:{self.port}", "256"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_for(
                lambda: self._exited() or accepts(self.port),
                10.0,
                what=f"smtp-sink on port {self.port}",
            )
        except BaseException:
            self.stop()
            raise
        if self._exited():
            raise RuntimeError(f"smtp-sink exited at start: {self._log.read_text()}")

    def _exited(self) -> bool:
        return self._proc is not None and self._proc.poll() is not None

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        stop_process(proc)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class TrivialMilterProcess:
    """``python -m bench.trivial_milter`` on a fresh port (see that module)."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self._log = workdir / "trivial-milter.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> str:
        return f"inet:127.0.0.1:{self.port}"

    def start(self) -> None:
        with self._log.open("ab") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "bench.trivial_milter", f"inet:{self.port}@127.0.0.1"],
                cwd=Path(__file__).resolve().parents[1],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_for(
                lambda: self._proc is None or self._proc.poll() is not None or listening(self.port),
                20.0,
                what=f"the trivial milter on port {self.port}",
            )
        except BaseException:
            self.stop()
            raise
        if self._proc is None or self._proc.poll() is not None:
            raise RuntimeError(f"the trivial milter exited at start: {self._log.read_text()}")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            # libmilter may need ~5 s to wind down after SIGTERM.
            stop_process(proc, timeout=10.0)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


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


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------
# smtp-source: the load for warm and cold
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceResult:
    messages: int
    """Messages whose DATA completed (smtp-source's own ``-c`` counter)."""
    seconds: float
    timed_out: bool
    returncode: int
    stderr: str

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        return self.timed_out or self.returncode == 0


_COUNTER = re.compile(rb"(\d+)")


def smtp_source(
    port: int,
    *,
    count: int,
    sessions: int,
    rcpt_base: str,
    sender: str,
    size: int,
    deadline: float,
    workdir: Path,
    processes: int = 1,
) -> SourceResult:
    """``processes`` copies of ``smtp-source -c -N -m COUNT -s SESSIONS -l SIZE -f SENDER
    -t RCPT_BASE``, started together.

    ``-N`` numbers the recipients: message *n* of a process (counted over its sessions,
    from 1) goes to ``<n><RCPT_BASE>``, e.g. ``17w@a.test``, one new connection per
    message; so P processes with ``-m C`` send P*C messages to the same C addresses.
    Whatever still runs after ``deadline`` seconds is killed; then the rate is the
    messages counted so far over the deadline."""
    argv = [
        SMTP_SOURCE,
        "-c",
        "-N",
        "-M",
        "client.test",
        "-l",
        str(size),
        "-m",
        str(count),
        "-s",
        str(sessions),
        "-f",
        sender,
        "-t",
        rcpt_base,
        f"127.0.0.1:{port}",
    ]
    outs = [workdir / f"smtp-source.{i}.out" for i in range(processes)]
    procs: list[subprocess.Popen[bytes]] = []
    errs: list[Path] = [out.with_suffix(".err") for out in outs]
    timed_out = False
    start = time.monotonic()
    try:
        for out, err in zip(outs, errs, strict=True):
            with out.open("wb") as stdout, err.open("wb") as stderr:
                procs.append(
                    subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr)
                )
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, start + deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
                break
        seconds = time.monotonic() - start
    finally:
        for proc in procs:
            stop_process(proc)
    if timed_out:
        seconds = deadline
    messages = 0
    for out in outs:
        counters = _COUNTER.findall(out.read_bytes())
        messages += int(counters[-1]) if counters else 0
    failed = [proc.returncode for proc in procs if proc.returncode != 0]
    return SourceResult(
        messages=messages,
        seconds=seconds,
        timed_out=timed_out,
        returncode=failed[0] if failed and not timed_out else 0,
        stderr=" ".join(err.read_text(errors="replace").strip() for err in errs).strip(),
    )


# --------------------------------------------------------------------------------------
# /proc
# --------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    # After the comm: state(0) ppid pgrp session tty_nr tpgid flags minflt cminflt majflt
    # cmajflt utime(11) stime(12)
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_bytes(pid: int | str = "self") -> int:
    """VmRSS of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _listen_inode(port: int) -> str | None:
    want = f"0100007F:{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) > 9 and fields[1] == want and fields[3] == "0A":
            return fields[9]
    return None


def listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:port, without connecting to it."""
    return _listen_inode(port) is not None


def pid_listening_on(port: int) -> int:
    """The pid of the process that listens on 127.0.0.1:port (from /proc/net/tcp and the
    processes' fd tables), so that no harness internals are needed."""
    inode = _listen_inode(port)
    if inode is None:
        raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")
    target = f"socket:[{inode}]"
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{entry}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{entry}/fd/{fd}") == target:
                        return int(entry)
    raise RuntimeError(f"no process owns the listening socket of port {port}")


class LogCursor:
    """Reads what a log file gained since the last call."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._offset = path.stat().st_size if path.exists() else 0

    def read_new(self) -> str:
        try:
            with self._path.open("rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
        except FileNotFoundError:
            return ""
        # Keep a partial last line for the next call.
        end = data.rfind(b"\n") + 1
        self._offset += end
        return data[:end].decode(errors="replace")
