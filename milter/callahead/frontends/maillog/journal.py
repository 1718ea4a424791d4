"""Postfix's mail log from the systemd journal (``CALLAHEAD_MAILLOG=journal``), read with
python3-systemd's ``systemd.journal.Reader``: the entries of the mail facility (Postfix
logs with ``syslog_facility = mail`` from every daemon of every instance's unit,
``postfix@-.service`` on Debian), from the journal's end at start-up."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from ...base.errors import CallaheadError
from .follow import parse_entry
from .lines import Event, Result

MAIL_FACILITY = "2"
"""``LOG_MAIL >> 3``: the journal's ``SYSLOG_FACILITY`` of Postfix's lines."""
BATCH = 1000
"""Entries read per poll, at most."""
WAIT = 0.25
"""Seconds a poll waits for new entries."""


class JournalUnavailable(CallaheadError):
    """python3-systemd is not installed, or the journal cannot be opened."""


def _reader_class() -> Callable[[], Any]:
    try:
        module = importlib.import_module("systemd.journal")
    except ImportError as exc:
        raise JournalUnavailable(
            f"CALLAHEAD_MAILLOG=journal needs python3-systemd (apt install python3-systemd): {exc}"
        ) from exc
    reader: Callable[[], Any] = module.Reader
    return reader


class JournalFollower:
    def __init__(self, reader_class: Callable[[], Any] | None = None) -> None:
        make = reader_class if reader_class is not None else _reader_class()
        try:
            self._reader = make()
            self._reader.add_match(SYSLOG_FACILITY=MAIL_FACILITY)
            self._reader.seek_tail()
            self._reader.get_previous()  # sd_journal_seek_tail needs a step to settle
        except OSError as exc:
            raise JournalUnavailable(f"cannot open the systemd journal: {exc}") from exc

    def poll(self) -> list[tuple[Result, Event | None]]:
        out: list[tuple[Result, Event | None]] = []
        while len(out) < BATCH:
            entry = self._reader.get_next()
            if not entry:
                break
            out.append(parse_entry(entry))
        if not out:
            self._reader.wait(WAIT)
        return out

    def close(self) -> None:
        self._reader.close()
