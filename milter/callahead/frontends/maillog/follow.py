"""A mail log file followed as ``tail -F`` does, from its end at start-up, and the thread
that feeds what is read into the ledger.

Rotation: a new file in the path's place (logrotate's rename, ``postfix logrotate``) is
read from its start, and the old one, still open, is read on for ``ROTATE_GRACE``
seconds, for what the writer adds to it before it reopens; a file that got shorter than
what was read (``copytruncate``) is read again from its start. What a writer adds
between logrotate's copy and its truncation is lost for every reader: rename is the
safer rotation. A path that does not exist yet is looked for every poll.

Bounded: at most ``READ_LIMIT`` bytes are read per poll and a partial line is held to
``lines.MAX_LINE`` bytes; a longer line is skipped to its end and counted malformed.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import BinaryIO, Protocol

from .ledger import Ledger
from .lines import MAX_LINE, Event, Result, decode, parse_body, parse_line
from .meter import MaillogMetrics

log = logging.getLogger("callahead.maillog")

READ_LIMIT = 1 << 20
"""Bytes read from the file per poll, at most."""
SKIP_READS = 8
"""Reads in one poll, at most, while they only skip an over-long line."""
ROTATE_GRACE = 5.0
"""Seconds a rotated file is still read after a new one took its place."""
POLL_INTERVAL = 0.25
"""Seconds between two polls that found nothing."""
RETRY_INTERVAL = 1.0
"""Seconds after a failed read before the next."""


class Source(Protocol):
    def poll(self) -> list[tuple[Result, Event | None]]:
        """What is new, parsed (a bounded batch; empty: nothing yet)."""

    def close(self) -> None: ...


class _Tail:
    """One open file, and the part of a line read from it without its end yet."""

    def __init__(self, handle: BinaryIO, inode: tuple[int, int]) -> None:
        self.handle = handle
        self.inode = inode
        self.partial = b""
        self.skipping = False
        """A line over ``MAX_LINE`` is being skipped to its end."""

    def read(self, out: list[tuple[Result, Event | None]]) -> int:
        """Bytes read (at most ``READ_LIMIT``); their whole lines parsed into ``out``."""
        data = self.handle.read(READ_LIMIT)
        if not data:
            return 0
        chunks = (self.partial + data).split(b"\n")
        for raw in chunks[:-1]:
            if self.skipping:
                self.skipping = False
                continue
            out.append(_parse_raw(raw))
        self.partial = chunks[-1]
        if len(self.partial) > MAX_LINE:
            if not self.skipping:
                out.append((Result.MALFORMED, None))
            self.skipping = True
            self.partial = b""
        return len(data)

    def rewind(self) -> None:
        self.handle.seek(0)
        self.partial, self.skipping = b"", False


class FileFollower:
    def __init__(
        self, path: str, metrics: MaillogMetrics, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._path = path
        self._metrics = metrics
        self._clock = clock
        self._tail: _Tail | None = None
        try:
            self._tail = self._open(at_end=True)
        except OSError as exc:  # unreadable for now: polls try again (and say why)
            log.warning("cannot open the mail log %s: %s", path, exc)
        self._old: _Tail | None = None
        self._old_until = 0.0

    def _open(self, *, at_end: bool) -> _Tail | None:
        try:
            handle = open(self._path, "rb")  # noqa: SIM115 -- kept open between polls
        except FileNotFoundError:
            return None
        st = os.fstat(handle.fileno())
        if at_end:
            handle.seek(st.st_size)
        return _Tail(handle, (st.st_dev, st.st_ino))

    def poll(self) -> list[tuple[Result, Event | None]]:
        out: list[tuple[Result, Event | None]] = []
        self._check_rotation()
        if self._old is not None:
            self._old.read(out)
            if self._clock() >= self._old_until:
                self._old.handle.close()
                self._old = None
        if self._tail is not None:
            reads = 1
            # A long line skipped gives nothing: read on (boundedly) rather than wait.
            while self._tail.read(out) and not out and reads < SKIP_READS:
                reads += 1
        return out

    def _check_rotation(self) -> None:
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            return  # moved away, the new one not there yet: read on the open one
        if self._tail is None:
            self._tail = self._open(at_end=False)
            if self._tail is not None:
                self._metrics.reopens.labels("appeared").inc()
        elif (st.st_dev, st.st_ino) != self._tail.inode:
            if self._old is not None:
                self._old.handle.close()
            self._old, self._old_until = self._tail, self._clock() + ROTATE_GRACE
            self._tail = self._open(at_end=False)
            self._metrics.reopens.labels("rotated").inc()
        elif st.st_size < self._tail.handle.tell():
            self._tail.rewind()
            self._metrics.reopens.labels("truncated").inc()

    def close(self) -> None:
        for tail in (self._tail, self._old):
            if tail is not None:
                tail.handle.close()
        self._tail = self._old = None


def _parse_raw(raw: bytes) -> tuple[Result, Event | None]:
    line = decode(raw)
    if line is None:
        return Result.MALFORMED, None
    return parse_line(line)


def parse_entry(entry: dict[str, object]) -> tuple[Result, Event | None]:
    """One journal entry (its ``SYSLOG_IDENTIFIER`` and ``MESSAGE``)."""
    program, message = entry.get("SYSLOG_IDENTIFIER"), entry.get("MESSAGE")
    if not isinstance(program, str) or not isinstance(message, str):
        return Result.MALFORMED, None  # python-systemd hands undecodable fields as bytes
    return parse_body(program, message)


class Pump:
    """Feeds a source's events into the ledger and counts its lines, on its own thread."""

    def __init__(self, source: Source, ledger: Ledger, metrics: MaillogMetrics) -> None:
        self._source = source
        self._ledger = ledger
        self._metrics = metrics
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="callahead-maillog", daemon=True)
        self._results = {r: metrics.lines.labels(r.value) for r in Result}

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def feed(self, batch: Iterable[tuple[Result, Event | None]]) -> None:
        for result, event in batch:
            self._results[result].inc()
            if event is not None:
                self._ledger.read(event)

    def _run(self) -> None:
        said = ""
        try:
            while not self._stop.is_set():
                try:
                    batch = self._source.poll()
                except OSError as exc:
                    self._metrics.errors.inc()
                    if str(exc) != said:  # once per cause, not every second
                        said = str(exc)
                        log.warning("cannot read the mail log (retried every second): %s", exc)
                    self._stop.wait(RETRY_INTERVAL)
                    continue
                if said:
                    said = ""
                    log.info("reading the mail log again")
                self.feed(batch)
                if not batch:
                    self._stop.wait(POLL_INTERVAL)
        finally:
            self._source.close()
