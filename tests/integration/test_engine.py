"""The probe engine under real primaries and real attacks, through the real backup MX:
a default Postfix primary's error limits and inflow throttle, connection reuse, the
primary-down breaker, bounds, coalescing, the dictionary-attack guard, SMTPUTF8."""

from __future__ import annotations

import asyncio
import re
import smtplib
import time
from concurrent.futures import ThreadPoolExecutor

from callahead.frontends.metrics import Metrics
from callahead.probing.engine import ProbeEngine
from callahead.routing.routes import Nexthop
from callahead.smtp.verdict import ProbeResult, Verdict
from tests.harness.client import Transaction, send
from tests.harness.waiting import wait_for
from tests.unit.settings import probe_settings

from .conftest import SENDER, MetricsDelta, Stack


def pf_connections(stack: Stack) -> int:
    return len(re.findall(r"smtpd\[\d+\]: connect from", stack.pf_primary.maillog()))


def test_default_postfix_primary_500_valid_then_100_unknown(stack: Stack) -> None:
    """A Postfix primary with default limits: 500 valid probes share a connection and
    never hit the inflow delay; 100 unknowns in a row never hit the error sleep."""
    profile = stack.profiles["pf"]
    delta = MetricsDelta(profile.process)
    valid = [f"pf{i}@pf.test" for i in range(500)]
    unknown = [f"nobody{i}@pf.test" for i in range(100)]
    before = pf_connections(stack)

    tx = send(profile.port, SENDER, valid)
    after_valid = pf_connections(stack)
    tx_unknown = send(profile.port, SENDER, unknown)
    after_unknown = pf_connections(stack)

    assert [tx.code(a) for a in valid] == [250] * 500
    assert [tx_unknown.code(a) for a in unknown] == [550] * 100
    slowest_valid = max(tx.rcpt_seconds.values())
    slowest_unknown = max(tx_unknown.rcpt_seconds.values())
    print(
        f"\n500 valid: {after_valid - before} connection(s) to the primary, slowest RCPT "
        f"{slowest_valid * 1000:.1f} ms; 100 unknown: {after_unknown - after_valid} "
        f"connection(s), slowest RCPT {slowest_unknown * 1000:.1f} ms"
    )
    assert after_valid - before <= 3
    assert slowest_valid < 1.0  # in_flow_delay (1 s) never applied
    assert slowest_unknown < 1.0  # smtpd_error_sleep_time (1 s) never applied
    assert delta("callahead_probes_total", outcome="valid") == 500
    assert delta("callahead_probes_total", outcome="unknown") == 100
    assert delta("callahead_probes_total", outcome="tempfail") == 0
    assert delta(
        "callahead_probe_connections_total", primary=f"[127.0.0.1]:{stack.pf_primary.port}"
    ) == (after_unknown - before)


def test_pipelined_probes_on_one_session_to_a_postfix_primary(stack: Stack) -> None:
    """The engine with one pooled session and 40 probes at once against the default
    Postfix primary: they share the session, their RCPTs pipelined (RFC 2920), and each
    gets its own answer; the primary counts no error beyond the error budget and logs
    no improper pipelining."""
    valid = [f"pf{i}@pf.test" for i in range(500, 520)]
    unknown = [stack.new_address("pf.test") for _ in range(20)]
    targets = [a for pair in zip(valid, unknown, strict=True) for a in pair]
    hop = Nexthop("127.0.0.1", stack.pf_primary.port)
    metrics = Metrics()
    log_before = len(stack.pf_primary.maillog())

    async def go() -> list[ProbeResult]:
        engine = ProbeEngine(probe_settings(pool_size=1), metrics)
        try:
            return list(await asyncio.gather(*(engine.probe(a, [hop]) for a in targets)))
        finally:
            await engine.aclose()

    results = asyncio.run(go())

    assert {a: r.verdict for a, r in zip(targets, results, strict=True)} == {
        a: Verdict.VALID if a in valid else Verdict.UNKNOWN for a in targets
    }
    shared = metrics.registry.get_sample_value(
        "callahead_probe_shared_sessions_total", {"primary": str(hop)}
    )
    # A shared session keeps room for the controls its probes' rejections may ask (three
    # per domain), so fewer join it than the 8 of PIPELINE_DEPTH: half of them at least.
    assert shared is not None and shared >= 10
    log = stack.pf_primary.maillog()[log_before:]
    assert "pipelining" not in log
    assert "too many errors" not in log


def test_breaker_answers_at_once_while_the_primary_is_down(stack: Stack) -> None:
    profile = stack.profiles["breaker"]
    delta = MetricsDelta(profile.process)
    primary = f"[127.0.0.1]:{stack.blackhole.port}"
    first = [stack.new_user("blackhole.test") for _ in range(3)]

    tx = send(profile.port, SENDER, first)  # each waits the probe timeout (1 s)
    assert [tx.code(a) for a in first] == [250] * 3
    assert min(tx.rcpt_seconds.values()) >= 0.9
    assert profile.process.samples()[("callahead_breaker_open", (("primary", primary),))] == 1

    rest = [stack.new_user("blackhole.test") for _ in range(100)]
    connections = stack.blackhole.connections
    tx = send(profile.port, SENDER, rest)
    assert [tx.code(a) for a in rest] == [250] * 100
    assert max(tx.rcpt_seconds.values()) < 0.05
    assert stack.blackhole.connections == connections  # no probe while open
    assert delta("callahead_rcpt_decisions_total", decision="accept", reason="primary_down") == 100

    # The primary comes back: within one cooldown (3 s), a probe gets through again.
    stack.blackhole.update(banner="220 blackhole.test ESMTP")
    back = time.monotonic()

    def rejected_again() -> bool:
        addr = stack.new_address("blackhole.test")
        return send(profile.port, SENDER, [addr]).code(addr) == 550

    wait_for(rejected_again, 3 + 2, interval=0.1, what="a 550 after the cooldown")
    assert time.monotonic() - back < 3 + 2
    assert profile.process.samples()[("callahead_breaker_open", (("primary", primary),))] == 0


def test_probe_slots_bound_the_wait(stack: Stack) -> None:
    profile = stack.profiles["overload"]
    delta = MetricsDelta(profile.process)
    addrs = [stack.new_user("stall.test") for _ in range(6)]

    def one(addr: str) -> Transaction:
        return send(profile.port, SENDER, [addr])

    with ThreadPoolExecutor(len(addrs)) as pool:
        results = list(pool.map(one, addrs))

    assert [r.code(a) for r, a in zip(results, addrs, strict=True)] == [250] * 6
    waits = sorted(r.rcpt_seconds[a] for r, a in zip(results, addrs, strict=True))
    # Two probes got the two slots and waited for the stalling primary (4 s); the four
    # others got the tempfail action once the 0.3 s wait for a slot ran out.
    assert waits[3] < 0.3 + 0.5
    assert waits[4] >= 3.5
    assert delta("callahead_rcpt_decisions_total", decision="accept", reason="overload") == 4
    assert len(stack.stall.rcpts()) >= 2


def four_sessions_per_address(port: int, addrs: list[str]) -> list[Transaction]:
    """20 concurrent sessions of 10 RCPTs over 50 addresses: at each step, four sessions
    ask the same address."""

    def session(i: int) -> Transaction:
        mine = [addrs[(step * 5 + i // 4) % 50] for step in range(10)]
        return send(port, SENDER, mine)

    with ThreadPoolExecutor(20) as pool:
        return list(pool.map(session, range(20)))


def test_concurrent_recipients_share_probes(stack: Stack) -> None:
    profile = stack.profiles["coalesce"]
    delta = MetricsDelta(profile.process)
    addrs = [stack.new_address("slow.test") for _ in range(50)]
    rcpts_before = len(stack.slow.rcpts())

    results = four_sessions_per_address(profile.port, addrs)

    codes = [code for r in results for code, _ in r.rcpt.values()]
    assert len(codes) == 20 * 10 - sum(10 - len(r.rcpt) for r in results)
    assert set(codes) == {550}
    # Each unknown verdict's session also asks postmaster@ once: not a probe.
    probes = len([a for a in stack.slow.rcpts()[rcpts_before:] if not a.startswith("postmaster@")])
    assert probes <= 50
    assert delta("callahead_coalesced_waits_total") >= 100


def test_valid_answers_are_shared_without_a_gap(stack: Stack) -> None:
    """200 concurrent RCPTs over 50 new valid addresses, each RCPT answered after 0.5 s:
    exactly one probe per address. The engine writes a valid answer to the cache before
    it drops the in-flight entry, so a request never finds neither (51 probes before)."""
    profile = stack.profiles["coalesce"]
    addrs = [stack.new_address("slow.test") for _ in range(50)]
    stack.slow.update(users=stack.slow.script.users | frozenset(addrs))
    rcpts_before = len(stack.slow.rcpts())

    results = four_sessions_per_address(profile.port, addrs)

    assert {code for r in results for code, _ in r.rcpt.values()} == {250}
    probed = [a for a in stack.slow.rcpts()[rcpts_before:] if not a.startswith("postmaster@")]
    assert sorted(probed) == sorted(addrs)


def test_dictionary_attack_guard(stack: Stack) -> None:
    profile = stack.profiles["guard"]
    delta = MetricsDelta(profile.process)
    known = stack.new_user()
    assert send(profile.port, SENDER, [known]).code(known) == 250  # now cached
    unknown = [stack.new_address() for _ in range(8)]

    tx = send(profile.port, SENDER, unknown)
    codes = [tx.rcpt[a] for a in unknown]
    assert [c for c, _ in codes[:5]] == [550] * 5
    assert all(c == 450 and t.startswith("4.7.1 ") for c, t in codes[5:])
    assert all(stack.primary.probes_for(a) == 0 for a in unknown[5:])  # no probe

    fresh = stack.new_user()
    tx = send(profile.port, SENDER, [known, fresh])
    assert tx.code(known) == 250  # cached valid recipients still pass
    assert tx.code(fresh) == 450  # uncached ones wait for the window
    assert delta("callahead_rcpt_decisions_total", decision="defer", reason="client_limit") == 4


def test_non_ascii_local_part_is_probed_with_smtputf8(stack: Stack) -> None:
    server = stack.faults["rcpt550"]
    addr = "jörg.ß@rcpt550.fault.test"
    with smtplib.SMTP("127.0.0.1", stack.port, local_hostname="client.test") as smtp:
        smtp.ehlo()
        assert smtp.has_extn("smtputf8")
        smtp.command_encoding = "utf-8"
        assert smtp.mail(SENDER, ["SMTPUTF8"])[0] == 250
        code, _ = smtp.rcpt(addr)
        smtp.rset()
    assert code == 550
    mails = [c.line for c in server.commands if c.line.upper().startswith("MAIL")]
    assert mails and mails[-1].upper().endswith("SMTPUTF8")
    assert f"RCPT TO:<{addr}>" in [c.line for c in server.commands]
