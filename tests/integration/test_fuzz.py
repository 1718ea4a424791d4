"""Fuzz both front ends through a real Postfix: odd ``RCPT TO`` arguments, sent over a
raw socket (smtplib would quote, reject or re-encode them first), reach callahead as
Postfix passes them on, each one through its milter and through its policy service.

The rig is this module's own: a stand-in primary (``tests.harness.primary.Primary``,
550 5.1.1 for users it does not know), one ``callahead serve`` with both front ends,
and a real Postfix backup MX with two listeners, one with callahead as its milter
(``deploy/postfix-main.cf``) and one asking it as a policy service
(``deploy/postfix-policy-main.cf``).

For every example and each front end: Postfix's reply to the RCPT is a well-formed
SMTP reply; callahead is still running and logs no traceback and no error, every line
of its log is one line (no field of the sender's could start a new one), every decision
line has exactly the fields of ``judge.decision_line`` with the recipient escaped, at
most one decision line per RCPT, and the reply says what the decision line says. Then
the two front ends are compared: both judged the RCPT or neither did, the same mailbox
(the milter gets the client's external form, the policy service Postfix's internal
one; each writes it as Postfix relays it), with the same decision. After the run
``callahead_errors_total`` is still 0, Postfix logged no warning about either front
end, and each still answers a known user 250 and an unknown one 550.

What Postfix 3.7 does before callahead sees anything: invalid UTF-8 gets ``500 5.5.2
Error: bad UTF-8 syntax`` (with or without SMTPUTF8), control characters, NUL, labels
over 63 octets and unbalanced quotes ``501 5.1.3``, lines over 2048 octets are cut,
unknown parameters ``555 5.5.4``, other domains ``454 4.7.1``. So no non-UTF-8 recipient
reaches callahead through a real Postfix, and 8-bit UTF-8 local parts do with or
without SMTPUTF8 on MAIL FROM.

Bounded for CI: a fixed number of examples, ``derandomize=True`` (the same examples
every run), no example database, a deadline per example.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.harness.callahead_process import CallaheadProcess
from tests.harness.fixtures import make_workdir
from tests.harness.ports import free_port
from tests.harness.postfix import Listener, PostfixInstance, backup_mx_main_cf, policy_listener
from tests.harness.primary import Primary

DOMAIN = "fuzz.test"
KNOWN = f"known@{DOMAIN}"
SENDER = "sender@remote.test"
EXAMPLES = 150
"""Generated examples, each sent through both front ends (the explicit ``@example``
cases come on top)."""
DEADLINE = timedelta(seconds=10)
"""Per example; a stuck service is caught here (Postfix would wait 30 s for it)."""
READ_TIMEOUT = 20.0

REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -])([^\r\n\x00]*)\r\n")
"""One line of an SMTP reply (RFC 5321 4.2): code, separator, text, CRLF."""
LOG_LINE = re.compile(
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [\w.]+\[\d+\]: (DEBUG|INFO|WARNING|ERROR|CRITICAL) "
)
"""How every line of callahead's log starts (cli.py's logging format)."""
_FIELD = r'(?:[^\s\\"<>=]|\\x[0-9a-f]{2}|\\u[0-9a-f]{4}|\\U[0-9a-f]{8})'
"""One character of a field escaped by ``logfmt.escape``."""
DECISION_LINE = re.compile(
    rf"(?P<queue>{_FIELD}+): client=(?P<client>{_FIELD}+)"
    rf" rcpt=<(?P<rcpt>{_FIELD}*)> decision=(?P<decision>accept|reject|defer|skip)"
    r" reason=(?P<reason>[a-z_]+)"
    r"(?: dry_run=yes)?"
    r"(?: primary=\S+ stage=[a-z_]+ code=(?:-|\d{3}) probe_time=\d+\.\d{3}s)?"
    rf'(?: reply="(?:{_FIELD}| )*")?'
)
"""The whole body of a decision line (``judge.decision_line``), nothing after it."""
DECISION_LOGGER = " callahead.decision["


# --- the rig ------------------------------------------------------------------------------


@dataclass
class Rig:
    workdir: Path
    primary: Primary
    callahead: CallaheadProcess
    backup: PostfixInstance
    ports: dict[str, int]
    """The backup listener of each front end: ``milter`` and ``policy``."""

    def log_size(self) -> int:
        return self.callahead.log_path.stat().st_size

    def log_since(self, offset: int) -> str:
        with self.callahead.log_path.open("rb") as log:
            log.seek(offset)
            return log.read().decode("utf-8", "replace")

    def front_end_warnings(self) -> list[str]:
        """The backup's warnings about talking to callahead (a dropped or garbled
        connection: Postfix then applies its default action, and the client sees 250)."""
        ends = (self.callahead.socket, f"127.0.0.1:{self.callahead.policy_port}")
        return [
            line
            for line in self.backup.maillog().splitlines()
            if "warning:" in line and any(end in line for end in ends)
        ]

    def errors(self) -> float:
        return self.callahead.samples().get(("callahead_errors_total", ()), 0.0)


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    if os.geteuid() != 0:
        pytest.skip("the integration tests run a real Postfix, whose master needs root")
    with make_workdir("callahead-fuzz-") as workdir, contextlib.ExitStack() as started:
        primary = started.enter_context(Primary([KNOWN]))
        callahead = started.enter_context(
            CallaheadProcess(
                workdir,
                {
                    "CALLAHEAD_ROUTES": f"{DOMAIN}=[127.0.0.1]:{primary.port}",
                    "CALLAHEAD_PROBE_TIMEOUT": "5",
                    # Every example comes from 127.0.0.1: no dictionary-attack guard.
                    "CALLAHEAD_CLIENT_UNKNOWN_LIMIT": "0",
                    "CALLAHEAD_CATCHALL_CHECK": "0",
                },
                name="callahead-fuzz",
            )
        )
        ports = {"milter": free_port(), "policy": free_port()}
        backup_dir = workdir / "backup"
        backup = started.enter_context(
            PostfixInstance(
                backup_dir,
                backup_mx_main_cf(
                    workdir=backup_dir,
                    relay_domains=[DOMAIN],
                    transports={DOMAIN: f"[127.0.0.1]:{primary.port}"},
                    milter=None,
                ),
                [
                    Listener(ports["milter"], {"smtpd_milters": callahead.socket}),
                    policy_listener(ports["policy"], callahead.policy_service),
                ],
            )
        )
        yield Rig(workdir, primary, callahead, backup, ports)


# --- a raw SMTP client --------------------------------------------------------------------


class MalformedReply(AssertionError):
    pass


def read_reply(conn: socket.socket, pending: bytearray) -> tuple[int, list[bytes]]:
    """One whole SMTP reply: its code and its lines; ``MalformedReply`` unless every
    line is ``code[ -]text CRLF`` with one code and the last line's separator a space."""
    lines: list[bytes] = []
    code: bytes | None = None
    while True:
        while b"\n" not in pending:
            chunk = conn.recv(65536)
            if not chunk:
                raise MalformedReply(f"connection closed inside a reply after {lines!r}")
            pending += chunk
        end = pending.index(b"\n") + 1
        line = bytes(pending[:end])
        del pending[:end]
        match = REPLY_LINE.fullmatch(line)
        if match is None:
            raise MalformedReply(f"not a reply line: {line!r} (after {lines!r})")
        if code is not None and match.group(1) != code:
            raise MalformedReply(f"reply codes differ: {[*lines, line]!r}")
        code = match.group(1)
        lines.append(line)
        if match.group(2) == b" ":
            return int(code), lines


@dataclass
class Exchange:
    mail: int
    rcpt: int
    reply: list[bytes]


def rcpt_exchange(port: int, rcpt_line: bytes, *, smtputf8: bool) -> Exchange:
    """Banner, EHLO, MAIL FROM (with SMTPUTF8 if asked), then ``rcpt_line`` as it is,
    and QUIT: the RCPT's reply, checked for form."""
    with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT) as conn:
        pending = bytearray()

        def command(line: bytes) -> tuple[int, list[bytes]]:
            conn.sendall(line + b"\r\n")
            return read_reply(conn, pending)

        banner, _ = read_reply(conn, pending)
        assert banner == 220
        ehlo, _ = command(b"EHLO client.test")
        assert ehlo == 250
        mail, _ = command(f"MAIL FROM:<{SENDER}>".encode() + (b" SMTPUTF8" if smtputf8 else b""))
        assert mail == 250
        rcpt, reply = command(rcpt_line)
        with contextlib.suppress(OSError, MalformedReply):
            command(b"QUIT")
        return Exchange(mail, rcpt, reply)


# --- what is sent -------------------------------------------------------------------------

_NAMED_LOCALS = st.sampled_from(
    [
        b"known",
        b"KNOWN",
        b"ghost",
        b'"a b"',
        b'"x decision=reject"',
        b'"x> decision=accept reason=probe_valid <y"',
        b'"a\\"b"',
        b'"\\\\"',
        b'""',
        b'"known"',
        b'"unterminated',
        b'a"b',
        b"a.b",
        b".a",
        b"a..b",
        b"a.",
        b"a%b",
        b"a!b",
        b"a+tag",
        b"a=b",
        b"a\\b",
        b"a b",
        b"a(note)b",
        b"a (note",
        b"a,b",
        b"a:b",
        b"a@b",
        b"a;b",
        b"@",
        b"caf\xc3\xa9",
        b"\xe6\x97\xa5\xe6\x9c\xac",
        b"\xe2\x80\xaeevil",  # RIGHT-TO-LEFT OVERRIDE
        b"a\xc2\x85b",  # NEL
        b"a\xe2\x80\xa8b",  # LINE SEPARATOR
        b"\xff\xfe",
        b"\xc3",
        b"\xed\xa0\x80",  # an encoded surrogate: not UTF-8
    ]
)
_PRINTABLE_LOCALS = st.text(
    alphabet=st.sampled_from("aZ09.!#$%&'*+-/=?^_`{|}~ \"\\()<>@,;:[]é"), min_size=1, max_size=16
).map(lambda text: text.encode())
"""Printable ASCII (atext, specials, blanks, quotes, comments) and a little UTF-8."""
_LOCALS = st.one_of(
    _NAMED_LOCALS,
    _NAMED_LOCALS,
    _PRINTABLE_LOCALS,
    _PRINTABLE_LOCALS,
    # Near and over 64 (RFC 5321's local part), 256 (a path), 500 (what a probe can
    # carry) and 2048 (Postfix's line_length_limit).
    st.sampled_from([63, 64, 65, 250, 256, 480, 490, 500, 512, 1000, 2040, 2100]).map(
        lambda n: b"a" * n
    ),
    st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"")),
    st.lists(
        st.sampled_from(
            [b"a", b"Z", b"0", b".", b" ", b'"', b"\\", b"<", b">", b"=", b"@", b",", b":"]
            + [bytes([n]) for n in (*range(0, 10), *range(11, 32), 127, 128, 0xC3, 0xFF)]
        ),
        min_size=1,
        max_size=12,
    ).map(b"".join),
    st.lists(
        st.sampled_from([b"a", b" ", b"=", b">", b'\\"', b"\\\\", b"\t", b"\x00", b"\x01"])
    ).map(lambda parts: b'"' + b"".join(parts) + b'"'),
)
_USUAL_DOMAINS = st.sampled_from([b"fuzz.test", b"FUZZ.Test", b"fuzz.test."])
_DOMAINS = st.one_of(
    _USUAL_DOMAINS,
    _USUAL_DOMAINS,
    _USUAL_DOMAINS,
    st.sampled_from(
        [
            b"fuzz.test",
            b"FUZZ.Test",
            b"fuzz.test.",
            b"fuzz.test..",
            b".fuzz.test",
            b"sub.fuzz.test",
            b"fuzz..test",
            b"[127.0.0.1]",
            b"[IPv6:::1]",
            b"[fuzz.test]",
            b"fuzz.test:25",
            b"caf\xc3\xa9.fuzz.test",
            b"xn--caf-dma.fuzz.test",
            b"other.test",
            b"fuzz.test\x00.evil",
            b"fuzz.test decision=reject",
            b"",
        ]
    ),
    # Labels of 63 and 64 octets, names near and over 255.
    st.tuples(st.sampled_from([63, 64]), st.integers(1, 5)).map(
        lambda t: b".".join([b"d" * t[0]] * t[1]) + b".fuzz.test"
    ),
)
_WRAPS = st.sampled_from(
    [b"<%s>"] * 10
    + [
        b"%s",
        b"<%s",
        b"%s>",
        b"< %s >",
        b"<<%s>>",
        b"<@a.test,@b.test:%s>",
        b"<@a.test:%s>",
        b"<@:%s>",
        b"<%s> junk",
        b'"<%s>"',
    ]
)
_DSN_PARAMS = [
    b"NOTIFY=NEVER",
    b"NOTIFY=SUCCESS,FAILURE,DELAY",
    b"ORCPT=rfc822;known@fuzz.test",
    b"ORCPT=rfc822;a+2Bb+3D@fuzz.test",
    b"ORCPT=utf-8;caf\xc3\xa9@fuzz.test",
]
"""ESMTP parameters Postfix takes at RCPT TO (DSN)."""
_JUNK_PARAMS = [
    b"NOTIFY=BOGUS",
    b"ORCPT=rfc822;" + b"x" * 600,
    b"ORCPT=",
    b"X-JUNK=1",
    b"JUNK",
    b"=",
    b"decision=reject",
    b"\x00",
    b"\x01=\x7f",
    b"SIZE=10",
    b"BODY=8BITMIME",
    b"RET=HDRS",
]
"""Parameters Postfix refuses at RCPT TO (or only takes at MAIL FROM)."""
_PARAMS = st.one_of(
    st.just(b""),
    st.lists(st.sampled_from(_DSN_PARAMS), min_size=1, max_size=2),
    st.lists(st.sampled_from(_DSN_PARAMS + _JUNK_PARAMS), min_size=1, max_size=3),
).map(lambda params: params if isinstance(params, bytes) else b"".join(b" " + p for p in params))
_VERBS = st.sampled_from([b"RCPT TO:", b"RCPT TO:", b"rcpt to:", b"RCPT TO: ", b"RCPT  TO:"])


@st.composite
def rcpt_lines(draw: st.DrawFn) -> bytes:
    """A whole ``RCPT TO`` command line without its CRLF (and never an LF inside, which
    would make it two commands)."""
    if draw(st.integers(0, 9)) == 0:
        arg = draw(st.binary(max_size=300)).replace(b"\n", b"")
    else:
        local = draw(_LOCALS)
        if local == b"ghost":  # a new one each time, never cached
            local += uuid.UUID(int=draw(st.integers(0, 2**32))).hex[-8:].encode()
        at = draw(st.sampled_from([b"@"] * 8 + [b"@@", b""]))
        arg = draw(_WRAPS) % (local + at + draw(_DOMAINS))
    return draw(_VERBS) + arg + draw(_PARAMS)


# --- the checks ---------------------------------------------------------------------------


def unescape(field: str) -> str:
    return re.sub(
        r"\\x([0-9a-f]{2})|\\u([0-9a-f]{4})|\\U([0-9a-f]{8})",
        lambda m: chr(int(next(g for g in m.groups() if g), 16)),
        field,
    )


def check_log(text: str) -> list[re.Match[str]]:
    """Every line of ``text`` (callahead's log since the example began) is one whole log
    line, with no traceback; each decision line has exactly its fields. Returns the
    decision lines' matches."""
    assert "Traceback" not in text, text
    decisions = []
    for line in text.splitlines():
        start = LOG_LINE.match(line)
        assert start is not None, f"not a log line of its own: {line!r}"
        assert start.group(1) not in ("ERROR", "CRITICAL"), line
        if DECISION_LOGGER not in line:
            continue
        body = line[start.end() :]
        decision = DECISION_LINE.fullmatch(body)
        assert decision is not None, f"malformed decision line: {line!r}"
        decisions.append(decision)
    return decisions


def check_example(rig: Rig, front: str, line: bytes, smtputf8: bool) -> re.Match[str] | None:
    """One RCPT through one front end, checked; its decision line, if it reached
    callahead."""
    offset = rig.log_size()
    exchange = rcpt_exchange(rig.ports[front], line, smtputf8=smtputf8)
    assert not rig.callahead.exited(), rig.callahead.log()[-3000:]
    # A final answer: success or failure, never an intermediate 3xx (or a 1xx).
    assert exchange.rcpt // 100 in (2, 4, 5), exchange
    # The decision line is written before the answer leaves callahead.
    decisions = check_log(rig.log_since(offset))
    assert len(decisions) <= 1, decisions
    if not decisions:
        # Postfix answered on its own; it never reached callahead.
        assert b"Recipient address rejected: User unknown" not in b"".join(exchange.reply)
        return None
    decision = decisions[0]
    verdict = decision.group("decision")
    if verdict == "reject":
        assert exchange.rcpt == 550, (exchange, decision.group(0))
        assert b"5.1.1" in exchange.reply[-1], exchange
    elif verdict == "defer":
        assert exchange.rcpt in (450, 451), (exchange, decision.group(0))
    else:
        assert exchange.rcpt == 250, (exchange, decision.group(0))
    assert "@" in unescape(decision.group("rcpt")) or verdict == "skip", decision.group(0)
    return decision


def mailbox(address: str) -> str:
    """``address`` with a quoted local part unquoted (Postfix's internal form, which is
    what its policy service is told; the milter gets the client's external form), and
    without the brackets a decision line keeps when there was no address to judge (nor
    the case or trailing dot of its domain, kept then too)."""
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    local, at, domain = address.rpartition("@")
    if len(local) >= 2 and local.startswith('"') and local.endswith('"'):
        # Postfix's internal form has a space for a quoted tab (seen here).
        local = re.sub(r"\\(.)", r"\1", local[1:-1]).replace("\t", " ")
    return local + at + domain.lower().rstrip(".")


def compare_front_ends(
    line: bytes, milter: re.Match[str] | None, policy: re.Match[str] | None
) -> None:
    """Both front ends judge the same mailbox the same way."""
    assert (milter is None) == (policy is None), (line, milter, policy)
    if milter is None or policy is None:
        return
    both = (line, milter.group(0), policy.group(0))
    assert mailbox(unescape(milter.group("rcpt"))) == mailbox(unescape(policy.group("rcpt"))), both
    assert milter.group("decision") == policy.group("decision"), both


def known_and_unknown(rig: Rig, front: str) -> None:
    """After a run: the front end still tells a known user from an unknown one."""
    known = rcpt_exchange(rig.ports[front], f"RCPT TO:<{KNOWN}>".encode(), smtputf8=False)
    assert known.rcpt == 250, known
    ghost = f"ghost-{uuid.uuid4().hex[:12]}@{DOMAIN}"
    unknown = rcpt_exchange(rig.ports[front], f"RCPT TO:<{ghost}>".encode(), smtputf8=False)
    assert unknown.rcpt == 550, unknown
    assert b"5.1.1" in unknown.reply[-1]
    assert any(r.address == ghost and r.code == 550 for r in rig.primary.rcpts)


FRONT_ENDS = ("milter", "policy")


def test_odd_recipients_through_both_front_ends(rig: Rig) -> None:
    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=DEADLINE,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(line=rcpt_lines(), smtputf8=st.booleans())
    @example(line=b'RCPT TO:<"a b"@fuzz.test>', smtputf8=False)
    @example(line=b'RCPT TO:<"x decision=reject"@fuzz.test>', smtputf8=False)
    @example(line=b'RCPT TO:<"x> decision=accept reason=cache_hit"@fuzz.test>', smtputf8=False)
    @example(line=b"RCPT TO:<caf\xc3\xa9@fuzz.test>", smtputf8=True)
    @example(line=b"RCPT TO:<caf\xc3\xa9@fuzz.test>", smtputf8=False)
    @example(line=b"RCPT TO:<\xff@fuzz.test>", smtputf8=True)
    @example(line=b"RCPT TO:<" + b"a" * 65 + b"@fuzz.test>", smtputf8=False)
    @example(line=b"RCPT TO:<" + b"a" * 495 + b"@fuzz.test>", smtputf8=False)
    @example(line=b"RCPT TO:<" + b"a" * 2100 + b"@fuzz.test>", smtputf8=False)
    @example(line=b"RCPT TO:<u@" + b"d" * 63 + b"." + b"e" * 63 + b".fuzz.test>", smtputf8=False)
    @example(line=b"RCPT TO:<u\x00v@fuzz.test>", smtputf8=False)
    @example(line=b"RCPT TO:<u\x01\x1b[31mv@fuzz.test>", smtputf8=False)
    @example(line=b"RCPT TO:<known@fuzz.test> NOTIFY=NEVER ORCPT=rfc822;x@y", smtputf8=False)
    @example(line=b"RCPT TO:<ghost@fuzz.test> X-JUNK=1 =", smtputf8=False)
    @example(line=b"RCPT TO:known@fuzz.test", smtputf8=False)
    @example(line=b"RCPT TO:<@a.test,@b.test:known@fuzz.test>", smtputf8=False)
    @example(line=b"RCPT TO:<u@[127.0.0.1]>", smtputf8=False)
    @example(line=b"RCPT TO:<known@fuzz.test.>", smtputf8=False)
    # What the milter used to judge as written, not as Postfix reads and relays it.
    @example(line=b"RCPT TO:ghost1@fuzz.test>", smtputf8=False)
    @example(line=b"RCPT TO:<<ghost2@fuzz.test>>", smtputf8=False)
    @example(line=b"RCPT TO:< ghost3@fuzz.test >", smtputf8=False)
    @example(line=b"RCPT TO:<ghost4 @fuzz.test>", smtputf8=False)
    @example(line=b"RCPT TO:<ghost5(note)@fuzz.test>", smtputf8=False)
    @example(line=b"RCPT TO:<@a.test:ghost6@fuzz.test>", smtputf8=False)
    def run(line: bytes, smtputf8: bool) -> None:
        milter, policy = (check_example(rig, front, line, smtputf8) for front in FRONT_ENDS)
        compare_front_ends(line, milter, policy)

    run()
    assert rig.errors() == 0.0
    assert rig.front_end_warnings() == []
    for front in FRONT_ENDS:
        known_and_unknown(rig, front)
