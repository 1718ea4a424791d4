"""The pymilter adapter, driven through Milter.testctx.TestCtx."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import Milter
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from Milter import testctx

from callahead.caching.cache import PositiveCache
from callahead.core.guard import ClientGuard
from callahead.core.policy import (
    CLIENT_LIMIT_REPLY,
    DEFER_REPLY,
    NO_DOMAIN_REPLY,
    REJECT_REPLY,
    Policy,
    TempfailAction,
)
from callahead.frontends import adapter as adapter_module
from callahead.frontends.adapter import CallaheadMilter
from callahead.frontends.judge import Judge
from callahead.frontends.metrics import Metrics
from callahead.routing.routes import Nexthop, parse_routes
from callahead.smtp.verdict import Basis, ProbeResult, Skip, Stage, Verdict
from tests.unit.probers import SyncProber, no_domain_result

PRIMARY_HOST = "10.9.8.7"
PRIMARY_PORT = 2526
PRIMARY = f"[{PRIMARY_HOST}]:{PRIMARY_PORT}"
ROUTES = parse_routes(f"example.com={PRIMARY}")
SECRET_REPLY = "5.1.1 <bob@example.com>: mailbox zz-secret-42 unknown at primary.internal"


def result(verdict: Verdict, code: int | None, detail: str) -> ProbeResult:
    return ProbeResult(verdict, Stage.RCPT, code, detail, 0.012, PRIMARY)


VALID = result(Verdict.VALID, 250, "2.1.5 Ok")
UNKNOWN = result(Verdict.UNKNOWN, 550, SECRET_REPLY)
TEMPFAIL = result(Verdict.TEMPFAIL, 451, "4.3.0 primary.internal is busy")


class FakeProber(SyncProber):
    def __init__(self, answers: dict[str, ProbeResult]) -> None:
        self.answers = answers
        self.calls: list[str] = []

    def probe(self, address: str, hops: Sequence[Nexthop]) -> ProbeResult:
        self.calls.append(address)
        return self.answers[address]


class BrokenProber(SyncProber):
    def __init__(self) -> None:
        self.calls = 0

    def probe(self, address: str, hops: Sequence[Nexthop]) -> ProbeResult:
        self.calls += 1
        raise RuntimeError("prober blew up")


class Harness:
    """One milter connection through TestCtx, with its policy, prober and metrics."""

    def __init__(
        self,
        monkeypatch: pytest.MonkeyPatch,
        prober: FakeProber | BrokenProber | AnyProber,
        action: TempfailAction = TempfailAction.ACCEPT,
        guard: ClientGuard | None = None,
    ) -> None:
        self.prober = prober
        self.metrics = Metrics()
        self.policy = Policy(
            routes=ROUTES,
            cache=PositiveCache(ttl=60, maxsize=100),
            prober=prober,
            tempfail_action=action,
            guard=guard,
        )
        self.instances: list[CallaheadMilter] = []
        connections = adapter_module.MilterConnections()  # not the process's own count

        def factory() -> CallaheadMilter:
            milter = CallaheadMilter(Judge(self.policy, self.metrics), self.metrics, connections)
            self.instances.append(milter)
            return milter

        monkeypatch.setattr(Milter, "factory", factory)
        self.ctx: Any = testctx.TestCtx()

    def connect(self, macros: dict[str, str] | None = None) -> None:
        for name, value in (macros or {}).items():
            self.ctx._setsymval(name, value)
        rc = self.ctx._connect(host="client.example.net", helo="client.example.net", ip="192.0.2.7")
        assert rc == Milter.CONTINUE
        assert len(self.instances) == 1
        # Negotiation really happened: otherwise TestCtx skips every callback and the
        # tests below would pass without ever calling envrcpt.
        assert not self.ctx._protocol & Milter.P_NORCPT
        assert self.ctx._envfrom("<sender@example.org>") == Milter.CONTINUE

    def rcpt(self, recipient: str) -> int:
        self.ctx._reply = None
        return int(self.ctx._envrcpt(recipient))

    @property
    def reply(self) -> tuple[str, ...] | None:
        reply: tuple[str, ...] | None = self.ctx._reply
        return reply

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


def test_valid_continues_without_reply(monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness(monkeypatch, FakeProber({"alice@example.com": VALID}))
    h.connect()
    rc = h.rcpt("<alice@example.com>")
    assert rc == Milter.CONTINUE
    assert rc != Milter.ACCEPT
    assert h.reply is None
    assert h.prober.calls == ["alice@example.com"]
    # The cache hit is a CONTINUE as well.
    assert h.rcpt("<alice@example.com>") == Milter.CONTINUE
    assert h.reply is None
    assert h.sample("callahead_rcpt_decisions_total", decision="accept", reason="probe_valid") == 1
    assert h.sample("callahead_rcpt_decisions_total", decision="accept", reason="cache_hit") == 1


def test_a_recipient_domain_that_does_not_exist_rejects_550_512(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    no_domain = no_domain_result(PRIMARY)
    h = Harness(monkeypatch, FakeProber({"bob@example.com": no_domain}))
    h.connect()
    assert h.rcpt("<bob@example.com>") == Milter.REJECT
    assert h.reply == ("550", "5.1.2", NO_DOMAIN_REPLY.text)
    assert h.sample("callahead_rcpt_decisions_total", decision="reject", reason="no_domain") == 1


def test_unknown_rejects_550_511_without_primary_details(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h = Harness(monkeypatch, FakeProber({"bob@example.com": UNKNOWN}))
    h.connect()
    assert h.rcpt("<bob@example.com>") == Milter.REJECT
    assert h.reply is not None
    code, xcode, text = h.reply
    assert (code, xcode) == ("550", "5.1.1")
    assert text == REJECT_REPLY.text
    for secret in (PRIMARY_HOST, str(PRIMARY_PORT), "primary.internal", "zz-secret-42", "mailbox"):
        assert secret not in text
    assert SECRET_REPLY not in text


def test_unrouted_continues_without_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    prober = FakeProber({})
    h = Harness(monkeypatch, prober)
    h.connect()
    assert h.rcpt("<someone@example.org>") == Milter.CONTINUE
    assert h.reply is None
    assert prober.calls == []
    assert h.sample("callahead_rcpt_decisions_total", decision="skip", reason="unrouted") == 1


def test_tempfail_with_accept_continues(monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness(monkeypatch, FakeProber({"carol@example.com": TEMPFAIL}), TempfailAction.ACCEPT)
    h.connect()
    assert h.rcpt("<carol@example.com>") == Milter.CONTINUE
    assert h.reply is None


def test_tempfail_with_defer_tempfails_4xx(monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness(monkeypatch, FakeProber({"carol@example.com": TEMPFAIL}), TempfailAction.DEFER)
    h.connect()
    assert h.rcpt("<carol@example.com>") == Milter.TEMPFAIL
    assert h.reply is not None
    code, xcode, text = h.reply
    assert code.startswith("4")
    assert len(code) == 3
    assert xcode.startswith("4.")
    assert (code, xcode, text) == (DEFER_REPLY.code, DEFER_REPLY.xcode, DEFER_REPLY.text)
    assert "primary.internal" not in text
    assert PRIMARY_HOST not in text


@pytest.mark.parametrize(
    ("action", "expected"),
    [(TempfailAction.ACCEPT, Milter.CONTINUE), (TempfailAction.DEFER, Milter.TEMPFAIL)],
)
def test_internal_error_gets_tempfail_action_and_is_logged_and_counted(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    action: TempfailAction,
    expected: int,
) -> None:
    prober = BrokenProber()
    h = Harness(monkeypatch, prober, action)
    h.connect({"i": "4QUEUE1", "{client_addr}": "192.0.2.7"})
    assert h.sample("callahead_errors_total") == 0
    with caplog.at_level(logging.INFO, logger="callahead"):
        rc = h.rcpt("<dave@example.com>")
    assert rc == expected
    assert rc != Milter.REJECT
    assert prober.calls == 1
    assert h.sample("callahead_errors_total") == 1
    if expected == Milter.TEMPFAIL:
        assert h.reply is not None
        assert h.reply[0].startswith("4")
    else:
        assert h.reply is None
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert errors[0].exc_info is not None
    assert errors[0].exc_info[0] is RuntimeError
    assert "dave@example.com" in errors[0].getMessage()
    assert "4QUEUE1" in errors[0].getMessage()
    assert "Traceback" in caplog.text
    assert "prober blew up" in caplog.text
    assert h.sample("callahead_rcpt_decisions_total", decision=action.value, reason="error") == 1


def test_three_recipients_in_one_message(monkeypatch: pytest.MonkeyPatch) -> None:
    prober = FakeProber({"a@example.com": VALID, "b@example.com": UNKNOWN, "c@example.com": VALID})
    h = Harness(monkeypatch, prober)
    h.connect()
    rcs = []
    replies = []
    for rcpt in ("<a@example.com>", "<b@example.com>", "<c@example.com>"):
        rcs.append(h.rcpt(rcpt))
        replies.append(h.reply)
    assert rcs == [Milter.CONTINUE, Milter.REJECT, Milter.CONTINUE]
    assert replies[0] is None
    assert replies[1] is not None
    assert replies[1][:2] == ("550", "5.1.1")
    assert replies[2] is None
    assert prober.calls == ["a@example.com", "b@example.com", "c@example.com"]
    # All recipients are judged by DATA: ACCEPT spares Postfix the end-of-message step.
    assert h.ctx._data() == Milter.ACCEPT


SKIPPED_STEPS = (
    Milter.P_NOCONNECT,
    Milter.P_NOHELO,
    Milter.P_NOMAIL,
    Milter.P_NOHDRS,
    Milter.P_NOEOH,
    Milter.P_NOBODY,
    Milter.P_NOUNKNOWN,
)
"""Protocol bits that must stay set: callahead never sees these steps."""
CALLED_STEPS = (Milter.P_NORCPT, Milter.P_NODATA, Milter.P_NR_RCPT, Milter.P_NR_DATA)
"""Protocol bits that must be cleared: RCPT and DATA are called and answered."""


def test_protocol_mask_skips_everything_but_rcpt_and_data() -> None:
    mask = CallaheadMilter.protocol_mask()
    for skipped in SKIPPED_STEPS:
        assert not mask & skipped, hex(skipped)  # not cleared: the step stays skipped
    for wanted in CALLED_STEPS:
        assert mask & wanted, hex(wanted)  # cleared: the step is called and answered


def test_negotiated_protocol(monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness(monkeypatch, FakeProber({}))
    assert h.ctx._negotiate() == Milter.CONTINUE
    protocol: int = h.ctx._protocol
    for skipped in SKIPPED_STEPS:
        assert protocol & skipped, hex(skipped)
    for called in CALLED_STEPS:
        assert not protocol & called, hex(called)
    # Only the macros it logs are asked for, at the RCPT stage.
    assert h.ctx._symlist[Milter.M_ENVRCPT] == {b"i", b"{client_addr}"}


QUEUED = {"i": "4ABCDEF123", "{client_addr}": "198.51.100.23"}
"""The macros of a session whose message has its queue ID."""


def _rcpt_log_line(caplog: pytest.LogCaptureFixture) -> str:
    lines = [r.getMessage() for r in caplog.records if r.name == "callahead.decision"]
    assert len(lines) == 1, lines
    return lines[0]


LogRcpt = Callable[[dict[str, ProbeResult], dict[str, str], str], str]


@pytest.fixture
def logged_rcpt(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> LogRcpt:
    """``logged_rcpt(answers, macros, recipient)``: the log line of RCPT TO
    ``recipient`` in a session with ``macros``, the primary answering ``answers``."""

    def log_rcpt(answers: dict[str, ProbeResult], macros: dict[str, str], recipient: str) -> str:
        h = Harness(monkeypatch, FakeProber(answers))
        h.connect(macros)
        with caplog.at_level(logging.INFO, logger="callahead"):
            h.rcpt(recipient)
        return _rcpt_log_line(caplog)

    return log_rcpt


def test_log_line_has_queue_id_and_client(logged_rcpt: LogRcpt) -> None:
    line = logged_rcpt({"bob@example.com": UNKNOWN}, QUEUED, "<bob@example.com>")
    assert line.startswith("4ABCDEF123: ")
    assert "client=198.51.100.23" in line
    assert "rcpt=<bob@example.com>" in line
    assert "decision=reject" in line
    assert "reason=probe_unknown" in line
    assert f"primary={PRIMARY}" in line
    assert "code=550" in line
    # The primary's words are for the log, and only there.
    assert "zz-secret-42" in line


def test_a_forged_recipient_cannot_add_fields_to_the_log_line(logged_rcpt: LogRcpt) -> None:
    forged = '"x> decision=accept reason=cache_hit <"@example.com'
    line = logged_rcpt({forged: UNKNOWN}, QUEUED, f"<{forged}>")
    assert re.findall(r"\bdecision=(\w+)", line) == ["reject"]
    assert re.findall(r"\breason=(\w+)", line) == ["probe_unknown"]
    assert "rcpt=<\\x22x\\x3e\\x20decision\\x3daccept" in line


def test_log_line_without_queue_id_says_noqueue(logged_rcpt: LogRcpt) -> None:
    line = logged_rcpt(
        {"alice@example.com": VALID}, {"{client_addr}": "2001:db8::25"}, "<alice@example.com>"
    )
    assert line.startswith("NOQUEUE: ")
    assert "client=2001:db8::25" in line
    assert "decision=accept reason=probe_valid" in line


class StrictCtx:
    """Like pymilter's C ``milterContext``: ``setsymlist`` takes the list as ``str``
    (TestCtx accepts bytes too, which hid pymilter's own bytes bug)."""

    def __init__(self) -> None:
        self.priv: object = None
        self.symlists: dict[int, str] = {}

    def setpriv(self, priv: object) -> None:
        self.priv = priv

    def setsymlist(self, stage: int, macros: object) -> None:
        if not isinstance(macros, str):
            raise TypeError(f"setsymlist() argument 2 must be str, not {type(macros).__name__}")
        self.symlists[stage] = macros


@pytest.mark.parametrize(
    "offered_actions", [Milter.CURR_ACTS, Milter.CURR_ACTS & ~Milter.SETSYMLIST]
)
def test_negotiate_with_the_c_context(offered_actions: int) -> None:
    policy = Policy(
        routes=ROUTES,
        cache=PositiveCache(ttl=60, maxsize=100),
        prober=FakeProber({}),
        tempfail_action=TempfailAction.ACCEPT,
    )
    metrics = Metrics()
    milter = CallaheadMilter(Judge(policy, metrics), metrics, adapter_module.MilterConnections())
    ctx = StrictCtx()
    milter._setctx(ctx)
    opts = [offered_actions, 0x1FFFFF, 0, 0]

    # Never ALL_OPTS, which would make Postfix call every callback for every message.
    assert milter.negotiate(opts) == Milter.CONTINUE
    assert opts[1] & Milter.P_NOCONNECT and opts[1] & Milter.P_NOHDRS
    assert not opts[1] & Milter.P_NORCPT
    if offered_actions & Milter.SETSYMLIST:
        assert ctx.symlists == {Milter.M_ENVRCPT: "i {client_addr}"}
    else:
        assert ctx.symlists == {}


# --- the guard and skipped probes ------------------------------------------------------


@pytest.mark.parametrize("action", list(TempfailAction))
def test_client_limit_answers_450_471_whatever_the_tempfail_action(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, action: TempfailAction
) -> None:
    prober = FakeProber(
        {"bob@example.com": UNKNOWN, "eve@example.com": UNKNOWN, "alice@example.com": VALID}
    )
    h = Harness(monkeypatch, prober, action, ClientGuard(limit=2, window=600))
    h.connect({"i": "4GUARD", "{client_addr}": "198.51.100.66"})
    assert h.rcpt("<alice@example.com>") == Milter.CONTINUE
    for _ in range(2):
        assert h.rcpt("<bob@example.com>") == Milter.REJECT
    with caplog.at_level(logging.INFO, logger="callahead"):
        rc = h.rcpt("<eve@example.com>")
    assert rc == Milter.TEMPFAIL
    assert h.reply == (CLIENT_LIMIT_REPLY.code, CLIENT_LIMIT_REPLY.xcode, CLIENT_LIMIT_REPLY.text)
    assert h.reply[:2] == ("450", "4.7.1")
    assert prober.calls == ["alice@example.com", "bob@example.com", "bob@example.com"]
    line = _rcpt_log_line(caplog)
    assert "client=198.51.100.66" in line
    assert "decision=defer reason=client_limit" in line
    assert h.sample("callahead_rcpt_decisions_total", decision="defer", reason="client_limit") == 1
    # The valid cached recipient still passes.
    assert h.rcpt("<alice@example.com>") == Milter.CONTINUE
    assert h.reply is None


def skipped(skip: Skip) -> ProbeResult:
    return ProbeResult(Verdict.TEMPFAIL, Stage.CONNECT, None, "no probe", 0.0, PRIMARY, False, skip)


@pytest.mark.parametrize("skip", list(Skip))
@pytest.mark.parametrize(
    ("action", "expected"),
    [(TempfailAction.ACCEPT, Milter.CONTINUE), (TempfailAction.DEFER, Milter.TEMPFAIL)],
)
def test_skipped_probe_gets_the_tempfail_action(
    monkeypatch: pytest.MonkeyPatch, skip: Skip, action: TempfailAction, expected: int
) -> None:
    h = Harness(monkeypatch, FakeProber({"carol@example.com": skipped(skip)}), action)
    h.connect()
    assert h.rcpt("<carol@example.com>") == expected
    if expected == Milter.TEMPFAIL:
        assert h.reply == (DEFER_REPLY.code, DEFER_REPLY.xcode, DEFER_REPLY.text)
    else:
        assert h.reply is None
    assert h.sample("callahead_rcpt_decisions_total", decision=action.value, reason=skip.value) == 1


# --- fuzz: whatever Postfix hands over ---------------------------------------------------


class AnyProber(SyncProber):
    """Answers every address, from a verdict picked by the address itself."""

    ANSWERS = (
        VALID,
        UNKNOWN,
        TEMPFAIL,
        skipped(Skip.OVERLOAD),
        skipped(Skip.PRIMARY_DOWN),
    )

    def __init__(self) -> None:
        self.calls: list[str] = []

    def probe(self, address: str, hops: Sequence[Nexthop]) -> ProbeResult:
        self.calls.append(address)
        return self.ANSWERS[len(address) % len(self.ANSWERS)]


_ROUTED = st.builds(
    lambda local, domain, wrap: f"<{local}@{domain}>" if wrap else f"{local}@{domain}",
    st.text(max_size=80),
    st.sampled_from(["example.com", "EXAMPLE.com.", "example.org", "bücher.example", ""]),
    st.booleans(),
)
_RECIPIENTS = st.one_of(
    st.text(max_size=300),
    _ROUTED,
    st.text(alphabet=st.sampled_from(list('ab@<> "\\\r\n\x00\té.')), max_size=40),
)


@pytest.mark.parametrize("action", list(TempfailAction))
def test_fuzz_recipient_callback(monkeypatch: pytest.MonkeyPatch, action: TempfailAction) -> None:
    prober = AnyProber()
    h = Harness(monkeypatch, prober, action, ClientGuard(limit=5, window=600))
    h.connect({"i": "4FUZZ", "{client_addr}": "192.0.2.99"})
    allowed = {int(Milter.CONTINUE), int(Milter.REJECT), int(Milter.TEMPFAIL)}

    @settings(max_examples=300, deadline=None)
    @given(_RECIPIENTS)
    @example("<\udcff@example.com>")
    @example("<a@example.com>\r\nRSET")
    @example("<" + "x" * 500 + "@example.com>")
    def one(recipient: str) -> None:
        errors = h.sample("callahead_errors_total")
        rc = h.rcpt(recipient)  # an exception escaping here fails the test
        assert rc in allowed
        assert rc != Milter.ACCEPT
        if rc == Milter.REJECT:
            assert h.reply is not None
            assert h.reply[:2] == ("550", "5.1.1")
        elif rc == Milter.TEMPFAIL:
            assert h.reply is not None
            assert h.reply[0].startswith("4")
        else:
            assert h.reply is None
        assert h.sample("callahead_errors_total") == errors  # no internal error either

    one()
    assert prober.calls  # the fuzz did reach the prober


def test_missing_client_address_is_warned_once_and_counted(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(adapter_module, "_warned_no_client", threading.Event())
    prober = FakeProber({"bob@example.com": UNKNOWN})
    h = Harness(monkeypatch, prober, TempfailAction.ACCEPT, ClientGuard(limit=2, window=600))
    h.connect({"i": "4ABCDEF123"})  # no {client_addr}
    with caplog.at_level(logging.WARNING, logger="callahead"):
        for _ in range(3):
            h.rcpt("<bob@example.com>")
    warnings = [r for r in caplog.records if "{client_addr}" in r.getMessage()]
    assert len(warnings) == 1
    value = h.metrics.registry.get_sample_value("callahead_client_address_missing_total")
    assert value == 3


def test_an_accept_because_the_primary_refused_the_prober_logs_its_reply(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    refused = ProbeResult(
        Verdict.TEMPFAIL,
        Stage.RCPT,
        504,
        "5.5.2 <localhost>: Helo command rejected: need fully-qualified hostname",
        0.002,
        PRIMARY,
        basis=Basis.PROBER,
    )
    h = Harness(monkeypatch, FakeProber({"dave@example.com": refused}))
    h.connect(QUEUED)
    with caplog.at_level(logging.INFO, logger="callahead"):
        assert h.rcpt("<dave@example.com>") == Milter.CONTINUE
    line = _rcpt_log_line(caplog)
    assert "decision=accept reason=prober_refused" in line
    assert 'reply="5.5.2 \\x3clocalhost\\x3e: Helo command rejected' in line


@pytest.mark.parametrize(
    "routed",
    [
        "<@relay.example,@other.example:alice@example.com>",
        "<@relay.example:alice@example.com>",
        "@relay.example:alice@example.com",
        "<@:alice@example.com>",
    ],
)
def test_a_source_route_is_dropped_as_postfix_drops_it(
    monkeypatch: pytest.MonkeyPatch, routed: str
) -> None:
    """Postfix hands the milter the RCPT argument as the client wrote it, source route
    and all, but relays to the mailbox alone (RFC 5321 C: the route may be ignored), and
    its policy service is told the mailbox alone. Judged with its route, every route
    prefix was a new address: a cache miss and a fresh probe of a cached user, and a
    routed probe that a primary refusing routes (``501 5.1.3``) turns into a reject."""
    h = Harness(monkeypatch, FakeProber({"alice@example.com": VALID}))
    h.connect()
    assert h.rcpt("<alice@example.com>") == Milter.CONTINUE
    assert h.rcpt(routed) == Milter.CONTINUE
    assert h.reply is None
    assert h.prober.calls == ["alice@example.com"]  # the second one is a cache hit
    assert h.sample("callahead_rcpt_decisions_total", decision="accept", reason="cache_hit") == 1


def asked_about(monkeypatch: pytest.MonkeyPatch, written: str) -> list[str]:
    """The addresses the primary is asked about for RCPT TO ``written``."""
    prober = AnyProber()
    h = Harness(monkeypatch, prober)
    h.connect()
    h.rcpt(written)
    return prober.calls


@pytest.mark.parametrize(
    "recipient",
    ['<"@relay.example:alice"@example.com>', '"@x:"@example.com'],
)
def test_what_only_looks_like_a_source_route_is_judged_as_it_is(
    monkeypatch: pytest.MonkeyPatch, recipient: str
) -> None:
    assert asked_about(monkeypatch, recipient) == [recipient.strip("<>")]


@pytest.mark.parametrize(
    ("written", "asked"),
    [
        ("<a:b@example.com>", '"a:b"@example.com'),
        ('<"ab"@example.com>', "ab@example.com"),
        ('<"a"."b"@example.com>', "a.b@example.com"),
        ('<"a\\"b"@example.com>', '"a\\"b"@example.com'),
        ('<"a\\b"@example.com>', "ab@example.com"),
    ],
)
def test_the_local_part_is_asked_about_as_postfix_relays_it(
    monkeypatch: pytest.MonkeyPatch, written: str, asked: str
) -> None:
    """Postfix quotes a local part when it relays only where it is not a dot-atom,
    and tells its policy service the unquoted form (quoted back there the same way).
    ``a:b@x`` probed unquoted drew a syntax error from the primary (a tempfail: the
    unknown user accepted) while mail went to ``"a:b"@x`` (found by fuzzing)."""
    assert asked_about(monkeypatch, written) == [asked]


def assert_probed_and_rejected_as(
    monkeypatch: pytest.MonkeyPatch, written: str, mailbox: str
) -> None:
    """RCPT TO ``written`` is probed as ``mailbox`` (the one address the primary
    does not know), and only as that, and rejected."""
    h = Harness(monkeypatch, FakeProber({mailbox: UNKNOWN}))
    h.connect()
    assert h.rcpt(written) == Milter.REJECT
    assert h.prober.calls == [mailbox]


def test_an_empty_local_part_is_judged_as_the_empty_quoted_string(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Postfix takes ``RCPT TO:<@example.com>`` and relays it to ``<""@example.com>``
    (its policy service is told ``@example.com``, quoted back the same). Skipped as
    no address, it was accepted unprobed (found by fuzzing both front ends)."""
    assert_probed_and_rejected_as(monkeypatch, "<@example.com>", '""@example.com')


def test_a_tab_in_a_quoted_local_part_is_the_space_postfix_makes_of_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Postfix 3.7 turns ``"a<TAB>b"@x`` into ``"a b"@x`` (seen through a real
    Postfix): that is the mailbox it relays to and tells its policy service. Judged
    with the tab, the address was unsendable and accepted unprobed."""
    assert_probed_and_rejected_as(monkeypatch, '<"a\tb"@example.com>', '"a b"@example.com')


@pytest.mark.parametrize(
    "odd",
    [
        "bob@example.com>",
        "<<bob@example.com>>",
        "< bob@example.com >",
        "<bob@example.com >",
        "<< @relay.example:bob@example.com>",
    ],
)
def test_brackets_that_postfix_forgives_do_not_skip_verification(
    monkeypatch: pytest.MonkeyPatch, odd: str
) -> None:
    """Postfix takes ``RCPT TO:bob@example.com>`` (and doubled or spaced brackets) as
    bob@example.com and relays to it, but hands the milter the argument as written.
    Judged as written, the domain was ``example.com>`` (unrouted: accepted without a
    probe) or the local part `` bob`` (unsendable: the tempfail action), so an
    unknown user written that way got past verification (found by fuzzing the milter
    against the policy service through a real Postfix)."""
    assert_probed_and_rejected_as(monkeypatch, odd, "bob@example.com")


@pytest.mark.parametrize(
    "written",
    [
        "<bob @example.com>",
        "<bob@ example.com>",
        "<bob\t@example.com>",
        "<bob(a note)@example.com>",
        "<b(nested (note))ob@example.com>",
        "<@relay.example, @other.example:bob@example.com>",
        "<b\\ob@example.com>",
    ],
)
def test_blanks_and_comments_outside_quotes_are_dropped_as_postfix_drops_them(
    monkeypatch: pytest.MonkeyPatch, written: str
) -> None:
    """Postfix reads ``<bob @x>``, ``<bob(note)@x>`` and ``<b\\ob@x>`` as bob@x and
    relays to it;
    judged as written, the local part held a blank (unsendable: the tempfail action,
    no probe), so an unknown user written that way got past verification."""
    assert_probed_and_rejected_as(monkeypatch, written, "bob@example.com")


@pytest.mark.parametrize(
    "written",
    [
        '<"a b"@example.com>',
        '<"a(b)"@example.com>',
        '<"a\\" b"@example.com>',
        "<a(open@example.com>",
    ],
)
def test_blanks_and_parentheses_inside_quotes_are_kept(
    monkeypatch: pytest.MonkeyPatch, written: str
) -> None:
    calls = asked_about(monkeypatch, written)
    assert calls in ([written[1:-1]], [])
    if written.startswith('<"'):
        assert calls == [written[1:-1]]


# --- bounds: a long argument, many connections -----------------------------------------

OLD_PATH = re.compile(r"[\s<]*(.*?)[\s>]*", re.DOTALL)
"""The expression the linear ``_path`` replaces: quadratic over a run of blanks or ``>``."""
PATH_TEXT = st.text(alphabet=st.sampled_from(' \t\n\x0b\xa0\u2003<>a@"()\\:,.'), max_size=40)


@given(PATH_TEXT)
@example("<<>>")
@example(" > < ")
@example("\u2003<a@b>\xa0")
def test_the_path_is_taken_out_as_the_old_expression_took_it(to: str) -> None:
    match = OLD_PATH.fullmatch(to)
    assert match is not None
    assert adapter_module._path(to) == match.group(1)


@pytest.mark.parametrize(
    ("written", "judged"),
    [
        ("<bob@example.com>", "<bob@example.com>"),
        ("bob@example.com", "<bob@example.com>"),
        ("< bob@example.com >", "<bob@example.com>"),
        ("<<bob@example.com>>", "<bob@example.com>"),
        ("bob@example.com>", "<bob@example.com>"),
        ("<@relay.example,@other.example:bob@example.com>", "<bob@example.com>"),
        ("<bob(note)@example.com>", "<bob@example.com>"),
        ('<"a b"@example.com>', '<"a b"@example.com>'),
        ("<a:b@example.com>", '<"a:b"@example.com>'),
        ("<@example.com>", '<""@example.com>'),
        ("<>", "<>"),
        ('<"open@example.com>', '<"open@example.com>'),
    ],
)
def test_the_usual_forms_are_judged_as_before(written: str, judged: str) -> None:
    assert adapter_module.milter_recipient(written) == judged


LONG = 64 * 1024
LONG_ARGUMENTS = {
    "blanks inside": "<bob" + " " * LONG + "@example.com>",
    "brackets inside": "<bob@example.com" + ">" * LONG + "x>",
    "a long local part": "<" + "b" * LONG + "@example.com>",
    "a comment": "<(" + "x" * LONG + ")bob@example.com>",
    "a source route": "<@" + ",@a" * (LONG // 3) + ":bob@example.com>",
    "a long domain": "<bob@" + "a." * (LONG // 2) + "example.com>",
    "no address": "<" * LONG,
    "brackets alone": "<" * LONG + ">" * LONG,
}


@pytest.mark.parametrize("action", [TempfailAction.ACCEPT, TempfailAction.DEFER])
@pytest.mark.parametrize("argument", LONG_ARGUMENTS.values(), ids=LONG_ARGUMENTS.keys())
def test_a_64_kib_argument_is_answered_at_once_and_never_rejected(
    monkeypatch: pytest.MonkeyPatch, argument: str, action: TempfailAction
) -> None:
    """The old expression took 17 s over 60 KB of blanks, holding the GIL: the probe
    loop, the policy service and the watchdog stalled with it. An argument this long is
    garbage: never probed, never cached, never a reject (the tempfail action if its
    domain is routed, no opinion if not)."""
    h = Harness(monkeypatch, FakeProber({}), action)  # FakeProber({}) fails if asked
    h.connect()
    started = time.perf_counter()
    rc = h.rcpt(argument)
    elapsed = time.perf_counter() - started
    assert elapsed < 0.5
    assert rc in (Milter.CONTINUE, Milter.TEMPFAIL)
    assert h.prober.calls == []
    assert h.sample("callahead_errors_total") == 0
    assert (
        h.sample("callahead_rcpt_decisions_total", decision="reject", reason="probe_unknown") == 0
    )


def test_a_long_argument_with_a_routed_domain_gets_the_tempfail_action(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h = Harness(monkeypatch, FakeProber({}), TempfailAction.DEFER)
    h.connect()
    assert h.rcpt(LONG_ARGUMENTS["a comment"]) == Milter.TEMPFAIL
    assert h.sample("callahead_rcpt_decisions_total", decision="defer", reason="bad_address") == 1


def negotiated(milter: CallaheadMilter) -> int:
    milter._setctx(StrictCtx())
    return milter.negotiate([Milter.CURR_ACTS, 0x1FFFFF, 0, 0])


def test_beyond_the_cap_a_milter_connection_fails_its_negotiation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """libmilter closes a connection whose negotiation fails at once; Postfix applies
    milter_default_action to that session."""
    policy = Policy(
        routes=ROUTES,
        cache=PositiveCache(ttl=60, maxsize=100),
        prober=FakeProber({}),
        tempfail_action=TempfailAction.ACCEPT,
    )
    metrics = Metrics()
    connections = adapter_module.MilterConnections(limit=2)

    def connect() -> CallaheadMilter:
        return CallaheadMilter(Judge(policy, metrics), metrics, connections)

    first, second = connect(), connect()
    assert negotiated(first) == Milter.CONTINUE
    assert negotiated(second) == Milter.CONTINUE
    with caplog.at_level(logging.WARNING, logger="callahead.adapter"):
        assert negotiated(connect()) == Milter.TEMPFAIL
        assert negotiated(connect()) == Milter.TEMPFAIL
    assert connections.open == 2
    assert metrics.registry.get_sample_value("callahead_milter_connections") == 2
    assert metrics.registry.get_sample_value("callahead_milter_refused_connections_total") == 2
    refusals = [r for r in caplog.records if "milter connection(s) refused" in r.getMessage()]
    assert len(refusals) == 1  # a flood is one line a minute
    first.close()
    first.close()  # libmilter calls it once; twice must not count twice
    assert connections.open == 1
    assert negotiated(connect()) == Milter.CONTINUE
    assert metrics.registry.get_sample_value("callahead_milter_connections") == 2


def test_the_default_cap_leaves_half_the_descriptors_to_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("resource.getrlimit", lambda _: (1024, 4096))
    assert adapter_module.default_limit() == 512
    monkeypatch.setattr("resource.getrlimit", lambda _: (65536, 65536))
    assert adapter_module.default_limit() == adapter_module.MAX_CONNECTIONS
