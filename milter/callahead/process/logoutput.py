"""Where ``callahead serve``'s log lines go: standard error (the journal under systemd),
one line per record, written in batches.

A decision line per recipient is the product, but a ``write`` system call per line was
a fifth of the warm policy path's CPU. ``BufferedHandler`` formats each record when it
is logged (so the line says what was true then) and keeps it; the lines go out
together at most ``FLUSH_DELAY`` seconds later, at once for a warning or worse, when
``BUFFER_LIMIT`` bytes wait, and at exit (``logging.shutdown``, which ``serve`` also
calls before its immediate exit on a second stop signal). Nothing is dropped: a line
that cannot be written now is written by the next flush, and a full pipe (a stalled
journal) blocks the logging thread as a direct write would. At ``DEBUG`` every line is
written at once, for following a problem as it happens.

The records also skip what the format does not use: the caller's file and line, the
thread and the multiprocessing names; the time stamp's text is kept for the second.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import TextIO

FORMAT = "%(asctime)s %(name)s[%(process)d]: %(levelname)s %(message)s"
FLUSH_DELAY = 0.2
"""Seconds a line may wait before it is written."""
BUFFER_LIMIT = 64 * 1024
"""Characters waiting that make the next line flush them all at once."""
KEPT_LIMIT = 16 * BUFFER_LIMIT
"""Characters kept while standard error cannot be written; beyond, the oldest go."""


class SecondFormatter(logging.Formatter):
    """``logging.Formatter`` with ``asctime`` built once per second (the milliseconds
    appended per record), not with ``strftime`` per record."""

    def __init__(self, fmt: str = FORMAT) -> None:
        super().__init__(fmt)
        self._second = -1
        self._text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._text = time.strftime(self.default_time_format, self.converter(second))
            self._second = second
        return f"{self._text},{int(record.msecs):03d}"


class BufferedHandler(logging.Handler):
    """Writes formatted lines to ``stream`` in batches (see the module's docstring).

    One lock (the handler's own) covers both the list of waiting lines and the write, so
    lines come out in the order they were logged, from any thread."""

    def __init__(
        self, stream: TextIO, *, delay: float = FLUSH_DELAY, limit: int = BUFFER_LIMIT
    ) -> None:
        super().__init__()
        self._stream = stream
        self._delay = delay
        self._limit = limit
        self._waiting: list[str] = []
        self._size = 0
        self._lost = 0
        self._stop = threading.Event()
        self._flusher = threading.Thread(target=self._run, name="callahead-log", daemon=True)
        if not delay:
            return
        # Started with every signal blocked, which it keeps: a stop signal must reach the
        # thread that waits for it (server.py), never kill the process from this one.
        before = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            self._flusher.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)

    def emit(self, record: logging.LogRecord) -> None:
        # Called by Handler.handle with the handler's lock held.
        try:
            line = self.format(record)
        except Exception:  # noqa: BLE001 -- logging's own contract: report, never raise
            self.handleError(record)
            return
        self._waiting.append(line)
        self._size += len(line) + 1
        if record.levelno >= logging.WARNING or self._size >= self._limit or not self._delay:
            self._write()

    def _write(self) -> None:
        """Write what waits; the caller holds the lock."""
        if not self._waiting:
            return
        text = "\n".join(self._waiting) + "\n"
        if self._lost:
            text = f"{self._lost} log line(s) lost: standard error could not be written\n" + text
        try:
            self._stream.write(text)
            self._stream.flush()
        except ValueError:
            # A closed stream (at exit) or text it cannot take: trying again would fail
            # the same way, and hold back every later line.
            self._lost += len(self._waiting)
            self._waiting.clear()
            self._size = 0
            return
        except OSError:
            # Kept for the next flush (a full or broken pipe may recover), up to
            # KEPT_LIMIT: then the oldest go, counted.
            while self._size > KEPT_LIMIT and self._waiting:
                self._size -= len(self._waiting.pop(0)) + 1
                self._lost += 1
            return
        self._waiting.clear()
        self._size = 0
        self._lost = 0

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]  # created in Handler.__init__
            self._write()

    def _run(self) -> None:
        while not self._stop.wait(self._delay):
            self.flush()

    def close(self) -> None:
        self._stop.set()
        self.flush()
        super().close()


def configure(level: int, stream: TextIO) -> BufferedHandler:
    """The root logger at ``level``, writing through one ``BufferedHandler``."""
    logging._srcfile = None  # the documented switch: no caller lookup
    logging.logThreads = False
    logging.logMultiprocessing = False
    # At DEBUG an operator follows a problem as it happens: every line at once.
    handler = BufferedHandler(stream, delay=0.0 if level <= logging.DEBUG else FLUSH_DELAY)
    handler.setFormatter(SecondFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    return handler
