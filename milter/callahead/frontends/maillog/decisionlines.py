"""The log lines ``callahead report`` reads besides Postfix's fates (lines.py): callahead's
own decision lines, Postfix smtpd's line that opens a queue file, and the time stamps of
both.

- callahead's decision line, as ``serve`` writes it (logoutput.py, judge.py), alone or
  behind a syslog prefix (``journalctl -o short``, rsyslog)::

      2026-12-07 12:51:47,123 callahead.decision[812]: INFO NOQUEUE: client=192.0.2.7
      rcpt=<bob@example.org> decision=accept reason=primary_down primary=...

  The recipient is escaped (logfmt.py: no space, ``>`` or ``=`` inside it), and the
  line must start so: a Postfix line that quotes a client's text cannot pass for one.
- Postfix smtpd's ``QUEUEID: client=NAME[ADDRESS]`` (``src/smtpd/smtpd.c``), logged
  when the queue file opens, after the first recipient is accepted: the queue id of the
  recipients callahead judged before there was one (``NOQUEUE``), joined by the client
  address.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import datetime

from ...core.policy import Action, Reason

_SYSLOG_STAMP = r"[A-Z][a-z]{2} [ 0-3]\d \d\d:\d\d:\d\d(?:\.\d+)?"
_ISO_STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)?"
_OWN_STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
"""logoutput.FORMAT's ``asctime``: local time."""
_PREFIX = re.compile(
    rf"(?P<stamp>{_SYSLOG_STAMP}|{_ISO_STAMP}|{_OWN_STAMP})"
    r"(?: (?P<host>\S+) (?P<program>[^\s\[\]:]+)\[\d+\]:)? "
)
_DECISION = re.compile(
    rf"(?:(?P<own>{_OWN_STAMP}) )?callahead\.decision\[\d+\]: [A-Z]+ "
    r"(?P<qid>[0-9A-Za-z]{5,32}): client=(?P<client>\S+) "
    r"rcpt=<(?P<rcpt>[^\s<>]*?)(?:\.\.\.)?>(?: rcpt_chars=\d+)? "
    r"decision=(?P<decision>[a-z]+) reason=(?P<reason>[a-z_]+)(?P<dry> dry_run=yes)?(?: .*)?"
)
_SMTPD_CLIENT = re.compile(
    r"(?P<qid>[0-9A-Za-z]{5,32}): client=[^\s\[\]]*\[(?P<address>[^\s\[\]]+)\](?::\d+)?(?:, .*)?"
)
_ESCAPED = re.compile(r"\\x([0-9a-f]{2})|\\u([0-9a-f]{4})|\\U([0-9a-f]{8})")
NOQUEUE = "NOQUEUE"


@dataclass(frozen=True, slots=True)
class DecisionLine:
    queue_id: str
    """``NOQUEUE`` when Postfix had none yet."""
    client: str
    address: str
    action: Action
    reason: str
    dry_run: bool

    @property
    def accepted(self) -> bool:
        """Postfix went on with the recipient (ledger.accepted_here)."""
        return self.action is Action.ACCEPT or (self.dry_run and self.action is not Action.SKIP)


def unescape(text: str) -> str:
    """logfmt.escape undone."""
    return _ESCAPED.sub(lambda m: chr(int(m[1] or m[2] or m[3], 16)), text)


def parse_decision(message: str) -> DecisionLine | None:
    """A decision line: the whole line of a log file, or a journal entry's message."""
    found = _DECISION.fullmatch(message)
    if found is None:
        prefix = _PREFIX.match(message)
        if prefix is None or not prefix["program"] or "/" in prefix["program"]:
            return None  # no prefix, or Postfix's (NAME/DAEMON): never callahead's
        found = _DECISION.fullmatch(message, prefix.end())
        if found is None:
            return None
    try:
        action = Action(found["decision"])
        reason = Reason(found["reason"]).value
    except ValueError:
        return None
    return DecisionLine(
        found["qid"],
        found["client"],
        unescape(found["rcpt"]),
        action,
        reason,
        found["dry"] is not None,
    )


def parse_smtpd_client(program: str, body: str) -> tuple[str, str] | None:
    """(queue id, client address) of smtpd's line that opens a queue file."""
    if not program.endswith("/smtpd"):
        return None
    found = _SMTPD_CLIENT.fullmatch(body)
    return None if found is None else (found["qid"], found["address"])


def split_syslog(line: str) -> tuple[float, str, str] | None:
    """A syslog-style line's (time, program, body); None without that prefix."""
    prefix = _PREFIX.match(line)
    if prefix is None or not prefix["program"]:
        return None
    stamp = parse_stamp(prefix["stamp"])
    return None if stamp is None else (stamp, prefix["program"], line[prefix.end() :])


def line_time(line: str) -> float | None:
    """The time stamp a line starts with, as Unix time."""
    prefix = _PREFIX.match(line)
    return None if prefix is None else parse_stamp(prefix["stamp"])


def parse_stamp(stamp: str, now: float | None = None) -> float | None:
    """Unix time of a log time stamp: local time unless it has an offset; a syslog stamp
    has no year: this year's, or last year's if that would be more than a day ahead."""
    try:
        if "T" in stamp:
            return datetime.fromisoformat(stamp).timestamp()
        if stamp[:4].isdigit():
            return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
        now = time.time() if now is None else now
        year = time.localtime(now).tm_year
        parsed = datetime.strptime(f"{year} {stamp.split('.')[0]}", "%Y %b %d %H:%M:%S")
        if parsed.timestamp() > now + 86400:
            parsed = parsed.replace(year=year - 1)
        return parsed.timestamp()
    except ValueError:
        return None
