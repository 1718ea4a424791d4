"""Postfix 3.7's mail log lines that tell what became of a recipient, parsed; nothing
else is read.

The formats, from Postfix 3.7's source:

- a delivery attempt, one line per recipient (``src/global/log_adhoc.c``)::

      QUEUEID: to=<ADDR>[, orig_to=<ADDR>], relay=RELAY[, conn_use=N], delay=D,
      delays=A/B/C/D, dsn=X.Y.Z, status=STATUS (TEXT)

  ``STATUS`` is ``sent``, ``bounced``, ``deferred`` (or ``expired`` and others that are
  not fates of a relayed recipient);
- the DSN to the sender (``src/bounce/bounce_notify_service.c`` and its siblings)::

      QUEUEID: sender non-delivery notification: NEWQUEUEID

- the queue manager giving up (``src/qmgr/qmgr_active.c``)::

      QUEUEID: from=<ADDR>, status=expired, returned to sender   (or force-expired)

- and the queue file gone (``qmgr_active.c``): ``QUEUEID: removed``.

A line comes in one of two wrappings: a syslog line (``Mmm dd hh:mm:ss host
program[pid]: body``, the day space-padded from syslog or zero-padded from Postfix's own
``maillog_file`` (``src/util/msg_logger.c``), or an RFC 3339 time stamp as rsyslog
writes), or a journal entry whose ``MESSAGE`` is the body alone.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

MAX_LINE = 8192
"""Bytes of a line read at most: Postfix cuts a record at 2000 (``MSG_LOGGER_RECLEN``),
syslog at about 8 KiB; anything longer is not Postfix's, and is skipped."""

_QUEUE_ID = r"[0-9A-Za-z]{5,32}"
"""A short (hex) or long (``enable_long_queue_ids``) queue id."""
_SYSLOG = re.compile(
    r"(?:[A-Z][a-z]{2} [ 0-3]\d \d\d:\d\d:\d\d(?:\.\d+)?"
    r"|\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)?)"
    r" (?P<host>\S+) (?P<program>[^\s\[\]:]+)\[\d+\]: (?P<body>.*)"
)
_DELIVERY = re.compile(
    rf"(?P<qid>{_QUEUE_ID}): to=<(?P<to>[^\x00-\x1f]*?)>"
    r"(?:, orig_to=<(?P<orig>[^\x00-\x1f]*?)>)?"
    r", relay=(?P<relay>[^\s,]+)(?:, conn_use=\d+)?"
    r", delay=[\d.]+, delays=[\d.]+/[\d.]+/[\d.]+/[\d.]+(?:, tls=\S+)?"
    r", dsn=(?P<dsn>\d\.\d{1,3}\.\d{1,3}), status=(?P<status>[a-z-]+) \((?P<text>.*)\)"
)
_NOTIFICATION = re.compile(
    rf"(?P<qid>{_QUEUE_ID}): sender non-delivery notification: (?P<dsn_qid>{_QUEUE_ID})"
)
_EXPIRED = re.compile(
    rf"(?P<qid>{_QUEUE_ID}): from=<[^\x00-\x1f]*>, status=(?:force-)?expired, "
    r"returned to sender"
)
_REMOVED = re.compile(rf"(?P<qid>{_QUEUE_ID}): removed")


class Fate(enum.Enum):
    """What became of a recipient: the ``outcome`` label."""

    SENT = "sent"
    BOUNCED = "bounced"
    DEFERRED = "deferred"
    EXPIRED = "expired"


class Kind(enum.Enum):
    DELIVERY = "delivery"
    """A recipient's delivery attempt: ``fate`` and ``recipient`` are set."""
    NOTIFICATION = "notification"
    """A DSN was sent to the message's sender."""
    EXPIRED = "expired"
    """The message was too old: its recipients not yet delivered are returned."""
    REMOVED = "removed"
    """The queue file is gone."""


@dataclass(frozen=True, slots=True)
class Event:
    kind: Kind
    queue_id: str
    recipient: str = ""
    original: str = ""
    """``orig_to``, when a rewrite changed the recipient."""
    fate: Fate | None = None
    dsn: str = ""
    relay: str = field(default="", compare=False)
    """``relay=``: ``name[address]:port`` of an SMTP delivery, ``none``, ``local``..."""
    text: str = field(default="", compare=False)
    """The status's text in parentheses (a remote server's reply, quoted)."""
    authentic: bool = field(default=False, compare=False)
    """Written by Postfix itself, as far as the source can tell: only the journal can
    (its ``_UID``, which journald sets and no client can forge, is Postfix's
    ``mail_owner``). A file's line never is: any local user can write one there with
    ``logger -p mail.info -t postfix/smtp`` (syslog) or ``postlog -t postfix/smtp``
    (Postfix's own ``maillog_file``: postlog takes any tag)."""


class Result(enum.Enum):
    """The ``result`` label of a line read."""

    PARSED = "parsed"
    IGNORED = "ignored"
    """A log line that says nothing of a recipient's fate (another program or event)."""
    MALFORMED = "malformed"
    """Not a log line at all: over ``MAX_LINE``, not UTF-8, a NUL, no syslog prefix."""


def decode(raw: bytes) -> str | None:
    """A line's bytes (without its newline) as text; None if it cannot be Postfix's."""
    if len(raw) > MAX_LINE or b"\0" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def parse_line(line: str) -> tuple[Result, Event | None]:
    """One line of a log file (syslog's or Postfix's ``maillog_file``)."""
    wrapped = _SYSLOG.fullmatch(line.rstrip("\r\n"))
    if wrapped is None:
        return Result.MALFORMED, None
    return parse_body(wrapped["program"], wrapped["body"])


def parse_body(program: str, body: str) -> tuple[Result, Event | None]:
    """One message of ``program`` (``postfix/smtp``, ``postfix-out/bounce``: the daemon
    is the last name; the first is ``syslog_name``, which may be anything)."""
    if len(body) > MAX_LINE or "\0" in body:
        return Result.MALFORMED, None
    daemon = program.rpartition("/")[2]
    if program == daemon:
        return Result.IGNORED, None  # not Postfix's (it always logs NAME/DAEMON)
    event = _event(daemon, body)
    return (Result.IGNORED, None) if event is None else (Result.PARSED, event)


def _event(daemon: str, body: str) -> Event | None:
    if daemon in ("smtpd", "cleanup", "postscreen", "anvil", "pickup", "master"):
        return None
    if daemon == "bounce":
        found = _NOTIFICATION.fullmatch(body)
        return None if found is None else Event(Kind.NOTIFICATION, found["qid"])
    if daemon in ("qmgr", "oqmgr"):
        if (removed := _REMOVED.fullmatch(body)) is not None:
            return Event(Kind.REMOVED, removed["qid"])
        if (expired := _EXPIRED.fullmatch(body)) is not None:
            return Event(Kind.EXPIRED, expired["qid"])
    delivery = _DELIVERY.fullmatch(body)
    if delivery is None:
        return None
    try:
        fate = Fate(delivery["status"])
    except ValueError:
        return None  # deliverable/undeliverable (address probes), skipped, ...
    return Event(
        Kind.DELIVERY,
        delivery["qid"],
        recipient=delivery["to"],
        original=delivery["orig"] or "",
        fate=fate,
        dsn=delivery["dsn"],
        relay=delivery["relay"],
        text=delivery["text"],
    )
