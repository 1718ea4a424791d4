"""``callahead report`` from the logs alone, when ``serve`` is not running: callahead's
decision lines and Postfix's lines, from files or from the systemd journal, put in time
order and joined as the running meter joins them (the same ``Ledger``, fed with each
line's own time), into a ``DomainTally``.

Order: by the second of each line's time stamp (Postfix's own ``maillog_file`` has no
finer one), callahead's decisions first within a second (a decision comes before the
queue file and every delivery), then each file's lines in their order.

A recipient callahead judged before Postfix had a queue id (``NOQUEUE``: the first one
of a transaction, with ``smtpd_delay_open_until_valid_rcpt = yes``, the default) gets
the queue id of the next smtpd ``QUEUEID: client=NAME[ADDRESS]`` line of its client
address, or of a later decision of that client with a queue id, within
``PENDING_WINDOW`` seconds. Two transactions of one client address at once may swap
their queue ids: their recipients then meet no fate (``unknown``), never a wrong one,
since the join is by queue id and recipient.
"""

from __future__ import annotations

import gzip
import importlib
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry

from ...base.errors import CallaheadError
from .decisionlines import (
    NOQUEUE,
    DecisionLine,
    line_time,
    parse_decision,
    parse_smtpd_client,
    split_syslog,
)
from .ledger import Ledger
from .lines import MAX_LINE, Event, Result, decode, parse_body
from .meter import MaillogMetrics
from .tally import DomainTally, domain_of

UNIT = "callahead.service"
"""The unit whose journal holds callahead's decision lines (deploy/callahead.service)."""
MAIL_FACILITY = "2"
"""``LOG_MAIL >> 3``: Postfix's lines in the journal."""
PENDING_WINDOW = 600.0
"""Seconds a ``NOQUEUE`` recipient waits for its transaction's queue id."""
MAX_PENDING = 1000
"""``NOQUEUE`` recipients held per client address, at most (``MAX_HELD``)."""

_Payload = DecisionLine | tuple[str, str] | Event
_DECISION, _POSTFIX = 0, 1


class ReplayError(CallaheadError):
    """A log cannot be read; ``unavailable``: the journal cannot be (no python3-systemd,
    or no permission)."""

    def __init__(self, message: str, *, unavailable: bool = False) -> None:
        super().__init__(message)
        self.unavailable = unavailable


class _Now:
    def __init__(self) -> None:
        self.value = 0.0

    def __call__(self) -> float:
        return self.value


class Replay:
    def __init__(self, since: float | None = None) -> None:
        self._since = since
        self._records: list[tuple[int, int, int, float, _Payload]] = []
        self.lines = 0
        """Lines (or journal entries) read."""
        self.decisions = 0
        self.fates = 0
        self.first: float | None = None
        self.last: float | None = None

    def _add(self, when: float, rank: int, payload: _Payload) -> None:
        if self._since is not None and when < self._since:
            return
        self._records.append((int(when), rank, len(self._records), when, payload))
        self.first = when if self.first is None else min(self.first, when)
        self.last = when if self.last is None else max(self.last, when)

    def add_file(self, path: str) -> None:
        """Every line of a log file (gzip-compressed when it ends in ``.gz``)."""
        try:
            with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as f:
                for raw in f:
                    self.add_line(raw.rstrip(b"\r\n"))
        except (OSError, EOFError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise ReplayError(f"cannot read the log {path}: {reason}") from None

    def add_line(self, raw: bytes) -> None:
        self.lines += 1
        line = decode(raw[: MAX_LINE + 1])
        if line is None:
            return
        decision = parse_decision(line)
        if decision is not None:
            when = line_time(line)
            if when is not None:
                self.decisions += 1
                self._add(when, _DECISION, decision)
            return
        wrapped = split_syslog(line)
        if wrapped is not None:
            self._postfix(*wrapped)

    def add_entry(self, entry: Mapping[str, Any]) -> None:
        """One journal entry: callahead's unit's, or the mail facility's."""
        self.lines += 1
        stamp, message = entry.get("__REALTIME_TIMESTAMP"), entry.get("MESSAGE")
        if not isinstance(stamp, datetime) or not isinstance(message, str):
            return
        when = stamp.timestamp()
        if entry.get("_SYSTEMD_UNIT") == UNIT:
            decision = parse_decision(message)
            if decision is not None:
                self.decisions += 1
                self._add(when, _DECISION, decision)
            return
        program = entry.get("SYSLOG_IDENTIFIER")
        if isinstance(program, str):
            self._postfix(when, program, message)

    def _postfix(self, when: float, program: str, body: str) -> None:
        result, event = parse_body(program, body)
        if result is Result.PARSED and event is not None:
            self.fates += 1
            self._add(when, _POSTFIX, event)
        elif (opened := parse_smtpd_client(program, body)) is not None:
            self._add(when, _POSTFIX, opened)

    def tally(self) -> DomainTally:
        """The lines read, joined: the counts per domain."""
        tally = DomainTally(clock=lambda: self._since or self.first or 0.0)
        now = _Now()
        ledger = Ledger(MaillogMetrics(CollectorRegistry()), clock=now, tally=tally)
        pending: dict[str, list[tuple[float, str, str]]] = {}

        def bind(client: str, queue_id: str) -> None:
            for since, address, reason in pending.pop(client, ()):
                if now.value - since <= PENDING_WINDOW:
                    ledger.accepted(queue_id, address, reason)

        for _, _, _, when, payload in sorted(self._records, key=lambda r: r[:3]):
            now.value = when
            if isinstance(payload, Event):
                ledger.read(payload)
            elif isinstance(payload, tuple):
                bind(payload[1], payload[0])
            else:
                accepted = payload.accepted
                domain = domain_of(payload.address)
                tally.count(domain, payload.action, payload.reason, accepted=accepted)
                if not accepted:
                    continue
                if payload.queue_id == NOQUEUE:
                    held = pending.setdefault(payload.client, [])
                    if len(held) < MAX_PENDING:
                        held.append((when, payload.address, payload.reason))
                else:
                    bind(payload.client, payload.queue_id)
                    ledger.accepted(payload.queue_id, payload.address, payload.reason)
        return tally


def read_journal(
    replay: Replay,
    since: float | None,
    *,
    postfix: bool,
    reader_class: Callable[[], Any] | None = None,
) -> None:
    """callahead's unit's entries, and the mail facility's when ``postfix``, from
    ``since`` (or the journal's start) to its end."""
    make = reader_class if reader_class is not None else _reader_class()
    try:
        reader = make()
        reader.add_match(_SYSTEMD_UNIT=UNIT)
        if postfix:
            reader.add_disjunction()
            reader.add_match(SYSLOG_FACILITY=MAIL_FACILITY)
        if since is not None:
            reader.seek_realtime(datetime.fromtimestamp(since))
        try:
            for entry in _entries(reader):
                replay.add_entry(entry)
        finally:
            reader.close()
    except OSError as exc:
        raise ReplayError(f"cannot read the systemd journal: {exc}", unavailable=True) from None


def _entries(reader: Any) -> Iterable[Mapping[str, Any]]:
    while entry := reader.get_next():
        yield entry


def _reader_class() -> Callable[[], Any]:
    try:
        module = importlib.import_module("systemd.journal")
    except ImportError as exc:
        raise ReplayError(
            "reading the journal needs python3-systemd (apt install python3-systemd); "
            f"or name the log files with --log: {exc}",
            unavailable=True,
        ) from None
    reader: Callable[[], Any] = module.Reader
    return reader
