"""Postfix's mail log from the systemd journal (``CALLAHEAD_MAILLOG=journal``), read with
python3-systemd's ``systemd.journal.Reader``: the entries of the mail facility (Postfix
logs with ``syslog_facility = mail`` from every daemon of every instance's unit,
``postfix@-.service`` on Debian; ``SYSLOG_IDENTIFIER`` ``postfix/smtp`` and so on), from
the journal's end at start-up.

The system journal's files are readable by root and the ``systemd-journal`` (and
``adm``) groups only: the package's unit, a dynamic user in group ``postfix``, needs
``SupplementaryGroups=systemd-journal``. Without it ``sd_journal_open`` succeeds on no
file at all and every read finds nothing, so a reader that opened no journal file is
refused here, saying why, rather than left reading nothing.

An entry is *authentic* (``Event.authentic``: it may teach the cache, learning.py) only
when journald's own ``_UID`` is Postfix's ``mail_owner`` (``postfix``), under which its
delivery agents and bounce daemon log: an entry any local user forges with ``logger``
or ``postlog`` carries that user's ``_UID``."""

from __future__ import annotations

import dataclasses
import importlib
import pwd
from collections.abc import Callable, Collection
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
MAIL_OWNER = "postfix"
"""Postfix's ``mail_owner`` (its default, Debian's): the user its daemons log as."""


def postfix_uids() -> frozenset[int]:
    """The uid of ``MAIL_OWNER``; none when there is no such user."""
    try:
        return frozenset({pwd.getpwnam(MAIL_OWNER).pw_uid})
    except KeyError:
        return frozenset()


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
    def __init__(
        self,
        reader_class: Callable[[], Any] | None = None,
        writers: Collection[int] | None = None,
    ) -> None:
        """``writers``: the uids whose entries are authentic (default: Postfix's)."""
        make = reader_class if reader_class is not None else _reader_class()
        self._writers = frozenset(writers) if writers is not None else postfix_uids()
        try:
            self._reader = make()
            if not (self._reader.has_runtime_files() or self._reader.has_persistent_files()):
                self._reader.close()
                raise JournalUnavailable(
                    "no systemd journal file is readable (is journald running? callahead's"
                    " user needs the systemd-journal group: SupplementaryGroups=systemd-journal"
                    " in a drop-in, systemctl edit callahead)"
                )
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
            result, event = parse_entry(entry)
            if event is not None and entry.get("_UID") in self._writers:
                event = dataclasses.replace(event, authentic=True)
            out.append((result, event))
        if not out:
            self._reader.wait(WAIT)
        return out

    def close(self) -> None:
        self._reader.close()
