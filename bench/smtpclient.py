"""A small bounded SMTP client on asyncio streams, for the attack load and for latency.

Why not smtp-source here: smtp-source aborts a session on a rejected RCPT (and with
``-A`` it goes on to send DATA and the message text as commands), and it cannot time a
single command. This client speaks the minimum (EHLO, MAIL FROM, RCPT TO, DATA only when
a recipient was accepted, QUIT), opens one connection per job, runs a fixed number of
jobs with a fixed number of concurrent sessions, and stops starting jobs at a deadline;
sessions still running at the deadline plus a grace period are cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

HOST = "127.0.0.1"
HELO = "client.test"
SESSION_TIMEOUT = 30.0
"""Seconds one whole session may take (Postfix's own verification needs up to ~6 s)."""


@dataclass(frozen=True)
class Job:
    """One SMTP session: one transaction from ``sender`` to ``rcpts``."""

    sender: str
    rcpts: tuple[str, ...]
    body: bytes | None = None
    """Sent with DATA when at least one recipient is accepted; None: QUIT after RCPT."""
    source: str | None = None
    """The client's own address (a 127.x.y.z of loopback); None: the system's choice."""


@dataclass
class SessionResult:
    job: Job
    rcpt_codes: list[int] = field(default_factory=list)
    rcpt_seconds: list[float] = field(default_factory=list)
    """Time from writing RCPT TO to having its whole reply, per recipient."""
    data_code: int | None = None
    error: str | None = None
    """Set when the session failed (connection refused, timeout, unexpected reply)."""


@dataclass
class LoadResult:
    sessions: list[SessionResult]
    seconds: float
    """From the first connection to the end of the last session."""
    jobs_total: int
    timed_out: bool
    """The deadline stopped the run before every job was started or finished."""

    @property
    def completed(self) -> int:
        return sum(1 for s in self.sessions if s.error is None)

    def rcpt_code_counts(self) -> Counter[int]:
        return Counter(code for s in self.sessions for code in s.rcpt_codes)

    def errors(self) -> Counter[str]:
        return Counter(s.error for s in self.sessions if s.error is not None)


class SmtpReplyError(Exception):
    """The server answered a command with an unexpected code."""


async def _reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    lines: list[str] = []
    while True:
        raw = await reader.readline()
        if not raw:
            raise ConnectionError("server closed the connection")
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        lines.append(line)
        if len(line) < 4 or line[3] != "-":
            break
    try:
        code = int(lines[-1][:3])
    except ValueError:
        raise SmtpReplyError(f"malformed reply {lines[-1]!r}") from None
    return code, "\n".join(lines)


async def _command(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: str
) -> tuple[int, str]:
    writer.write(line.encode() + b"\r\n")
    await writer.drain()
    return await _reply(reader)


def _expect(what: str, reply: tuple[int, str], *ok: int) -> None:
    if reply[0] not in ok:
        raise SmtpReplyError(f"{what}: {reply[1][:120]}")


async def session(port: int, job: Job, *, host: str = HOST) -> SessionResult:
    """Run one job on a fresh connection; never raises for SMTP or network failures."""
    result = SessionResult(job)
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(SESSION_TIMEOUT):
            local = None if job.source is None else (job.source, 0)
            reader, writer = await asyncio.open_connection(host, port, local_addr=local)
            _expect("banner", await _reply(reader), 220)
            _expect("EHLO", await _command(reader, writer, f"EHLO {HELO}"), 250)
            _expect("MAIL", await _command(reader, writer, f"MAIL FROM:<{job.sender}>"), 250)
            for rcpt in job.rcpts:
                start = time.perf_counter()
                code, _ = await _command(reader, writer, f"RCPT TO:<{rcpt}>")
                result.rcpt_seconds.append(time.perf_counter() - start)
                result.rcpt_codes.append(code)
            if job.body is not None and 250 in result.rcpt_codes:
                reply = await _command(reader, writer, "DATA")
                _expect("DATA", reply, 354)
                writer.write(job.body.replace(b"\r\n.", b"\r\n..") + b"\r\n.\r\n")
                await writer.drain()
                result.data_code, _ = await _reply(reader)
            await _command(reader, writer, "QUIT")
    except TimeoutError:
        result.error = f"session took more than {SESSION_TIMEOUT:g}s"
    except (OSError, SmtpReplyError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    return result


async def _run_load(
    port: int, jobs: Sequence[Job], concurrency: int, deadline: float
) -> LoadResult:
    results: list[SessionResult] = []
    pending = iter(jobs)
    start = time.monotonic()
    stop_at = start + deadline

    async def worker() -> None:
        for job in pending:
            if time.monotonic() >= stop_at:
                return
            results.append(await session(port, job))

    tasks = [asyncio.create_task(worker()) for _ in range(max(1, concurrency))]
    # Sessions that started before the deadline may finish within one session timeout.
    _, late = await asyncio.wait(tasks, timeout=deadline + SESSION_TIMEOUT)
    for task in late:
        task.cancel()
    if late:
        await asyncio.wait(late)
    seconds = time.monotonic() - start
    return LoadResult(
        sessions=results,
        seconds=seconds,
        jobs_total=len(jobs),
        timed_out=len(results) < len(jobs) or bool(late),
    )


def run_load(port: int, jobs: Sequence[Job], *, concurrency: int, deadline: float) -> LoadResult:
    """Run ``jobs`` against ``127.0.0.1:port`` with ``concurrency`` sessions at a time;
    no job starts after ``deadline`` seconds."""
    return asyncio.run(_run_load(port, jobs, concurrency, deadline))


def message_body(size: int, sender: str = "sender@remote.test") -> bytes:
    """A message with a few headers and ``size`` bytes of body text (like smtp-source
    ``-l``), lines of 76 characters, CRLF line ends, no line starting with a dot."""
    header = f"From: <{sender}>\r\nSubject: callahead benchmark\r\n\r\n".encode()
    line = b"x" * 76 + b"\r\n"
    lines, rest = divmod(size, len(line))
    return header + line * lines + b"y" * rest
