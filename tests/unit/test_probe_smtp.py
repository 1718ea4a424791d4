"""The SMTP probe through the engine, against a scripted SMTP server on loopback (no
Postfix): one probe per test, the dialogue and how each reply is classified."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import pytest

from callahead import loop as loop_module
from callahead.cli import main
from callahead.engine import EngineSettings, ProbeEngine
from callahead.loop import HANDOFF_MARGIN, LoopProber, ProbeLoop
from callahead.metrics import Metrics
from callahead.routes import Nexthop
from callahead.verdict import ProbeResult, Stage, Verdict
from tests.unit.fakesmtp import FakeSmtpServer, Script, closed_port, wait_until
from tests.unit.settings import probe_settings

HELO = "backup.example.net"
T = TypeVar("T")


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    async def wrapper() -> T:
        return await coro_fn()

    return asyncio.run(wrapper())


@dataclass
class Probed:
    result: ProbeResult
    elapsed: float
    at_end: list[list[str]]
    """What each server had received when the probe returned (before ``aclose``)."""


async def probe_with(
    servers: list[FakeSmtpServer],
    address: str = "user@example.test",
    *,
    sender: str = "",
    timeout: float = 5.0,
    before: list[Nexthop] | None = None,
) -> Probed:
    """Start ``servers``, probe ``address`` at the nexthops ``before`` and then at the
    servers in order, close everything, and return the result and the probe's time."""
    for server in servers:
        await server.start()
    hops = (before or []) + [server.hop for server in servers]
    engine = ProbeEngine(probe_settings(helo_name=HELO, sender=sender, timeout=timeout))
    try:
        started = time.monotonic()
        result = await engine.probe(address, hops)
        elapsed = time.monotonic() - started
        at_end = [list(server.lines) for server in servers]
        # Pooled sessions are closed (QUIT where polite) only now.
        await engine.aclose()
    finally:
        for server in servers:
            await server.close()
        await engine.aclose()
    return Probed(result, elapsed, at_end)


def probe_one(
    script: Script, address: str = "user@example.test", *, sender: str = "", timeout: float = 5.0
) -> tuple[ProbeResult, FakeSmtpServer, float]:
    """Probe ``address`` at one fake primary that follows ``script``."""
    server = FakeSmtpServer(script)

    async def go() -> Probed:
        return await probe_with([server], address, sender=sender, timeout=timeout)

    probed = run(go)
    return probed.result, server, probed.elapsed


# --- the dialogue ----------------------------------------------------------------------


def test_dialogue_with_null_sender() -> None:
    server = FakeSmtpServer(Script(rcpt=250))

    async def go() -> Probed:
        return await probe_with([server])

    probed = run(go)
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
    assert "fake reply to RCPT" in result.detail
    assert result.primary == str(server.hop)
    assert result.duration > 0


def test_dialogue_with_configured_sender() -> None:
    _, server, _ = probe_one(Script(), sender="probe@backup.example.net")
    assert server.lines[1] == "MAIL FROM:<probe@backup.example.net>"


@pytest.mark.parametrize("code", [250, 251])
def test_rcpt_2xx_is_valid(code: int) -> None:
    result, _, _ = probe_one(Script(rcpt=code))
    assert (result.verdict, result.stage, result.code) == (Verdict.VALID, Stage.RCPT, code)


@pytest.mark.parametrize("code", [550, 551, 553])
def test_rcpt_5xx_is_unknown(code: int) -> None:
    result, _, _ = probe_one(Script(rcpt=code))
    assert (result.verdict, result.stage, result.code) == (Verdict.UNKNOWN, Stage.RCPT, code)


@pytest.mark.parametrize("code", [450, 451, 452])
def test_rcpt_4xx_is_tempfail(code: int) -> None:
    result, _, _ = probe_one(Script(rcpt=code))
    assert (result.verdict, result.stage, result.code) == (Verdict.TEMPFAIL, Stage.RCPT, code)


@pytest.mark.parametrize("code", [421, 554])
def test_bad_banner_is_tempfail(code: int) -> None:
    result, server, _ = probe_one(Script(banner=code, rcpt=550))
    assert (result.verdict, result.stage, result.code) == (Verdict.TEMPFAIL, Stage.BANNER, code)
    assert "EHLO" not in server.verbs()
    assert "RCPT" not in server.verbs()


def test_ehlo_refused_falls_back_to_helo() -> None:
    result, server, _ = probe_one(Script(ehlo=500, rcpt=550))
    assert server.lines[:4] == [
        f"EHLO {HELO}",
        f"HELO {HELO}",
        "MAIL FROM:<>",
        "RCPT TO:<user@example.test>",
    ]
    assert (result.verdict, result.code) == (Verdict.UNKNOWN, 550)


@pytest.mark.parametrize(("ehlo", "helo"), [(500, 500), (502, 550), (554, 501)])
def test_ehlo_and_helo_refused_is_tempfail(ehlo: int, helo: int) -> None:
    result, server, _ = probe_one(Script(ehlo=ehlo, helo=helo, rcpt=550))
    assert (result.verdict, result.stage, result.code) == (Verdict.TEMPFAIL, Stage.EHLO, helo)
    assert "MAIL" not in server.verbs()
    assert "RCPT" not in server.verbs()


@pytest.mark.parametrize("code", [550, 553, 451])
def test_mail_from_refused_is_tempfail_and_rcpt_never_sent(code: int) -> None:
    result, server, _ = probe_one(Script(mail=code, rcpt=550))
    assert (result.verdict, result.stage, result.code) == (Verdict.TEMPFAIL, Stage.MAIL, code)
    assert result.reached
    assert "RCPT" not in server.verbs()


def test_mail_from_421_is_tempfail_not_reached_and_rcpt_never_sent() -> None:
    # 421 means the primary is closing the session: a connection-level failure (it
    # feeds the breaker), reported without a decisive code.
    result, server, _ = probe_one(Script(mail=421, rcpt=550))
    assert result.verdict is Verdict.TEMPFAIL
    assert result.stage is Stage.MAIL
    assert not result.reached
    assert "421" in result.detail
    assert "RCPT" not in server.verbs()
    assert server.count("MAIL") == 1  # a lost fresh session is not retried


def test_disconnect_after_mail_is_tempfail() -> None:
    result, server, _ = probe_one(Script(close_after="MAIL", rcpt=550))
    assert result.verdict is Verdict.TEMPFAIL
    assert result.stage is Stage.MAIL
    assert result.code is None
    assert "RCPT" not in server.verbs()


def test_disconnect_after_rcpt_is_tempfail() -> None:
    result, server, _ = probe_one(Script(close_after="RCPT"))
    assert (result.verdict, result.stage, result.code) == (Verdict.TEMPFAIL, Stage.RCPT, None)
    assert "RCPT TO:<user@example.test>" in server.lines


def test_hang_up_without_banner_is_tempfail() -> None:
    result, server, elapsed = probe_one(Script(hang_up=True, rcpt=550), timeout=2)
    assert result.verdict is Verdict.TEMPFAIL
    assert result.code is None
    assert result.stage in (Stage.CONNECT, Stage.BANNER)
    assert server.connections == 1
    assert elapsed < 1.0


def test_disconnect_after_ehlo_is_tempfail() -> None:
    result, server, _ = probe_one(Script(close_after="EHLO", rcpt=550))
    assert (result.verdict, result.stage, result.code) == (Verdict.TEMPFAIL, Stage.EHLO, None)
    assert "MAIL" not in server.verbs()


def test_never_greets_is_tempfail_within_timeout() -> None:
    timeout = 0.5
    result, server, elapsed = probe_one(Script(greet=False, rcpt=550), timeout=timeout)
    assert result.verdict is Verdict.TEMPFAIL
    assert result.code is None
    assert result.stage in (Stage.CONNECT, Stage.BANNER)
    assert server.connections == 1
    assert server.lines == []
    assert timeout * 0.9 <= elapsed < timeout + 0.4


def test_connection_refused_is_tempfail_at_connect() -> None:
    port = closed_port()

    async def go() -> Probed:
        return await probe_with([], before=[Nexthop("127.0.0.1", port)], timeout=2)

    probed = run(go)
    result, elapsed = probed.result, probed.elapsed
    assert (result.verdict, result.stage, result.code) == (Verdict.TEMPFAIL, Stage.CONNECT, None)
    assert result.primary == f"[127.0.0.1]:{port}"
    assert elapsed < 1.0


@pytest.mark.parametrize("slow", ["BANNER", "EHLO", "MAIL", "RCPT"])
def test_reply_slower_than_timeout_is_tempfail(slow: str) -> None:
    timeout = 0.5
    result, _, elapsed = probe_one(Script(rcpt=550, delay={slow: 3.0}), timeout=timeout)
    assert result.verdict is Verdict.TEMPFAIL
    assert result.code is None
    assert elapsed < timeout + 0.4
    if slow == "RCPT":
        assert result.stage is Stage.RCPT


def test_slow_but_in_time_reply_still_decides() -> None:
    result, _, _ = probe_one(Script(rcpt=550, delay={"RCPT": 0.2}), timeout=2)
    assert result.verdict is Verdict.UNKNOWN


def test_failover_refused_then_unknown_from_second() -> None:
    second = FakeSmtpServer(Script(rcpt=550))
    refused = Nexthop("127.0.0.1", closed_port())

    async def go() -> Probed:
        return await probe_with([second], before=[refused])

    result = run(go).result
    assert (result.verdict, result.stage, result.code) == (Verdict.UNKNOWN, Stage.RCPT, 550)
    assert result.primary == str(second.hop)
    assert second.connections == 1
    assert "RCPT TO:<user@example.test>" in second.lines


@pytest.mark.parametrize(("first_code", "verdict"), [(250, Verdict.VALID), (550, Verdict.UNKNOWN)])
def test_failover_definite_first_answer_never_contacts_second(
    first_code: int, verdict: Verdict
) -> None:
    first = FakeSmtpServer(Script(rcpt=first_code))
    second = FakeSmtpServer(Script(rcpt=250 if first_code == 550 else 550))

    async def go() -> Probed:
        return await probe_with([first, second])

    result = run(go).result
    assert result.verdict is verdict
    assert result.primary == str(first.hop)
    assert first.connections == 1
    assert second.connections == 0
    assert second.lines == []


def test_failover_tempfail_tries_the_next() -> None:
    first = FakeSmtpServer(Script(rcpt=451))
    second = FakeSmtpServer(Script(rcpt=250))

    async def go() -> Probed:
        return await probe_with([first, second])

    result = run(go).result
    assert result.verdict is Verdict.VALID
    assert result.primary == str(second.hop)
    assert first.connections == 1
    assert second.connections == 1


def test_all_nexthops_tempfail_reports_the_last() -> None:
    first = FakeSmtpServer(Script(rcpt=451))
    second = FakeSmtpServer(Script(mail=550))

    async def go() -> Probed:
        return await probe_with([first, second])

    result = run(go).result
    assert (result.verdict, result.stage, result.code) == (Verdict.TEMPFAIL, Stage.MAIL, 550)
    assert result.primary == str(second.hop)


def test_quoted_local_part_sent_exactly() -> None:
    address = '"john doe"@example.test'
    result, server, _ = probe_one(Script(rcpt=250), address)
    assert f"RCPT TO:<{address}>" in server.lines
    assert result.verdict is Verdict.VALID


# --- LoopProber and ProbeLoop ----------------------------------------------------------


@pytest.fixture
def probe_loop() -> ProbeLoop:
    loop = ProbeLoop()
    loop.start()
    return loop


def test_loop_prober_from_plain_threads(probe_loop: ProbeLoop) -> None:
    server = FakeSmtpServer(Script(rcpt=250))
    engine = ProbeEngine(probe_settings(helo_name=HELO, sender="", timeout=2.0))
    try:
        probe_loop.run(server.start(), 5)
        prober = LoopProber(probe_loop, engine)
        results: dict[int, ProbeResult] = {}

        def worker(n: int) -> None:
            results[n] = prober.probe(f"user{n}@example.test", [server.hop])

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
        probe_loop.run(server.close(), 5)
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


def test_loop_prober_gives_up_on_a_stuck_probe(probe_loop: ProbeLoop) -> None:
    server = FakeSmtpServer(Script(greet=False))
    wait = 0.2
    # The engine itself would wait 30 s for the banner; the hand-off must not.
    metrics = Metrics()
    engine = ProbeEngine(probe_settings(helo_name=HELO, sender="", timeout=30.0), metrics)

    def in_flight() -> float:
        return metrics.registry.get_sample_value("callahead_probes_in_flight") or 0.0

    try:
        probe_loop.run(server.start(), 5)
        prober = LoopProber(probe_loop, engine, wait=wait)
        started = time.monotonic()
        result = prober.probe("user@example.test", [server.hop])
        elapsed = time.monotonic() - started
        assert result.verdict is Verdict.TEMPFAIL
        assert result.code is None
        assert result.primary == str(server.hop)
        assert wait * 0.9 <= elapsed < wait + 0.5
        assert server.connections == 1
        # The abandoned probe goes on (it may be shared) until its primary hangs up.
        assert in_flight() == 1
    finally:
        probe_loop.run(server.close(), 5)
        probe_loop.run(wait_until(lambda: in_flight() == 0), 5)
        probe_loop.run(engine.aclose(), 5)
        probe_loop.stop()


class StuckEngine(ProbeEngine):
    """An engine whose probes never end, to test the hand-off bound alone."""

    def __init__(self, settings: EngineSettings) -> None:
        super().__init__(settings)
        self.cancelled = threading.Event()

    async def probe(
        self, address: str, hops: Sequence[Nexthop], *, recheck: bool = False
    ) -> ProbeResult:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        raise AssertionError("not reached")


def test_loop_prober_bound_uses_handoff_margin(
    probe_loop: ProbeLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loop_module, "HANDOFF_MARGIN", 0.1)
    engine = StuckEngine(probe_settings(helo_name=HELO, sender="", timeout=0.2, probe_wait=0.1))
    hop = Nexthop("127.0.0.1", closed_port())
    try:
        prober = LoopProber(probe_loop, engine)
        started = time.monotonic()
        result = prober.probe("user@example.test", [hop])
        elapsed = time.monotonic() - started
        assert result.verdict is Verdict.TEMPFAIL
        assert result.primary == str(hop)
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


# --- the probe command against the fake primary ----------------------------------------


def cli_probe(
    probe_loop: ProbeLoop,
    server: FakeSmtpServer,
    address: str,
    *options: str,
    helo: str = HELO,
) -> int:
    """``callahead probe ADDRESS`` routed to ``server``; returns its exit status."""
    try:
        port = probe_loop.run(server.start(), 5)
        env = {
            "CALLAHEAD_ROUTES": f"example.test=[127.0.0.1]:{port}",
            "CALLAHEAD_HELO_NAME": helo,
            "CALLAHEAD_PROBE_TIMEOUT": "3",
        }
        return main(["probe", address, *options], env=env)
    finally:
        probe_loop.run(server.close(), 5)
        probe_loop.stop()


@pytest.mark.parametrize(("code", "status"), [(250, 0), (550, 1), (451, 2)])
def test_cli_probe_exit_status(
    probe_loop: ProbeLoop, capsys: pytest.CaptureFixture[str], code: int, status: int
) -> None:
    server = FakeSmtpServer(Script(rcpt=code))
    assert cli_probe(probe_loop, server, "<User@Example.TEST>") == status
    out = capsys.readouterr().out
    assert "User@example.test" in out
    assert str(code) in out
    assert "RCPT TO:<User@example.test>" in server.lines
    assert server.verbs()[-1] == "QUIT"  # the command closes its pooled session


@pytest.mark.parametrize(
    ("extensions", "status"), [(("8BITMIME", "SMTPUTF8"), 0), (("8BITMIME",), 2)]
)
def test_cli_probe_non_ascii_local_part(
    probe_loop: ProbeLoop,
    capsys: pytest.CaptureFixture[str],
    extensions: tuple[str, ...],
    status: int,
) -> None:
    server = FakeSmtpServer(Script(rcpt=250, extensions=extensions))
    assert cli_probe(probe_loop, server, "jörg@example.test") == status
    assert "jörg@example.test" in capsys.readouterr().out
    assert ("RCPT TO:<jörg@example.test>" in server.lines) is (status == 0)


def test_cli_probe_explain_for_a_primary_refusing_the_helo(
    probe_loop: ProbeLoop, capsys: pytest.CaptureFixture[str]
) -> None:
    reply = "504 5.5.2 <localhost>: Helo command rejected: need fully-qualified hostname"
    server = FakeSmtpServer(Script(rcpt_hook=lambda conn, address: reply))
    assert cli_probe(probe_loop, server, "u1@example.test", "--explain", helo="localhost") == 2
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


def test_cli_probe_explain_shows_the_postmaster_evidence(
    probe_loop: ProbeLoop, capsys: pytest.CaptureFixture[str]
) -> None:
    server = FakeSmtpServer(Script(rcpt=550))
    assert cli_probe(probe_loop, server, "nobody@example.test", "--explain") == 1
    out = capsys.readouterr().out
    assert "  C: RCPT TO:<postmaster@example.test>\n  S: 250 fake reply to RCPT" in out
    assert "classified: unknown (recipient)" in out
    assert "postmaster@example.test was accepted on the same session" in out
