"""The mail log followers: a file as ``tail -F`` follows it, and the journal (a fake
``systemd.journal.Reader`` with the calls python3-systemd's has)."""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from callahead.frontends.maillog import follow
from callahead.frontends.maillog.follow import FileFollower, Pump
from callahead.frontends.maillog.journal import JournalFollower, JournalUnavailable
from callahead.frontends.maillog.ledger import Ledger
from callahead.frontends.maillog.lines import MAX_LINE, Event, Kind, Result
from callahead.frontends.maillog.meter import MaillogMetrics
from callahead.frontends.maillog.meterstart import start_meter
from tests.harness.waiting import wait_for


def removed(n: int) -> bytes:
    return f"Dec 07 12:51:40 backup postfix/qmgr[8790]: A{n:05d}: removed\n".encode()


def drain(f: FileFollower) -> list[tuple[Result, Event | None]]:
    """Every poll's batch until one is empty (a poll reads at most READ_LIMIT)."""
    out: list[tuple[Result, Event | None]] = []
    while batch := f.poll():
        out += batch
    return out


def ids(batch: list[tuple[Result, Event | None]]) -> list[str]:
    return [e.queue_id for _, e in batch if e is not None]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def metrics() -> MaillogMetrics:
    return MaillogMetrics(CollectorRegistry())


@pytest.fixture
def log_path(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "mail.log"
    path.write_bytes(removed(0) + removed(1))
    yield path


def append(path: Path, data: bytes) -> None:
    with path.open("ab") as f:
        f.write(data)


def reopens(metrics: MaillogMetrics, cause: str) -> float:
    return float(metrics.reopens.labels(cause)._value.get())


def test_starts_at_the_end_and_reads_whole_lines(log_path: Path, metrics: MaillogMetrics) -> None:
    f = FileFollower(str(log_path), metrics)
    assert f.poll() == []
    line = removed(2)
    append(log_path, line[:20])
    assert f.poll() == []
    append(log_path, line[20:] + removed(3))
    assert ids(f.poll()) == ["A00002", "A00003"]
    f.close()


def test_rotation_by_rename_loses_no_line(log_path: Path, metrics: MaillogMetrics) -> None:
    clock = Clock()
    f = FileFollower(str(log_path), metrics, clock=clock)
    append(log_path, removed(2))
    log_path.rename(log_path.with_suffix(".log.1"))
    old = log_path.with_suffix(".log.1")
    assert ids(f.poll()) == ["A00002"]  # the new one is not there yet: the old is read on
    append(old, removed(3))  # the writer has not reopened yet
    log_path.write_bytes(removed(4))
    assert ids(f.poll()) == ["A00003", "A00004"]
    append(old, removed(5))  # late, within the grace
    append(log_path, removed(6))
    assert ids(f.poll()) == ["A00005", "A00006"]
    assert reopens(metrics, "rotated") == 1
    clock.now += follow.ROTATE_GRACE
    append(old, removed(7))
    assert ids(f.poll()) == ["A00007"]  # read once more, then closed
    append(old, removed(8))
    assert f.poll() == []
    f.close()


def test_copytruncate_is_read_from_the_start(log_path: Path, metrics: MaillogMetrics) -> None:
    f = FileFollower(str(log_path), metrics)
    append(log_path, removed(2))
    assert ids(f.poll()) == ["A00002"]
    os.truncate(log_path, 0)
    append(log_path, removed(3))
    assert ids(f.poll()) == ["A00003"]
    assert reopens(metrics, "truncated") == 1
    f.close()


def test_a_file_that_appears_later(tmp_path: Path, metrics: MaillogMetrics) -> None:
    path = tmp_path / "later.log"
    f = FileFollower(str(path), metrics)
    assert f.poll() == []
    path.write_bytes(removed(1))
    assert ids(f.poll()) == ["A00001"]
    assert reopens(metrics, "appeared") == 1
    f.close()


def test_hostile_lines_are_skipped(log_path: Path, metrics: MaillogMetrics) -> None:
    f = FileFollower(str(log_path), metrics)
    megabyte = b"y" * (1 << 20)
    append(log_path, removed(1).replace(b"removed", b"rem\0ved"))
    append(log_path, removed(2).replace(b"removed", b"r\xffemoved"))
    append(log_path, megabyte)  # no newline yet: held to MAX_LINE, then skipped
    assert [r for r, _ in drain(f)] == [Result.MALFORMED, Result.MALFORMED, Result.MALFORMED]
    append(log_path, megabyte + b"\n" + removed(3))
    assert drain(f) == [(Result.PARSED, Event(Kind.REMOVED, "A00003"))]
    append(log_path, b"x" * (MAX_LINE + 1) + b"\n" + removed(4))
    batch = drain(f)
    assert [r for r, _ in batch] == [Result.MALFORMED, Result.PARSED]
    f.close()


def test_reads_are_bounded(log_path: Path, metrics: MaillogMetrics) -> None:
    f = FileFollower(str(log_path), metrics)
    line = removed(9)
    count = follow.READ_LIMIT // len(line) + 100
    append(log_path, line * count)
    first = f.poll()
    assert 0 < len(first) < count
    rest = f.poll()
    assert len(first) + len(rest) == count
    f.close()


def test_the_pump_feeds_the_ledger_and_counts(log_path: Path, metrics: MaillogMetrics) -> None:
    ledger = Ledger(metrics)
    ledger.accepted("A00001", "u@example.test", "primary_down")
    pump = Pump(FileFollower(str(log_path), metrics), ledger, metrics)
    pump.start()
    try:
        append(
            log_path,
            b"garbage\n"
            b"Dec 07 12:50:37 backup postfix/smtpd[8801]: connect from x[127.0.0.1]\n"
            b"Dec 07 12:51:40 backup postfix/smtp[8822]: A00001: to=<u@example.test>, "
            b"relay=none, delay=1, delays=1/0/0/0, dsn=2.0.0, status=sent (250 Ok)\n",
        )
        wait_for(lambda: len(ledger) == 0, 5, what="the line read")
    finally:
        pump.stop()
    sample = metrics.outcomes.labels("primary_down", "sent")._value.get()
    assert sample == 1
    for result, n in (("parsed", 1), ("ignored", 1), ("malformed", 1)):
        assert metrics.lines.labels(result)._value.get() == n


class FakeReader:
    """The calls JournalFollower makes of ``systemd.journal.Reader`` (python3-systemd
    235): ``has_runtime_files``, ``has_persistent_files``, ``add_match``, ``seek_tail``,
    ``get_previous``, ``get_next`` (an empty dict at the end), ``wait`` and ``close``."""

    def __init__(self, readable: bool = True) -> None:
        self.readable = readable
        self.matches: list[dict[str, str]] = []
        self.entries: list[dict[str, Any]] = [{"MESSAGE": "old", "SYSLOG_IDENTIFIER": "x"}]
        self.position = 0
        self.waited = 0
        self.closed = False

    def has_runtime_files(self) -> bool:
        return False

    def has_persistent_files(self) -> bool:
        return self.readable

    def add_match(self, **match: str) -> None:
        self.matches.append(match)

    def seek_tail(self) -> None:
        self.position = len(self.entries)

    def get_previous(self) -> dict[str, Any]:
        return self.entries[self.position - 1] if self.position else {}

    def get_next(self) -> dict[str, Any]:
        if self.position >= len(self.entries):
            return {}
        self.position += 1
        return self.entries[self.position - 1]

    def wait(self, timeout: float) -> int:
        self.waited += 1
        return 0

    def close(self) -> None:
        self.closed = True


def test_the_journal_from_its_end() -> None:
    reader = FakeReader()
    f = JournalFollower(lambda: reader)
    assert reader.matches == [{"SYSLOG_FACILITY": "2"}]
    assert f.poll() == [] and reader.waited == 1
    reader.entries += [
        {"SYSLOG_IDENTIFIER": "postfix/qmgr", "MESSAGE": "B12345: removed"},
        {"SYSLOG_IDENTIFIER": "postfix/qmgr", "MESSAGE": b"B1\xff345: removed"},
        {"SYSLOG_IDENTIFIER": "postfix/qmgr", "MESSAGE": "B12345: removed" + "x" * (1 << 20)},
        {"SYSLOG_IDENTIFIER": "postfix/smtpd", "MESSAGE": "connect from x[127.0.0.1]"},
        {"MESSAGE": "no identifier"},
    ]
    assert f.poll() == [
        (Result.PARSED, Event(Kind.REMOVED, "B12345")),
        (Result.MALFORMED, None),
        (Result.MALFORMED, None),
        (Result.IGNORED, None),
        (Result.MALFORMED, None),
    ]
    f.close()
    assert reader.closed


def test_only_entries_of_postfixs_own_user_are_authentic() -> None:
    """journald sets ``_UID``; ``logger -t postfix/smtp`` by a local user carries theirs."""
    reader = FakeReader()
    f = JournalFollower(lambda: reader, writers={107})
    line = "B12345: removed"
    reader.entries += [
        {"SYSLOG_IDENTIFIER": "postfix/qmgr", "MESSAGE": line, "_UID": 107},
        {"SYSLOG_IDENTIFIER": "postfix/qmgr", "MESSAGE": line, "_UID": 1000},
        {"SYSLOG_IDENTIFIER": "postfix/qmgr", "MESSAGE": line},
    ]
    events = [e for _, e in f.poll()]
    assert [e is not None and e.authentic for e in events] == [True, False, False]


def test_a_journal_with_no_readable_file_is_refused() -> None:
    """What the package's unit (a dynamic user in group postfix) gets from
    ``sd_journal_open`` without the systemd-journal group: no file, nothing ever read."""
    reader = FakeReader(readable=False)
    with pytest.raises(JournalUnavailable, match="SupplementaryGroups=systemd-journal"):
        JournalFollower(lambda: reader)
    assert reader.closed


def test_the_journal_without_python3_systemd(
    monkeypatch: pytest.MonkeyPatch, metrics: MaillogMetrics, caplog: pytest.LogCaptureFixture
) -> None:
    def missing(name: str) -> None:
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(importlib, "import_module", missing)
    with pytest.raises(JournalUnavailable, match="python3-systemd"):
        JournalFollower()
    assert start_meter("journal", metrics) is None
    assert "backscatter meter off" in caplog.text
    assert start_meter("", metrics) is None


def test_the_real_reader_takes_these_calls() -> None:
    """python3-systemd's own Reader (Debian's package; the Debian-libraries run has it):
    the calls above exist and a poll of whatever journal this host has parses or skips
    each entry; on a host with no journal file it can read, it refuses, saying why."""
    journal = pytest.importorskip("systemd.journal")
    reader = journal.Reader()
    readable = reader.has_runtime_files() or reader.has_persistent_files()
    reader.close()
    if not readable:
        with pytest.raises(JournalUnavailable, match="no systemd journal file is readable"):
            JournalFollower()
        return
    f = JournalFollower()
    try:
        assert all(result in Result for result, _ in f.poll())
    finally:
        f.close()


def test_an_unreadable_log_is_counted_and_retried(
    tmp_path: Path, metrics: MaillogMetrics, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "dir.log"
    path.mkdir()  # open() fails with IsADirectoryError, as it would with EACCES
    ledger = Ledger(metrics)
    pump = Pump(FileFollower(str(path), metrics), ledger, metrics)
    pump.start()
    try:
        wait_for(lambda: metrics.errors._value.get() >= 2, 5, what="retries")
    finally:
        pump.stop()
    assert caplog.text.count("cannot read the mail log") == 1
    assert "cannot open the mail log" in caplog.text
