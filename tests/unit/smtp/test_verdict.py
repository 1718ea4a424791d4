"""The classification table (verdict.py, docs/verdicts.md), case by case.

Every reply quoted here was seen from a real server (Postfix 3.7 with the restrictions
named, Exim 4, OpenSMTPD, Microsoft 365's published replies) or is the one RFC 5321 /
RFC 3463 describes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from callahead.smtp.classify import (
    EnhancedCode,
    classify,
    drifted,
    enhanced_code,
    refuses_multi_recipient_bounce,
    unproven,
)
from callahead.smtp.verdict import Basis, Stage, Verdict

UNKNOWN, VALID, TEMPFAIL = Verdict.UNKNOWN, Verdict.VALID, Verdict.TEMPFAIL

RCPT_CASES = [
    # -- recipient-level: unknown ----------------------------------------------------------
    (
        550,
        "5.1.1 <x@pf.test>: Recipient address rejected: User unknown in virtual mailbox table",
        UNKNOWN,
        Basis.RECIPIENT,
    ),
    (
        550,
        "5.1.1 <x@pf.test>: Recipient address rejected: User unknown in local recipient table",
        UNKNOWN,
        Basis.RECIPIENT,
    ),
    (
        550,
        "5.1.1 <x@pf.test>: Recipient address rejected: User unknown in relay recipient table",
        UNKNOWN,
        Basis.RECIPIENT,
    ),
    (550, "5.1.0 Address rejected", UNKNOWN, Basis.RECIPIENT),
    (
        550,
        "5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
        UNKNOWN,
        Basis.RECIPIENT,
    ),
    (551, "5.1.6 User not local", UNKNOWN, Basis.RECIPIENT),
    (553, "5.1.3 Mailbox name not allowed", UNKNOWN, Basis.RECIPIENT),
    # Microsoft 365 directory-based edge blocking.
    (
        550,
        "5.4.1 Recipient address rejected: Access denied. AS(201806281) [x.prod.outlook.com]",
        UNKNOWN,
        Basis.RECIPIENT,
    ),
    # Exim, OpenSMTPD and others without enhanced codes.
    (550, "Unrouteable address", UNKNOWN, Basis.RECIPIENT),
    (550, "Invalid recipient: <x@example.test>", UNKNOWN, Basis.RECIPIENT),
    # A bare 5xx is unknown only when its text says so ("User not local" does not).
    (551, "User not local; please try <x@elsewhere.test>", TEMPFAIL, Basis.TEMPORARY),
    (550, "Unknown user", UNKNOWN, Basis.RECIPIENT),
    (550, "No such user here", UNKNOWN, Basis.RECIPIENT),
    # Exim denies that refuse the prober, after Debian's ACL accepted postmaster@.
    (550, "Sender rate overlimit", TEMPFAIL, Basis.PROBER),
    (550, "Too many connections from your host", TEMPFAIL, Basis.PROBER),
    (550, "192.0.2.7 is in a black list at zen.example.org", TEMPFAIL, Basis.PROBER),
    (550, "Rejected because 192.0.2.7 is listed at bl.example.org", TEMPFAIL, Basis.PROBER),
    (550, "HELO/EHLO must contain a FQDN", TEMPFAIL, Basis.PROBER),
    (550, "Requested action not taken: mailbox unavailable", TEMPFAIL, Basis.TEMPORARY),
    # The quoted address is the sender's choice, never read for phrases.
    (550, "5.1.1 <michelo@example.test>: User unknown", UNKNOWN, Basis.RECIPIENT),
    (550, "5.1.1 <too-many-listed@example.test>: no such user", UNKNOWN, Basis.RECIPIENT),
    (553, "sorry, no mailbox here by that name. (#5.1.1)", UNKNOWN, Basis.RECIPIENT),
    (550, "5.0.0 <x@example.test>... User unknown", UNKNOWN, Basis.RECIPIENT),
    # OpenSMTPD 6.8 with a virtual user table, for a user it does not know.
    (524, "5.2.4 Mailing list expansion problem: <x@peer.test>", UNKNOWN, Basis.RECIPIENT),
    # Exim and OpenSMTPD for a domain they do not serve.
    (550, "Invalid recipient: <x@elsewhere.example>", UNKNOWN, Basis.RECIPIENT),
    # -- the prober is refused, delayed to RCPT TO by smtpd_delay_reject = yes ------------
    (
        504,
        "5.5.2 <localhost>: Helo command rejected: need fully-qualified hostname",
        TEMPFAIL,
        Basis.PROBER,
    ),
    (550, "5.7.1 <backup.test>: Helo command rejected: Access denied", TEMPFAIL, Basis.PROBER),
    (
        554,
        "5.7.1 <localhost[127.0.0.1]>: Client host rejected: Access denied",
        TEMPFAIL,
        Basis.PROBER,
    ),
    (
        550,
        "5.1.1 <localhost[127.0.0.1]>: Client host rejected: custom text with a 5.1.1",
        TEMPFAIL,
        Basis.PROBER,
    ),
    (
        554,
        "5.7.1 Service unavailable; Client host [192.0.2.7] blocked using zen.spamhaus.org",
        TEMPFAIL,
        Basis.PROBER,
    ),
    (554, "5.7.1 <x@example.test>: Relay access denied", TEMPFAIL, Basis.PROBER),
    (550, "relay not permitted", TEMPFAIL, Basis.PROBER),
    (550, "Administrative prohibition", TEMPFAIL, Basis.PROBER),
    (
        553,
        "sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)",
        TEMPFAIL,
        Basis.PROBER,
    ),
    # Microsoft 365's policy replies.
    (550, "5.7.606 Access denied, banned sending IP [192.0.2.7]", TEMPFAIL, Basis.PROBER),
    (550, "5.7.64 TenantAttribution; Relay Access Denied", TEMPFAIL, Basis.PROBER),
    (
        550,
        "5.7.1 Service unavailable, Client host [192.0.2.7] blocked using Spamhaus",
        TEMPFAIL,
        Basis.PROBER,
    ),
    # A recipient access map's REJECT is policy, not "no such user".
    (
        554,
        "5.7.1 <x@example.test>: Recipient address rejected: Access denied",
        TEMPFAIL,
        Basis.PROBER,
    ),
    (501, "5.5.4 Syntax: RCPT TO:<address>", TEMPFAIL, Basis.PROBER),
    (554, "5.3.0 Mail system unavailable", TEMPFAIL, Basis.PROBER),
    # -- the sender is refused -----------------------------------------------------------------
    (554, "5.7.1 <>: Sender address rejected: Access denied", TEMPFAIL, Basis.SENDER),
    (550, "Verification failed for <>\nsender verify failed", TEMPFAIL, Basis.SENDER),
    (
        553,
        "5.1.8 <x@nowhere.invalid>: Sender address rejected: Domain not found",
        TEMPFAIL,
        Basis.SENDER,
    ),
    (550, "5.1.7 Bad sender address syntax", TEMPFAIL, Basis.SENDER),
    # -- texts about the sender, the client host or its DNS are never "unknown" (issue 27) ----
    (554, "5.1.0 Sender Denied", TEMPFAIL, Basis.SENDER),  # Exchange's sender filter
    (550, "5.1.0 Sender rejected", TEMPFAIL, Basis.SENDER),
    (550, "5.1.0 <b@example.test> sender rejected. AUP#CDRBL", TEMPFAIL, Basis.SENDER),
    (
        550,
        "5.1.0 192.0.2.7 is not allowed to send from <x.test> per it's SPF Record",
        TEMPFAIL,
        Basis.SENDER,
    ),
    (550, "Your host does not exist in DNS", TEMPFAIL, Basis.PROBER),
    (550, "5.0.0 Your host does not exist in DNS", TEMPFAIL, Basis.PROBER),
    (550, "Host does not exist", TEMPFAIL, Basis.TEMPORARY),
    (550, "Domain of sender address x@nowhere.test does not exist", TEMPFAIL, Basis.SENDER),
    (550, "5.0.0 Sender domain does not exist", TEMPFAIL, Basis.SENDER),
    (550, "The domain of your address does not exist", TEMPFAIL, Basis.TEMPORARY),
    (550, "5.7.1 Client host rejected: cannot find your reverse hostname", TEMPFAIL, Basis.PROBER),
    (550, "5.1.1 Refused due to recipient preferences", TEMPFAIL, Basis.PROBER),
    # ... while "does not exist" about the recipient still is.
    (550, "The email account that you tried to reach does not exist", UNKNOWN, Basis.RECIPIENT),
    (550, "<x@example.test>... User not exist", UNKNOWN, Basis.RECIPIENT),
    (550, "Recipient address does not exist", UNKNOWN, Basis.RECIPIENT),
    (550, "5.0.0 Mailbox does not exist", UNKNOWN, Basis.RECIPIENT),
    (
        554,
        "delivery error: dd This user doesn't have a yahoo.com account",
        UNKNOWN,
        Basis.RECIPIENT,
    ),
    (550, "5.1.0 <sender@example.test>: Address rejected", UNKNOWN, Basis.RECIPIENT),
    # -- the mailbox exists but cannot take mail ----------------------------------------------
    (552, "5.2.2 Mailbox full", TEMPFAIL, Basis.MAILBOX),
    (550, "5.2.1 Mailbox disabled, not accepting messages", TEMPFAIL, Basis.MAILBOX),
    # -- throttling: undecided, and a fresh session --------------------------------------------
    (452, "4.5.3 Too many recipients", TEMPFAIL, Basis.THROTTLE),
    (452, "4.2.2 Insufficient system storage", TEMPFAIL, Basis.THROTTLE),
    (
        451,
        "4.7.500 Server busy. Please try again later from [192.0.2.7]. (S77719)",
        TEMPFAIL,
        Basis.THROTTLE,
    ),
    (
        450,
        "4.7.650 The mail server [192.0.2.7] has been temporarily rate limited",
        TEMPFAIL,
        Basis.THROTTLE,
    ),
    # -- anything else temporary or unclear -----------------------------------------------------
    (450, "4.2.0 Mailbox busy", TEMPFAIL, Basis.TEMPORARY),
    (451, "4.3.0 Local error in processing", TEMPFAIL, Basis.TEMPORARY),
    (
        450,
        "4.1.1 <x@pf.test>: Recipient address rejected: unverified address",
        TEMPFAIL,
        Basis.TEMPORARY,
    ),
    (554, "Transaction failed", TEMPFAIL, Basis.TEMPORARY),
    (552, "Requested mail action aborted", TEMPFAIL, Basis.TEMPORARY),
    (550, "5.0.0 Something went wrong", TEMPFAIL, Basis.TEMPORARY),
    (
        550,
        "4.1.1 mismatched class: the enhanced code is ignored, the bare 550 decides",
        TEMPFAIL,
        Basis.TEMPORARY,
    ),
    # -- valid ------------------------------------------------------------------------------
    (250, "2.1.5 Ok", VALID, Basis.ACCEPTED),
    (251, "2.1.5 User not local; will forward", VALID, Basis.ACCEPTED),
    (252, "2.1.5 Cannot VRFY user, but will accept message", VALID, Basis.ACCEPTED),
]


@pytest.mark.parametrize(("code", "text", "verdict", "basis"), RCPT_CASES)
def test_rcpt_reply(code: int, text: str, verdict: Verdict, basis: Basis) -> None:
    found = classify(Stage.RCPT, code, text)
    assert (found.verdict, found.basis) == (verdict, basis), found.why
    assert found.why


@pytest.mark.parametrize(
    ("stage", "code", "text", "basis"),
    [
        (Stage.BANNER, 554, "5.7.1 No SMTP service here", Basis.PROBER),
        (Stage.BANNER, 421, "4.3.2 Service shutting down", Basis.TEMPORARY),
        (Stage.EHLO, 501, "5.5.2 <localhost>: Helo command rejected", Basis.PROBER),
        (Stage.EHLO, 550, "5.1.1 even a recipient-looking code", Basis.PROBER),
        (Stage.MAIL, 553, "5.7.1 <>: Sender address rejected: null sender refused", Basis.SENDER),
        (Stage.MAIL, 550, "5.1.1 recipient-looking code at MAIL", Basis.SENDER),
        (
            Stage.MAIL,
            554,
            "5.7.1 <x[192.0.2.7]>: Client host rejected: Access denied",
            Basis.PROBER,
        ),
        (Stage.MAIL, 451, "4.3.0 try later", Basis.TEMPORARY),
        (Stage.MAIL, 452, "4.5.3 Too many recipients", Basis.TEMPORARY),
        (Stage.STARTTLS, 454, "4.7.0 TLS not available", Basis.TEMPORARY),
        (Stage.CONNECT, None, "", Basis.NO_REPLY),
        (Stage.RCPT, None, "", Basis.NO_REPLY),
    ],
)
def test_replies_before_rcpt_never_decide(
    stage: Stage, code: int | None, text: str, basis: Basis
) -> None:
    found = classify(stage, code, text)
    assert found.verdict is TEMPFAIL
    assert found.basis is basis


@pytest.mark.parametrize(
    ("code", "text", "expected"),
    [
        (550, "5.1.1 User unknown", EnhancedCode(5, 1, 1)),
        (550, "5.1.10 RESOLVER.ADR.RecipientNotFound", EnhancedCode(5, 1, 10)),
        (451, "4.7.500 Server busy", EnhancedCode(4, 7, 500)),
        (553, "sorry, no mailbox here by that name. (#5.1.1)", EnhancedCode(5, 1, 1)),
        (550, "4.1.1 wrong class", None),
        (550, "5.1.1x not a code", None),
        (550, "User unknown 5.1.1", None),
        (550, "", None),
    ],
)
def test_enhanced_code(code: int, text: str, expected: EnhancedCode | None) -> None:
    assert enhanced_code(code, text) == expected


@pytest.mark.parametrize(
    ("code", "text", "bare"),
    [
        (550, "5.1.1 <x@example.test>: User unknown in virtual mailbox table", False),
        (550, "5.4.1 Recipient address rejected: Access denied", False),
        (524, "5.2.4 Mailing list expansion problem", False),
        (550, "Unrouteable address", True),
        (550, "Invalid recipient: <x@example.test>", True),
        (553, "sorry, no mailbox here by that name. (#5.1.1)", False),
    ],
)
def test_bare_unknowns_are_marked_for_the_control_rule(code: int, text: str, bare: bool) -> None:
    found = classify(Stage.RCPT, code, text)
    assert found.verdict is UNKNOWN
    assert found.bare is bare
    assert found.why.startswith("rule bare:" if bare else "rule explicit:")


@pytest.mark.parametrize(
    ("code", "text", "refuses"),
    [
        (550, "5.5.3 <u1@example.test>: Recipient address rejected: Multi-recipient bounce", True),
        (550, "Multi-recipient bounce", True),
        (452, "4.5.3 Too many recipients", False),
        (550, "5.1.1 <u1@example.test>: User unknown in relay recipient table", False),
        (554, "5.5.3 Too many recipients", True),
    ],
)
def test_multi_recipient_bounce_refusals(code: int, text: str, refuses: bool) -> None:
    assert refuses_multi_recipient_bounce(code, text) is refuses


def test_drift_is_undecided_and_names_the_control() -> None:
    found = drifted("u1@example.test", "550 5.1.1 User unknown")
    assert (found.verdict, found.basis) == (TEMPFAIL, Basis.DRIFT)
    assert "u1@example.test" in found.why and found.why.startswith("rule drift:")


def test_refusals_of_the_prober_are_marked() -> None:
    assert {b for b in Basis if b.refuses_prober} == {Basis.PROBER, Basis.SENDER, Basis.UNPROVEN}
    found = unproven("504 5.5.2 <localhost>: Helo command rejected")
    assert (found.verdict, found.basis) == (TEMPFAIL, Basis.UNPROVEN)
    assert "Helo command rejected" in found.why


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from(list(Stage)),
    st.one_of(st.none(), st.integers(-1000, 10_000)),
    st.text(max_size=80),
)
def test_only_rcpt_decides_and_only_5xx_is_unknown(
    stage: Stage, code: int | None, text: str
) -> None:
    found = classify(stage, code, text)
    if found.verdict is VALID:
        assert stage is Stage.RCPT and code is not None and 200 <= code < 300
    if found.verdict is UNKNOWN:
        assert stage is Stage.RCPT and code is not None and 500 <= code < 600
        assert found.basis is Basis.RECIPIENT


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(
        [
            "Client host rejected",
            "Helo command rejected",
            "Sender address rejected",
            "blocked using",
        ]
    ),
    st.sampled_from(["5.1.1 ", "5.4.1 ", "", "5.0.0 User unknown "]),
    st.sampled_from([550, 551, 553, 554]),
)
def test_postfix_delayed_rejections_are_never_unknown(
    phrase: str, code_text: str, code: int
) -> None:
    assert classify(Stage.RCPT, code, f"{code_text}<x>: {phrase}: whatever").verdict is TEMPFAIL
