"""smtp-source and smtp-sink as bounded subprocesses, small /proc readers, and how a
benchmark's ``main`` starts."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from tests.harness.ports import accepts, free_port, listen_inode, listening
from tests.harness.postfix import postfix_available
from tests.harness.process import ManagedProcess, stop_process


def tool(name: str) -> str:
    found = shutil.which(name)
    return found if found is not None else f"/usr/sbin/{name}"


SMTP_SOURCE = tool("smtp-source")
SMTP_SINK = tool("smtp-sink")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------
# smtp-sink: where the backup delivers
# --------------------------------------------------------------------------------------


class SmtpSink(ManagedProcess):
    """``smtp-sink`` on a fresh 127.0.0.1 port: answers 250 to everything, keeps nothing."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        # -u: it refuses to run as root otherwise; 256: the listen backlog.
        super().__init__(
            [SMTP_SINK, "-u", "nobody", f"127.0.0.1:{self.port}", "256"],
            workdir / "smtp-sink.log",
            what=f"smtp-sink on port {self.port}",
            ready=lambda: accepts(self.port),
            start_timeout=10.0,
            stop_timeout=5.0,
        )


class TrivialMilterProcess(ManagedProcess):
    """``python -m bench.trivial_milter`` on a fresh port (see that module)."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        super().__init__(
            [sys.executable, "-m", "bench.trivial_milter", f"inet:{self.port}@127.0.0.1"],
            workdir / "trivial-milter.log",
            cwd=Path(__file__).resolve().parents[1],
            what=f"the trivial milter on port {self.port}",
            ready=lambda: listening(self.port),
        )

    @property
    def socket(self) -> str:
        return f"inet:127.0.0.1:{self.port}"


class TrivialPolicyProcess(ManagedProcess):
    """``python -m bench.trivial_policy`` on a fresh port (see that module)."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        super().__init__(
            [sys.executable, "-m", "bench.trivial_policy", str(self.port)],
            workdir / "trivial-policy.log",
            cwd=Path(__file__).resolve().parents[1],
            what=f"the trivial policy service on port {self.port}",
            ready=lambda: listening(self.port),
        )

    @property
    def service(self) -> str:
        return f"inet:127.0.0.1:{self.port}"


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


def pid_listening_on(port: int) -> int:
    """The pid of the process that listens on 127.0.0.1:port (from /proc/net/tcp and the
    processes' fd tables), so that no harness internals are needed."""
    inode = listen_inode(port)
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


# --------------------------------------------------------------------------------------
# a benchmark's start
# --------------------------------------------------------------------------------------


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def ready_to_run(prog: str) -> bool:
    """Whether Postfix can run here (if not, ``prog`` says why on stderr); if it can, a
    SIGTERM from now on interrupts like Ctrl-C, so that everything started is stopped."""
    ok, why = postfix_available()
    if not ok:
        print(f"{prog}: cannot run Postfix here: {why}", file=sys.stderr)
        return False
    signal.signal(signal.SIGTERM, _terminate)
    return True
