"""The log output: lines in batches, in order, none lost; at once for warnings, at DEBUG
and at exit; the flusher thread never takes a stop signal."""

from __future__ import annotations

import io
import logging
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from callahead.process import logoutput
from callahead.process.logoutput import BufferedHandler, SecondFormatter
from tests.harness.waiting import wait_for


class CountingStream(io.StringIO):
    """A stream that counts its writes, and fails them while ``broken`` (OSError) or
    ``unwritable`` (ValueError, as an encoding error or a closed stream raises)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.broken = False
        self.unwritable = False

    def write(self, text: str) -> int:
        if self.broken:
            raise BrokenPipeError("journal gone")
        if self.unwritable:
            raise UnicodeEncodeError("ascii", text, 0, 1, "not ascii")
        self.writes += 1
        return super().write(text)


@pytest.fixture
def stream() -> CountingStream:
    return CountingStream()


@pytest.fixture
def logger(request: pytest.FixtureRequest) -> Iterator[logging.Logger]:
    log = logging.getLogger(f"test.logoutput.{request.node.name}")
    log.propagate = False
    log.setLevel(logging.DEBUG)
    yield log
    for handler in log.handlers:
        handler.close()
    log.handlers.clear()


def attach(logger: logging.Logger, handler: BufferedHandler) -> BufferedHandler:
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger.addHandler(handler)
    return handler


def test_lines_wait_and_go_out_together_in_order(
    logger: logging.Logger, stream: CountingStream
) -> None:
    handler = attach(logger, BufferedHandler(stream, delay=3600))
    for i in range(100):
        logger.info("decision %d", i)
    assert stream.getvalue() == ""  # no write per line
    handler.flush()
    assert stream.getvalue() == "".join(f"INFO decision {i}\n" for i in range(100))
    assert stream.writes == 1


def test_the_flusher_writes_them_within_its_delay(
    logger: logging.Logger, stream: CountingStream
) -> None:
    attach(logger, BufferedHandler(stream, delay=0.05))
    logger.info("one")
    logger.info("two")
    wait_for(lambda: stream.getvalue() == "INFO one\nINFO two\n", 5.0, what="the timed flush")


def test_a_warning_goes_out_at_once_after_the_lines_before_it(
    logger: logging.Logger, stream: CountingStream
) -> None:
    attach(logger, BufferedHandler(stream, delay=3600))
    logger.info("before")
    logger.warning("primary down")
    assert stream.getvalue() == "INFO before\nWARNING primary down\n"


def test_a_full_buffer_goes_out_at_once(logger: logging.Logger, stream: CountingStream) -> None:
    attach(logger, BufferedHandler(stream, delay=3600, limit=1000))
    for _ in range(9):
        logger.info("x" * 99)  # 105 characters with "INFO " and the newline
    assert stream.writes == 0
    logger.info("x" * 99)  # 1050: over the limit
    assert stream.writes == 1
    assert stream.getvalue().count("\n") == 10


def test_a_failed_write_keeps_the_lines_for_the_next(
    logger: logging.Logger, stream: CountingStream
) -> None:
    handler = attach(logger, BufferedHandler(stream, delay=3600))
    stream.broken = True
    logger.info("kept")
    logger.warning("also kept")  # its write fails
    stream.broken = False
    handler.flush()
    assert stream.getvalue() == "INFO kept\nWARNING also kept\n"


def test_while_writes_fail_only_the_oldest_beyond_the_bound_go_and_are_counted(
    logger: logging.Logger, stream: CountingStream
) -> None:
    handler = attach(logger, BufferedHandler(stream, delay=3600, limit=100))
    stream.broken = True
    line = "y" * (logoutput.KEPT_LIMIT // 10)
    for i in range(20):
        logger.info("%d %s", i, line)
    stream.broken = False
    handler.flush()
    out = stream.getvalue().splitlines()
    assert out[0].endswith("log line(s) lost: standard error could not be written")
    lost = int(out[0].split()[0])
    assert lost > 0
    kept = [int(x.split()[1]) for x in out[1:]]
    assert kept == list(range(lost, 20))  # the newest, in order


def test_close_writes_what_waits(logger: logging.Logger, stream: CountingStream) -> None:
    handler = attach(logger, BufferedHandler(stream, delay=3600))
    logger.info("last words")
    handler.close()
    assert stream.getvalue() == "INFO last words\n"


def test_the_flusher_thread_blocks_every_signal(stream: CountingStream) -> None:
    handler = BufferedHandler(stream, delay=3600)
    try:
        flusher = next(t for t in threading.enumerate() if t is handler._flusher)
        status = Path(f"/proc/self/task/{flusher.native_id}/status").read_text()
        mask = next(x for x in status.splitlines() if x.startswith("SigBlk:"))
        blocked = int(mask.split()[1], 16)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            assert blocked & (1 << (signum - 1)), signum
        # ... and the thread that started it kept its own mask.
        assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    finally:
        handler.close()


def test_at_debug_every_line_goes_out_at_once(stream: CountingStream) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        handler = logoutput.configure(logging.DEBUG, stream)
        logging.getLogger("callahead.test").debug("now")
        assert stream.getvalue().endswith("DEBUG now\n")
        handler.close()
        handler = logoutput.configure(logging.INFO, stream)
        logging.getLogger("callahead.test").info("later")
        assert "later" not in stream.getvalue()
        handler.close()
        assert stream.getvalue().endswith("INFO later\n")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)


def test_the_time_stamp_is_the_standard_one() -> None:
    record = logging.LogRecord("n", logging.INFO, "f", 1, "m", None, None)
    assert SecondFormatter().formatTime(record) == logging.Formatter().formatTime(record)
    record.created += 1.5
    record.msecs = 500.0
    assert SecondFormatter().formatTime(record) == logging.Formatter().formatTime(record)


def test_text_the_stream_cannot_take_does_not_hold_back_later_lines(
    logger: logging.Logger, stream: CountingStream
) -> None:
    handler = attach(logger, BufferedHandler(stream, delay=3600))
    stream.unwritable = True
    logger.info("cannot go")
    handler.flush()  # ValueError: dropped, counted
    stream.unwritable = False
    logger.info("later")
    handler.flush()
    assert stream.getvalue() == (
        "1 log line(s) lost: standard error could not be written\nINFO later\n"
    )
