"""What a primary's reply means: the classification table.

A reply is classified by the stage that produced it, its RFC 3463 enhanced status code,
and, for the rejections Postfix delays to ``RCPT TO``, its text. Only ``RCPT TO`` can
say *valid* or *unknown*, and *unknown* only when the reply is about the recipient
itself. Everything that refuses the prober (its address, its HELO name, its sender, a
policy or a blocklist), every protocol or system error and every temporary reply is
*undecided*: callahead must never turn "I won't talk to you" into "no such user".

The table (docs/verdicts.md has it with examples, and ``tests/unit/test_verdict.py``
checks it case by case):

=========  ===========================================================  ===========
stage      reply                                                        verdict
=========  ===========================================================  ===========
RCPT       2xx                                                          valid
RCPT       5xx whose text is one of Postfix's delayed rejections of     undecided
           the client, HELO or sender, names a blocklist, the client's
           DNS, a relay or policy refusal (``PROBER_TEXTS``,
           ``SENDER_TEXTS``), or a ``5.1.0``, ``5.0.x`` or bare 5xx
           that names the sender
RCPT       5xx with enhanced code ``5.1.x`` (not ``5.1.7``/``5.1.8``,   unknown
           which are about the sender) or ``5.4.1`` (Microsoft 365
           directory-based blocking)
RCPT       5xx with ``5.2.4`` (OpenSMTPD's unknown virtual user)        unknown
RCPT       5xx with ``5.0.x`` and a text that says the user is unknown  unknown
RCPT       bare 5xx (no enhanced code, as Exim) whose text says the     unknown, with
           user is unknown (``UNKNOWN_USER_TEXTS``)                     a control
RCPT       any other 5xx (``5.2.x`` mailbox, ``5.3.x`` system,          undecided
           ``5.5.x`` protocol, ``5.6.x`` content, ``5.7.x`` policy,
           a bare 5xx with any other text)
RCPT       ``452``, ``4.5.3``, ``4.7.5xx``: throttling                  undecided,
                                                                        fresh session
any        other 4xx, ``421``, no reply, a 5xx before RCPT TO           undecided
=========  ===========================================================  ===========

The evidence rules (explicit, bare, drift) are evidence.py's; docs/verdicts.md explains
them. ``tests/unit/smtp/replies.tsv`` holds replies real mail systems send, each with
its source, and ``test_reply_corpus.py`` runs them through this table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from aiosmtplib.typing import SMTPStatus

from .verdict import Basis, Stage, Verdict


@dataclass(frozen=True, slots=True)
class Classification:
    verdict: Verdict
    basis: Basis
    why: str
    """One sentence for ``callahead probe --explain`` and the logs."""
    bare: bool = False
    """An *unknown* from a bare 5xx (no enhanced status code): final only on a session
    that has accepted a control address of the domain (session.py)."""


@dataclass(frozen=True, slots=True)
class EnhancedCode:
    """An RFC 3463 enhanced status code, ``class.subject.detail``."""

    klass: int
    subject: int
    detail: int

    def __str__(self) -> str:
        return f"{self.klass}.{self.subject}.{self.detail}"


_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")
_QMAIL_ENHANCED = re.compile(r"\(#([245])\.(\d{1,3})\.(\d{1,3})\)\s*$")
"""qmail puts its enhanced code at the end of the text: ``553 sorry, ... (#5.7.1)``."""

PROBER_TEXTS = (
    # Postfix's smtpd_delay_reject = yes (the default) answers client and HELO
    # restrictions at RCPT TO, in these words.
    "client host rejected",
    "helo command rejected",
    # HELO checks of other MTAs (Exim's "HELO/EHLO ..." denies, "use a fully qualified
    # domain name in HELO").
    "helo",
    "ehlo",
    # reject_rbl_client and friends: "Service unavailable; Client host [...] blocked
    # using zen.spamhaus.org"; Exim's "... is in a black list at ...".
    "blocked using",
    "blocklist",
    "blacklist",
    "black list",
    "block list",
    "listed",
    "dnsbl",
    "spamhaus",
    # Rate limits and connection limits on the prober's address: Exim's "Sender rate
    # overlimit", "Too many connections", "too many ... from your host".
    "ratelimit",
    "rate limit",
    "rate overlimit",
    "overlimit",
    "too many",
    # Relay refusals: the primary does not take mail for the domain from this client.
    "relay access denied",
    "relay not permitted",
    "relaying denied",
    "administrative prohibition",  # Exim's default text for an ACL deny without a message
    "recipient preferences",  # Facebook's "RCP-P2 ... Refused due to recipient preferences"
    # The client's DNS: Postfix's "cannot find your hostname", "Your host does not
    # exist in DNS", "Fix reverse DNS", Gmail's "does not have a PTR record".
    "cannot find your",
    "your host",
    "in dns",
    "reverse dns",
    "reverse hostname",
    "rdns",
    "ptr record",
)
"""Phrases that say a 5xx at RCPT TO refuses the prober, whatever its code says: the
recipient's existence is not what was judged. They win over every recipient-level
code (an explicit ``5.1.1 ... blocked using ...`` is undecided)."""
SENDER_TEXTS = (
    "sender address rejected",  # Postfix, delayed to RCPT TO
    "sender verify failed",  # Exim
    "sender denied",  # Exchange's sender filter: "554 5.1.0 Sender Denied"
    "sender rejected",  # Cox, Spectrum: "550 5.1.0 <...> sender rejected"
    "domain of sender",  # Sendmail: "Domain of sender address ... does not exist"
    "spf",  # "550 5.1.0 ... is not allowed to send from <...> per it's SPF Record"
)
_SENDER_WORD = re.compile(r"\bsender\b")  # a 5.1.0, 5.0.x or bare 5xx naming it
UNKNOWN_USER_TEXTS = (
    "user unknown",
    "unknown user",
    "unknown local part",
    "unknown recipient",
    "unknown address",
    "unknown mailbox",
    "recipient unknown",
    "address unknown",
    "mailbox unknown",
    "no such user",
    "no such recipient",
    "no such mailbox",
    "no such address",
    "user not found",
    "recipient not found",
    "mailbox not found",
    "address not found",
    "invalid recipient",
    "invalid mailbox",
    "unrouteable address",
    "unroutable address",
    "user doesn't have a",  # Yahoo: "This user doesn't have a yahoo.com account"
    "no mailbox here by that name",  # qmail: chkuser, the rcptcheck patch, vpopmail
)
"""Texts that say the user is unknown. A *bare* 5xx (no enhanced status code, as Exim
and OpenSMTPD answer) is unknown only with one of these, and only on a session that has
accepted a control address of the domain; a ``5.0.x`` is unknown only with one. Or
"... does not exist" about the user, mailbox, account or address (``_NOT_EXIST``)."""
_NOT_EXIST = re.compile(  # "User not exist"; never "Your host does not exist in DNS"
    r"\b(?:user|recipient|mailbox|addressee|account|address|local[- ]part)\b.{0,60}?"
    r"\b(?:does not|doesn't|do not|not|no longer) exists?\b"
)
_ELSEWHERE = re.compile(r"\b(?:host|domain|dns|sender|client|server|your)\b")
MULTI_RECIPIENT_TEXTS = ("multi-recipient bounce",)
"""Postfix's ``reject_multi_recipient_bounce`` (``550 5.5.3 <...>: Recipient address
rejected: Multi-recipient bounce``) on a later RCPT of a ``MAIL FROM:<>`` transaction."""

_SUBJECTS = {
    0: "other or undefined status",
    1: "addressing status",
    2: "mailbox status",
    3: "mail system status",
    4: "network and routing status",
    5: "mail delivery protocol status",
    6: "message content or media status",
    7: "security or policy status",
}


def enhanced_code(code: int, text: str) -> EnhancedCode | None:
    """The enhanced status code of a reply, if it has one whose class matches ``code``."""
    match = _ENHANCED.match(text) or _QMAIL_ENHANCED.search(text)
    if match is None:
        return None
    found = EnhancedCode(int(match[1]), int(match[2]), int(match[3]))
    return found if found.klass == code // 100 else None


_QUOTED_PATH = re.compile(r"<[^<>]*>")
"""An address the reply quotes (``<u@example.com>: ...``): it is the sender's choice, so
it is never read for phrases (``<michelo@...>`` must not read as "helo")."""


def _mentions(lowered: str, phrases: tuple[str, ...]) -> str | None:
    """The first of ``phrases`` in a reply's text, lowered, its paths emptied."""
    return next((phrase for phrase in phrases if phrase in lowered), None)


def _says_unknown(lowered: str) -> str | None:
    """The unknown-user phrase of a reply's text (lowered, paths emptied), if any."""
    phrase = _mentions(lowered, UNKNOWN_USER_TEXTS)
    if phrase is not None:
        return phrase
    for clause in re.split(r"[.;:\n]", lowered):
        found = _NOT_EXIST.search(clause)
        if found and not _ELSEWHERE.search(clause):  # the sender's, a host's, the DNS's
            return found[0]
    return None


def is_throttle(code: int, enhanced: EnhancedCode | None) -> bool:
    """452 (too many recipients, insufficient storage), 4.5.3, or Microsoft 365's
    4.7.5xx throttling replies."""
    if code == SMTPStatus.insufficient_storage:
        return True
    if enhanced is None or enhanced.klass != 4:
        return False
    return (enhanced.subject, enhanced.detail) == (5, 3) or (
        enhanced.subject == 7 and 500 <= enhanced.detail <= 699
    )


def classify(stage: Stage, code: int | None, text: str = "") -> Classification:
    """Classify the reply ``code text`` that the primary gave at ``stage``."""
    if code is None:
        return Classification(Verdict.TEMPFAIL, Basis.NO_REPLY, "no reply from the primary")
    enhanced = enhanced_code(code, text)
    if 400 <= code < 500:
        if stage is Stage.RCPT and is_throttle(code, enhanced):
            return Classification(
                Verdict.TEMPFAIL,
                Basis.THROTTLE,
                f"{code} {enhanced or ''}".rstrip()
                + " is throttling (too many recipients or rate limit): undecided, and the "
                "session is retired",
            )
        return Classification(
            Verdict.TEMPFAIL, Basis.TEMPORARY, f"a {code} is temporary: it decides nothing"
        )
    if stage is not Stage.RCPT:
        return _before_rcpt(stage, code, text)
    if 200 <= code < 300:
        return Classification(Verdict.VALID, Basis.ACCEPTED, f"{code} at RCPT TO: it exists")
    if not 500 <= code < 600:
        return Classification(
            Verdict.TEMPFAIL, Basis.TEMPORARY, f"{code} is not a reply to RCPT TO"
        )
    return _rcpt_5xx(code, enhanced, text)


def _before_rcpt(stage: Stage, code: int, text: str) -> Classification:
    if not 500 <= code < 600:
        return Classification(
            Verdict.TEMPFAIL,
            Basis.TEMPORARY,
            f"{code} at {stage.value.upper()} says nothing about the recipient",
        )
    phrase = _mentions(_QUOTED_PATH.sub("<>", text).lower(), PROBER_TEXTS)
    if stage is Stage.MAIL and phrase is None:
        return Classification(
            Verdict.TEMPFAIL,
            Basis.SENDER,
            f"{code} at MAIL FROM refuses the probe's sender, not the recipient",
        )
    return Classification(
        Verdict.TEMPFAIL,
        Basis.PROBER,
        f"{code} at {stage.value.upper()} refuses the prober (its address, name or "
        "session), not the recipient",
    )


def _rcpt_5xx(code: int, enhanced: EnhancedCode | None, text: str) -> Classification:
    lowered = _QUOTED_PATH.sub("<>", text).lower()  # once for every phrase list below
    phrase = _mentions(lowered, SENDER_TEXTS)
    if phrase is not None:
        return Classification(
            Verdict.TEMPFAIL,
            Basis.SENDER,
            f'"{phrase}" at RCPT TO refuses the probe\'s sender, not the recipient (Postfix '
            "delays sender restrictions to RCPT TO with smtpd_delay_reject = yes)",
        )
    phrase = _mentions(lowered, PROBER_TEXTS)
    if phrase is not None:
        return Classification(
            Verdict.TEMPFAIL,
            Basis.PROBER,
            f'"{phrase}" at RCPT TO refuses the prober (its address, HELO name or a '
            "policy), not the recipient (Postfix delays client and HELO restrictions to "
            "RCPT TO with smtpd_delay_reject = yes)",
        )
    unsure = enhanced is None or enhanced.subject == 0 or str(enhanced) == "5.1.0"
    if unsure and _SENDER_WORD.search(lowered):
        return Classification(
            Verdict.TEMPFAIL,
            Basis.SENDER,
            f"{enhanced or code} names the sender: it refuses the sender, not the recipient",
        )
    if enhanced is None:
        phrase = _says_unknown(lowered)
        if phrase is not None:
            return Classification(
                Verdict.UNKNOWN,
                Basis.RECIPIENT,
                f'rule bare: a bare {code} (no enhanced status code) that says "{phrase}" '
                "rejects the recipient once a control address of the domain is accepted "
                "on the same session",
                bare=True,
            )
        return Classification(
            Verdict.TEMPFAIL,
            Basis.TEMPORARY,
            f"a bare {code} at RCPT TO does not say the user is unknown: it decides nothing",
        )
    subject = _SUBJECTS.get(enhanced.subject, "an unassigned subject")
    if enhanced.subject == 1 and enhanced.detail in (7, 8):
        return Classification(
            Verdict.TEMPFAIL,
            Basis.SENDER,
            f"{enhanced} is about the sender's address, not the recipient",
        )
    if enhanced.subject == 1:
        return Classification(
            Verdict.UNKNOWN,
            Basis.RECIPIENT,
            f"rule explicit: {enhanced} ({subject}) rejects the recipient",
        )
    if (enhanced.subject, enhanced.detail) == (4, 1):
        return Classification(
            Verdict.UNKNOWN,
            Basis.RECIPIENT,
            f"rule explicit: {enhanced} at RCPT TO is Microsoft 365's directory-based "
            "blocking: the recipient is not in the directory",
        )
    if (enhanced.subject, enhanced.detail) == (2, 4):
        return Classification(
            Verdict.UNKNOWN,
            Basis.RECIPIENT,
            f"rule explicit: {enhanced} (the recipient cannot be expanded) is OpenSMTPD's "
            "answer for a recipient its tables do not know",
        )
    if enhanced.subject == 0 and _says_unknown(lowered) is not None:
        return Classification(
            Verdict.UNKNOWN,
            Basis.RECIPIENT,
            f"rule explicit: {enhanced} ({subject}) with a text that says the user is unknown",
        )
    if enhanced.subject == 2:
        return Classification(
            Verdict.TEMPFAIL,
            Basis.MAILBOX,
            f"{enhanced} ({subject}): the mailbox exists but cannot take mail now",
        )
    if enhanced.subject in (3, 5, 7):
        return Classification(
            Verdict.TEMPFAIL,
            Basis.PROBER,
            f"{enhanced} ({subject}) refuses the probe, not the recipient",
        )
    return Classification(
        Verdict.TEMPFAIL,
        Basis.TEMPORARY,
        f"{enhanced} ({subject}) does not say the recipient is unknown",
    )


def unproven(reply: str) -> Classification:
    """A bare rejection on a session that accepted no control address of the domain."""
    return Classification(
        Verdict.TEMPFAIL,
        Basis.UNPROVEN,
        "rule bare: no control address of the domain was accepted on the same session ("
        + reply
        + "), so a bare rejection proves nothing about the recipient",
    )


def drifted(control: str, reply: str) -> Classification:
    """A rejection of the recipient on a session where a recently verified address of
    the domain (the control) was rejected as unknown too."""
    return Classification(
        Verdict.TEMPFAIL,
        Basis.DRIFT,
        f"rule drift: {control}, verified valid recently, was refused on the same session "
        f"({reply}): the primary may have stopped judging recipients, so its rejections "
        "decide nothing on this session",
    )


def refuses_multi_recipient_bounce(code: int, text: str) -> bool:
    """``5.5.3`` (too many recipients) or Postfix's "Multi-recipient bounce" at RCPT TO."""
    if not 500 <= code < 600:
        return False
    enhanced = enhanced_code(code, text)
    return (enhanced is not None and (enhanced.subject, enhanced.detail) == (5, 3)) or (
        _mentions(_QUOTED_PATH.sub("<>", text).lower(), MULTI_RECIPIENT_TEXTS) is not None
    )
