"""Postfix 3.7's mail log lines, parsed. Each line below is written as Postfix 3.7 writes
it, with the source that writes it (github.com/vdukhovni/postfix, tag v3.7.22):

- ``to=<...>`` lines: ``src/global/log_adhoc.c`` (``log_adhoc``);
- ``sender non-delivery notification``: ``src/bounce/bounce_notify_service.c``;
- ``status=expired, returned to sender`` and ``removed``: ``src/qmgr/qmgr_active.c``;
- ``from=<...>, size=..., nrcpt=...``: ``src/global/opened.c`` (ignored here);
- the ``maillog_file`` wrapping (``%b %d %H:%M:%S host program[pid]: ``):
  ``src/util/msg_logger.c``; the syslog wrapping has the day space-padded.
The lines of ``meter.test`` are copied from a real Postfix 3.7 backup's ``maillog_file``
(Debian 12's package, in tests/integration/test_backscatter_meter.py's rig, whose
``syslog_name`` is ``postfix-backup``); the others are written to the source's format.
"""

from __future__ import annotations

import pytest

from callahead.frontends.maillog.lines import (
    MAX_LINE,
    Event,
    Fate,
    Kind,
    Result,
    decode,
    parse_body,
    parse_line,
)

SENT = (
    "Dec 07 12:42:47 backup postfix-backup/smtp[17807]: 3EFFD2201A9: "
    "to=<known-milter@meter.test>, relay=127.0.0.1[127.0.0.1]:43353, delay=2.6, "
    "delays=2.5/0.03/0.03/0.06, dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as C40A422E4F1)"
)
BOUNCED = (
    "Dec 07 12:42:47 backup postfix-backup/smtp[17807]: 3EFFD2201A9: "
    "to=<gone-milter@meter.test>, relay=127.0.0.1[127.0.0.1]:43353, delay=2.6, "
    "delays=2.5/0.03/0.03/0.05, dsn=5.1.1, status=bounced (host 127.0.0.1[127.0.0.1] said: "
    "550 5.1.1 <gone-milter@meter.test>: Recipient address rejected: User unknown in virtual "
    "mailbox table (in reply to RCPT TO command))"
)
DEFERRED = (
    "Dec 07 12:42:45 backup postfix-backup/smtp[17470]: 3EFFD2201A9: "
    "to=<known-milter@meter.test>, relay=none, delay=0.02, delays=0.01/0.01/0/0, dsn=4.4.1, "
    "status=deferred (connect to 127.0.0.1[127.0.0.1]:43353: Connection refused)"
)
SYSLOG_DEFERRED = (
    "Dec  7 12:50:37 backup postfix/smtp[8800]: 9C3D4E5F6A: to=<known@example.test>, "
    "orig_to=<Known@Example.test>, relay=none, delay=0.02, delays=0.01/0/0.01/0, dsn=4.4.1, "
    "status=deferred (connect to 127.0.0.1[127.0.0.1]:40123: Connection refused)"
)
RSYSLOG_SENT_REUSED = (
    "2026-12-07T12:51:40.123456+00:00 backup postfix-out/smtp[8822]: 9C3D4E5F6A: "
    "to=<a@example.test>, relay=mx.example.test[192.0.2.1]:25, conn_use=2, delay=0.5, "
    "delays=0.1/0/0.2/0.2, dsn=2.0.0, status=sent (250 ok)"
)
NOTIFICATION = (
    "Dec 07 12:42:47 backup postfix-backup/bounce[17815]: 3EFFD2201A9: sender non-delivery "
    "notification: CCA292200C5"
)
EXPIRED = (
    "Dec 07 12:51:40 backup postfix/qmgr[8790]: 9C3D4E5F6A: from=<someone@example.org>, "
    "status=expired, returned to sender"
)
REMOVED = "Dec 07 12:42:47 backup postfix-backup/qmgr[17537]: 3EFFD2201A9: removed"
QUEUED = (
    "Dec 07 12:42:47 backup postfix-backup/qmgr[17537]: 3EFFD2201A9: from=<sender@remote.test>, "
    "size=428, nrcpt=2 (queue active)"
)


def test_sent() -> None:
    assert parse_line(SENT) == (
        Result.PARSED,
        Event(Kind.DELIVERY, "3EFFD2201A9", "known-milter@meter.test", "", Fate.SENT, "2.0.0"),
    )


def test_bounced_with_a_comma_and_parentheses_in_the_reply() -> None:
    result, event = parse_line(BOUNCED)
    assert result is Result.PARSED and event is not None
    assert (event.recipient, event.fate, event.dsn) == (
        "gone-milter@meter.test",
        Fate.BOUNCED,
        "5.1.1",
    )


def test_deferred() -> None:
    result, event = parse_line(DEFERRED)
    assert result is Result.PARSED and event is not None
    assert (event.fate, event.dsn) == (Fate.DEFERRED, "4.4.1")


def test_syslog_padding_and_orig_to() -> None:
    result, event = parse_line(SYSLOG_DEFERRED)
    assert result is Result.PARSED and event is not None
    assert event.fate is Fate.DEFERRED
    assert (event.recipient, event.original) == ("known@example.test", "Known@Example.test")


def test_rfc3339_stamp_other_syslog_name_and_conn_use() -> None:
    result, event = parse_line(RSYSLOG_SENT_REUSED)
    assert result is Result.PARSED and event is not None
    assert (event.queue_id, event.fate) == ("9C3D4E5F6A", Fate.SENT)


@pytest.mark.parametrize(
    ("line", "kind", "queue_id"),
    [
        (NOTIFICATION, Kind.NOTIFICATION, "3EFFD2201A9"),
        (EXPIRED, Kind.EXPIRED, "9C3D4E5F6A"),
        (EXPIRED.replace("expired", "force-expired"), Kind.EXPIRED, "9C3D4E5F6A"),
        (REMOVED, Kind.REMOVED, "3EFFD2201A9"),
    ],
)
def test_message_events(line: str, kind: Kind, queue_id: str) -> None:
    assert parse_line(line) == (Result.PARSED, Event(kind, queue_id))


@pytest.mark.parametrize(
    "line",
    [
        QUEUED,
        "Dec 07 12:50:37 backup postfix/smtpd[8801]: connect from unknown[127.0.0.1]",
        # A to= line in smtpd's words is a client's, not a delivery.
        SENT.replace("/smtp[", "/smtpd["),
        # An address-verification probe is not a fate (log_adhoc's status "deliverable").
        SENT.replace("status=sent", "status=deliverable"),
        # The same body from a program that is not Postfix's (no NAME/DAEMON).
        SENT.replace("postfix-backup/smtp[", "smtp["),
        # The postmaster's copy of a bounce is not the sender's.
        NOTIFICATION.replace("sender non-delivery", "postmaster non-delivery"),
    ],
)
def test_other_lines_are_ignored(line: str) -> None:
    assert parse_line(line) == (Result.IGNORED, None)


@pytest.mark.parametrize(
    "line",
    [
        "",
        "garbage",
        SENT[:40],
        "Dec 07 12:51:40 backup postfix/smtp[8822] no colon",
    ],
)
def test_not_a_log_line_is_malformed(line: str) -> None:
    assert parse_line(line) == (Result.MALFORMED, None)


def test_a_truncated_delivery_line_is_not_a_fate() -> None:
    assert parse_line(SENT[: SENT.index(", dsn=")]) == (Result.IGNORED, None)


def test_hostile_bytes() -> None:
    assert decode(b"x" * (MAX_LINE + 1)) is None
    assert decode(SENT.encode().replace(b"known", b"kn\0wn")) is None
    assert decode(SENT.encode().replace(b"known", b"kn\xffwn")) is None
    assert decode(SENT.encode()) == SENT
    assert parse_body("postfix/smtp", "x" * (1 << 20)) == (Result.MALFORMED, None)
    assert parse_body("postfix/smtp", "A1B2C3: removed\0") == (Result.MALFORMED, None)


def test_a_forged_recipient_cannot_fake_a_second_field() -> None:
    """An address that carries ``>, relay=...`` text is read up to the real fields."""
    tricky = SENT.replace("known-milter@meter.test", '"a>, status=bounced (x)"@example.test')
    result, event = parse_line(tricky)
    assert result is Result.PARSED and event is not None
    assert event.fate is Fate.SENT
    assert event.recipient == '"a>, status=bounced (x)"@example.test'


def test_journal_body() -> None:
    body = SENT.split(": ", 1)[1]
    assert parse_body("postfix/smtp", body)[1] == parse_line(SENT)[1]
