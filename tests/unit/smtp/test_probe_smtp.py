"""The SMTP probe through the engine, against a scripted SMTP server on loopback (no
Postfix): one probe per test, the dialogue and how each reply is classified."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import pytest

from callahead.frontends.metrics import Metrics
from callahead.probing import loop as loop_module
from callahead.probing.engine import ProbeEngine
from callahead.probing.loop import HANDOFF_MARGIN, LoopProber, ProbeLoop
from callahead.process.cli import main
from callahead.routing.routes import Nexthop
from callahead.smtp.verdict import ProbeResult, Stage, Verdict
from tests.harness.fixtures import StartScripted
from tests.harness.ports import free_port
from tests.harness.scripted import Script, ScriptedServer
from tests.harness.waiting import wait_for
from tests.unit.engines import AnsweredEngine
from tests.unit.probing.test_engine import NO_SMTPUTF8, hop, run
from tests.unit.settings import probe_settings

HELO = "backup.example.net"
OK = "250 2.1.5 Ok"
UNKNOWN = "550 5.1.1 Recipient address rejected: User unknown in virtual mailbox table"
TRY_LATER = "451 4.3.0 Temporary lookup failure"


@dataclass
class Probed:
    result: ProbeResult
    elapsed: float
    at_end: list[list[str]]
    """What each server had received when the probe returned (before ``aclose``)."""


def probe_with(
    servers: list[ScriptedServer],
    address: str = "user@example.test",
    *,
    sender: str = "",
    timeout: float = 5.0,
    before: list[Nexthop] | None = None,
) -> Probed:
    """Probe ``address`` at the nexthops ``before`` and then at ``servers`` in order,
    close the engine, and return the result and the probe's time."""

    async def go() -> Probed:
        hops = (before or []) + [hop(server) for server in servers]
        engine = ProbeEngine(probe_settings(helo_name=HELO, sender=sender, timeout=timeout))
        try:
            started = time.monotonic()
            result = await engine.probe(address, hops)
            elapsed = time.monotonic() - started
            at_end = [server.lines for server in servers]
        finally:
            # Pooled sessions are closed (QUIT where polite) only now.
            await engine.aclose()
        return Probed(result, elapsed, at_end)

    return run(go)


def probe_one(
    scripted: StartScripted,
    script: Script,
    address: str = "user@example.test",
    *,
    sender: str = "",
    timeout: float = 5.0,
) -> tuple[ProbeResult, ScriptedServer, float]:
    """Probe ``address`` at one scripted primary that follows ``script``."""
    server = scripted(script)
    probed = probe_with([server], address, sender=sender, timeout=timeout)
    return probed.result, server, probed.elapsed


# --- the dialogue ----------------------------------------------------------------------


def test_dialogue_with_null_sender(scripted: StartScripted) -> None:
    server = scripted(Script(rcpt_default=OK, extensions=NO_SMTPUTF8))
    probed = probe_with([server])
    result = probed.result
    dialogue = [f"EHLO {HELO}", "MAIL FROM:<>", "RCPT TO:<user@example.test>"]
    # The session stays open in the pool after the probe: no QUIT, no RSET yet ...
    assert probed.at_end == [dialogue]
    # ... and is closed politely when the engine is closed.
    assert server.lines == [*dialogue, "QUIT"]
    assert server.connections == 1
    assert result.verdict is Verdict.VALID
    assert result.stage is Stage.RCPT
    assert result.code == 250
    assert "2.1.5 Ok" in result.detail
    assert result.primary == str(hop(server))
    assert result.duration > 0


def test_dialogue_with_configured_sender(scripted: StartScripted) -> None:
    script = Script(extensions=NO_SMTPUTF8)
    _, server, _ = probe_one(scripted, script, sender="probe@backup.example.net")
    assert server.lines[1] == "MAIL FROM:<probe@backup.example.net>"


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [
        (OK, Verdict.VALID),
        ("251 2.1.5 User not local; will forward", Verdict.VALID),
        (UNKNOWN, Verdict.UNKNOWN),
        ("551 5.1.6 User not local", Verdict.UNKNOWN),
        ("553 5.1.3 Mailbox name not allowed", Verdict.UNKNOWN),
        ("450 4.2.0 Mailbox busy", Verdict.TEMPFAIL),
        (TRY_LATER, Verdict.TEMPFAIL),
        ("452 4.2.2 Insufficient system storage", Verdict.TEMPFAIL),
    ],
)
def test_rcpt_reply_decides(scripted: StartScripted, reply: str, verdict: Verdict) -> None:
    """2xx is valid, 5xx about the recipient unknown, 4xx undecided."""
    result, _, _ = probe_one(scripted, Script(rcpt_default=reply))
    assert (result.verdict, result.stage, result.code) == (verdict, Stage.RCPT, int(reply[:3]))


@pytest.mark.parametrize(
    "banner", ["421 4.3.2 Service shutting down", "554 5.7.1 No SMTP service here"]
)
def test_bad_banner_is_tempfail(scripted: StartScripted, banner: str) -> None:
    result, server, _ = probe_one(scripted, Script(banner=banner, rcpt_default=UNKNOWN))
    assert (result.verdict, result.stage, result.code) == (
        Verdict.TEMPFAIL,
        Stage.BANNER,
        int(banner[:3]),
    )
    assert "EHLO" not in server.verbs()
    assert "RCPT" not in server.verbs()


def test_ehlo_refused_falls_back_to_helo(scripted: StartScripted) -> None:
    script = Script(ehlo="500 5.5.1 Command unrecognized", rcpt_default=UNKNOWN)
    result, server, _ = probe_one(scripted, script)
    assert server.lines[:4] == [
        f"EHLO {HELO}",
        f"HELO {HELO}",
        "MAIL FROM:<>",
        "RCPT TO:<user@example.test>",
    ]
    assert (result.verdict, result.code) == (Verdict.UNKNOWN, 550)


@pytest.mark.parametrize(
    ("ehlo", "helo"),
    [
        ("500 5.5.1 Command unrecognized", "500 5.5.1 Command unrecognized"),
        ("502 5.5.2 Error: command not recognized", "550 5.7.1 Access denied"),
        ("554 5.7.1 Access denied", "501 5.5.2 Syntax: HELO hostname"),
    ],
)
def test_ehlo_and_helo_refused_is_tempfail(scripted: StartScripted, ehlo: str, helo: str) -> None:
    result, server, _ = probe_one(scripted, Script(ehlo=ehlo, helo=helo, rcpt_default=UNKNOWN))
    assert (result.verdict, result.stage, result.code) == (
        Verdict.TEMPFAIL,
        Stage.EHLO,
        int(helo[:3]),
    )
    assert "MAIL" not in server.verbs()
    assert "RCPT" not in server.verbs()


@pytest.mark.parametrize(
    "mail",
    [
        "550 5.7.1 <>: Sender address rejected: Access denied",
        "553 5.1.7 <>: Sender address rejected: null sender refused",
        "451 4.3.0 <>: Temporary lookup failure",
    ],
)
def test_mail_from_refused_is_tempfail_and_rcpt_never_sent(
    scripted: StartScripted, mail: str
) -> None:
    result, server, _ = probe_one(scripted, Script(mail=mail, rcpt_default=UNKNOWN))
    assert (result.verdict, result.stage, result.code) == (
        Verdict.TEMPFAIL,
        Stage.MAIL,
        int(mail[:3]),
    )
    assert result.reached
    assert "RCPT" not in server.verbs()


def test_mail_from_421_is_tempfail_not_reached_and_rcpt_never_sent(
    scripted: StartScripted,
) -> None:
    # 421 means the primary is closing the session: a connection-level failure (it
    # feeds the breaker), reported without a decisive code.
    script = Script(mail="421 4.3.2 Service shutting down", rcpt_default=UNKNOWN)
    result, server, _ = probe_one(scripted, script)
    assert result.verdict is Verdict.TEMPFAIL
    assert result.stage is Stage.MAIL
    assert not result.reached
    assert "421" in result.detail
    assert "RCPT" not in server.verbs()
    assert server.count("MAIL") == 1  # a lost fresh session is not retried


def test_disconnect_after_mail_is_tempfail(scripted: StartScripted) -> None:
    result, server, _ = probe_one(scripted, Script(hang_up_at="MAIL", rcpt_default=UNKNOWN))
    assert result.verdict is Verdict.TEMPFAIL
    assert result.stage is Stage.MAIL
    assert result.code is None
    assert "RCPT" not in server.verbs()


def test_disconnect_after_rcpt_is_tempfail(scripted: StartScripted) -> None:
    result, server, _ = probe_one(scripted, Script(hang_up_at="RCPT"))
    assert (result.verdict, result.stage, result.code) == (Verdict.TEMPFAIL, Stage.RCPT, None)
    assert "RCPT TO:<user@example.test>" in server.lines


def test_hang_up_without_banner_is_tempfail(scripted: StartScripted) -> None:
    script = Script(hang_up_at="BANNER", rcpt_default=UNKNOWN)
    result, server, elapsed = probe_one(scripted, script, timeout=2)
    assert result.verdict is Verdict.TEMPFAIL
    assert result.code is None
    assert result.stage in (Stage.CONNECT, Stage.BANNER)
    assert server.connections == 1
    assert elapsed < 1.0


def test_disconnect_after_ehlo_is_tempfail(scripted: StartScripted) -> None:
    result, server, _ = probe_one(scripted, Script(hang_up_at="EHLO", rcpt_default=UNKNOWN))
    assert (result.verdict, result.stage, result.code) == (Verdict.TEMPFAIL, Stage.EHLO, None)
    assert "MAIL" not in server.verbs()


def test_never_greets_is_tempfail_within_timeout(scripted: StartScripted) -> None:
    timeout = 0.5
    script = Script(banner=None, rcpt_default=UNKNOWN)
    result, server, elapsed = probe_one(scripted, script, timeout=timeout)
    assert result.verdict is Verdict.TEMPFAIL
    assert result.code is None
    assert result.stage in (Stage.CONNECT, Stage.BANNER)
    assert server.connections == 1
    assert server.lines == []
    assert timeout * 0.9 <= elapsed < timeout + 0.4


def test_connection_refused_is_tempfail_at_connect() -> None:
    port = free_port()  # nobody listens there
    probed = probe_with([], before=[Nexthop("127.0.0.1", port)], timeout=2)
    result, elapsed = probed.result, probed.elapsed
    assert (result.verdict, result.stage, result.code) == (Verdict.TEMPFAIL, Stage.CONNECT, None)
    assert result.primary == f"[127.0.0.1]:{port}"
    assert elapsed < 1.0


@pytest.mark.parametrize("slow", ["BANNER", "EHLO", "MAIL", "RCPT"])
def test_reply_slower_than_timeout_is_tempfail(scripted: StartScripted, slow: str) -> None:
    timeout = 0.5
    script = Script(rcpt_default=UNKNOWN, delay={slow: 3.0})
    result, _, elapsed = probe_one(scripted, script, timeout=timeout)
    assert result.verdict is Verdict.TEMPFAIL
    assert result.code is None
    assert elapsed < timeout + 0.4
    if slow == "RCPT":
        assert result.stage is Stage.RCPT


def test_slow_but_in_time_reply_still_decides(scripted: StartScripted) -> None:
    script = Script(rcpt_default=UNKNOWN, delay={"RCPT": 0.2})
    result, _, _ = probe_one(scripted, script, timeout=2)
    assert result.verdict is Verdict.UNKNOWN


def test_failover_refused_then_unknown_from_second(scripted: StartScripted) -> None:
    second = scripted(Script(rcpt_default=UNKNOWN))
    refused = Nexthop("127.0.0.1", free_port())
    result = probe_with([second], before=[refused]).result
    assert (result.verdict, result.stage, result.code) == (Verdict.UNKNOWN, Stage.RCPT, 550)
    assert result.primary == str(hop(second))
    assert second.connections == 1
    assert "RCPT TO:<user@example.test>" in second.lines


@pytest.mark.parametrize(
    ("first_reply", "verdict"), [(OK, Verdict.VALID), (UNKNOWN, Verdict.UNKNOWN)]
)
def test_failover_definite_first_answer_never_contacts_second(
    scripted: StartScripted, first_reply: str, verdict: Verdict
) -> None:
    first = scripted(Script(rcpt_default=first_reply))
    second = scripted(Script(rcpt_default=OK if first_reply == UNKNOWN else UNKNOWN))
    result = probe_with([first, second]).result
    assert result.verdict is verdict
    assert result.primary == str(hop(first))
    assert first.connections == 1
    assert second.connections == 0
    assert second.lines == []


def test_failover_tempfail_tries_the_next(scripted: StartScripted) -> None:
    first = scripted(Script(rcpt_default=TRY_LATER))
    second = scripted(Script(rcpt_default=OK))
    result = probe_with([first, second]).result
    assert result.verdict is Verdict.VALID
    assert result.primary == str(hop(second))
    assert first.connections == 1
    assert second.connections == 1


def test_all_nexthops_tempfail_reports_the_last(scripted: StartScripted) -> None:
    first = scripted(Script(rcpt_default=TRY_LATER))
    second = scripted(Script(mail="550 5.7.1 <>: Sender address rejected: Access denied"))
    result = probe_with([first, second]).result
    assert (result.verdict, result.stage, result.code) == (Verdict.TEMPFAIL, Stage.MAIL, 550)
    assert result.primary == str(hop(second))


def test_quoted_local_part_sent_exactly(scripted: StartScripted) -> None:
    address = '"john doe"@example.test'
    result, server, _ = probe_one(scripted, Script(rcpt_default=OK), address)
    assert f"RCPT TO:<{address}>" in server.lines
    assert result.verdict is Verdict.VALID


# --- LoopProber and ProbeLoop ----------------------------------------------------------


def test_loop_prober_from_plain_threads(probe_loop: ProbeLoop, scripted: StartScripted) -> None:
    server = scripted(Script(rcpt_default=OK))
    engine = ProbeEngine(probe_settings(helo_name=HELO, sender="", timeout=2.0))
    try:
        prober = LoopProber(probe_loop, engine)
        results: dict[int, ProbeResult] = {}

        def worker(n: int) -> None:
            results[n] = prober.probe(f"user{n}@example.test", [hop(server)])

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=10)
        assert not any(t.is_alive() for t in threads)
        assert sorted(results) == list(range(5))
        assert all(r.verdict is Verdict.VALID for r in results.values())
        for n in range(5):
            assert f"RCPT TO:<user{n}@example.test>" in server.lines
    finally:
        probe_loop.run(engine.aclose(), 5)
        probe_loop.stop()


def test_loop_prober_default_wait_covers_slot_wait_and_probe(probe_loop: ProbeLoop) -> None:
    settings = probe_settings(helo_name=HELO, sender="", timeout=7.0, probe_wait=1.5)
    assert settings.longest_answer == 8.5
    try:
        prober = LoopProber(probe_loop, ProbeEngine(settings))
        assert prober._wait == 8.5 + HANDOFF_MARGIN
        assert LoopProber(probe_loop, ProbeEngine(settings), wait=0.25)._wait == 0.25
    finally:
        probe_loop.stop()


def test_loop_prober_gives_up_on_a_stuck_probe(
    probe_loop: ProbeLoop, scripted: StartScripted
) -> None:
    server = scripted(Script(banner=None))
    wait = 0.2
    # The engine itself would wait 30 s for the banner; the hand-off must not.
    metrics = Metrics()
    engine = ProbeEngine(probe_settings(helo_name=HELO, sender="", timeout=30.0), metrics)

    def in_flight() -> float:
        return metrics.registry.get_sample_value("callahead_probes_in_flight") or 0.0

    try:
        prober = LoopProber(probe_loop, engine, wait=wait)
        started = time.monotonic()
        result = prober.probe("user@example.test", [hop(server)])
        elapsed = time.monotonic() - started
        assert result.verdict is Verdict.TEMPFAIL
        assert result.code is None
        assert result.primary == str(hop(server))
        # Not the engine's 30 s: a bound loose enough for a loaded machine.
        assert wait * 0.9 <= elapsed < wait + 3.0
        wait_for(lambda: server.connections == 1, 5, what="the probe's connection")
        # The abandoned probe is cancelled (LoopProber cancels its future): its slot and
        # its connection are given back, not held for the engine's 30 s. (This asserted
        # once that it went on, which held only while the test's thread outran the
        # loop's: a loaded CI machine ran the cancellation first.)
        wait_for(lambda: in_flight() == 0, 5, what="the abandoned probe cancelled")
        wait_for(lambda: server.sessions[0].closed, 5, what="its connection closed")
    finally:
        server.stop()
        wait_for(lambda: in_flight() == 0, 5, what="the abandoned probe to end")
        probe_loop.run(engine.aclose(), 5)
        probe_loop.stop()


def test_loop_prober_bound_uses_handoff_margin(
    probe_loop: ProbeLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loop_module, "HANDOFF_MARGIN", 0.1)
    engine = AnsweredEngine(
        settings=probe_settings(helo_name=HELO, sender="", timeout=0.2, probe_wait=0.1)
    )  # never answered: the hand-off bound alone ends the wait
    refused = Nexthop("127.0.0.1", free_port())
    try:
        prober = LoopProber(probe_loop, engine)
        started = time.monotonic()
        result = prober.probe("user@example.test", [refused])
        elapsed = time.monotonic() - started
        assert result.verdict is Verdict.TEMPFAIL
        assert result.primary == str(refused)
        bound = 0.2 + 0.1 + 0.1  # timeout + probe_wait + margin
        assert bound * 0.9 <= elapsed < bound + 0.4
        assert engine.cancelled.wait(2.0)  # given up on, not left running
    finally:
        probe_loop.stop()


def test_probe_loop_run_times_out(probe_loop: ProbeLoop) -> None:
    cancelled = threading.Event()

    async def stuck() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    try:
        with pytest.raises(TimeoutError):
            probe_loop.run(stuck(), 0.1)
        assert cancelled.wait(2.0)
    finally:
        probe_loop.stop()


# --- the probe command against the scripted primary ------------------------------------


def cli_probe(server: ScriptedServer, address: str, *options: str, helo: str = HELO) -> int:
    """``callahead probe ADDRESS`` routed to ``server``; returns its exit status."""
    env = {
        "CALLAHEAD_ROUTES": f"example.test=[127.0.0.1]:{server.port}",
        "CALLAHEAD_HELO_NAME": helo,
        "CALLAHEAD_PROBE_TIMEOUT": "3",
    }
    return main(["probe", address, *options], env=env)


@pytest.mark.parametrize(("reply", "status"), [(OK, 0), (UNKNOWN, 1), (TRY_LATER, 2)])
def test_cli_probe_exit_status(
    scripted: StartScripted, capsys: pytest.CaptureFixture[str], reply: str, status: int
) -> None:
    server = scripted(Script(rcpt_default=reply))
    assert cli_probe(server, "<User@Example.TEST>") == status
    out = capsys.readouterr().out
    assert "User@example.test" in out
    assert reply[:3] in out
    assert "RCPT TO:<User@example.test>" in server.lines
    assert server.verbs()[-1] == "QUIT"  # the command closes its pooled session


@pytest.mark.parametrize(
    ("extensions", "status"), [(("8BITMIME", "SMTPUTF8"), 0), (("8BITMIME",), 2)]
)
def test_cli_probe_non_ascii_local_part(
    scripted: StartScripted,
    capsys: pytest.CaptureFixture[str],
    extensions: tuple[str, ...],
    status: int,
) -> None:
    server = scripted(Script(rcpt_default=OK, extensions=extensions))
    assert cli_probe(server, "jörg@example.test") == status
    assert "jörg@example.test" in capsys.readouterr().out
    assert ("RCPT TO:<jörg@example.test>" in server.lines) is (status == 0)


def test_cli_probe_explain_for_a_primary_refusing_the_helo(
    scripted: StartScripted, capsys: pytest.CaptureFixture[str]
) -> None:
    reply = "504 5.5.2 <localhost>: Helo command rejected: need fully-qualified hostname"
    server = scripted(Script(rcpt_default=reply, postmaster=None))
    assert cli_probe(server, "u1@example.test", "--explain", helo="localhost") == 2
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].startswith("tempfail: u1@example.test at ")
    assert "transcript:" in lines
    assert "  C: EHLO localhost" in lines
    assert "  C: RCPT TO:<u1@example.test>" in lines
    assert f"  S: {reply}" in lines
    assert f"decided by: {reply} (at RCPT)" in lines
    classified = next(line for line in lines if line.startswith("classified: "))
    assert classified.startswith('classified: tempfail (prober): "helo command rejected"')
    assert "not fully qualified" in captured.err  # the warning about the EHLO name


def test_cli_probe_explain_names_the_rule_that_decided(
    scripted: StartScripted, capsys: pytest.CaptureFixture[str]
) -> None:
    # An explicit 5.1.1: unknown on its own, no control asked.
    server = scripted(Script(rcpt_default=UNKNOWN))
    assert cli_probe(server, "nobody@example.test", "--explain") == 1
    out = capsys.readouterr().out
    assert "postmaster@" not in out
    assert "classified: unknown (recipient): rule explicit: 5.1.1" in out
    assert "unknown on its own" in out
    # A bare 550 with an unknown-user text: postmaster@ is asked as the control.
    bare = scripted(Script(rcpt_default="550 Unrouteable address", postmaster=OK))
    assert cli_probe(bare, "nobody@example.test", "--explain") == 1
    out = capsys.readouterr().out
    assert f"  C: RCPT TO:<postmaster@example.test>\n  S: {OK}" in out
    assert "classified: unknown (recipient): rule bare:" in out
    assert "the control postmaster@example.test was accepted on the same session" in out
    # The same without postmaster@: undecided, and the rule says why.
    unproven = scripted(Script(rcpt_default="550 Unrouteable address"))
    assert cli_probe(unproven, "nobody@example.test", "--explain") == 2
    out = capsys.readouterr().out
    assert "classified: tempfail (unproven): rule bare: no control address" in out
