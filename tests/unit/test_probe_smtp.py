"""The SMTP probe against a scripted SMTP server on loopback (no Postfix)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import pytest

from callahead import loop as loop_module
from callahead.cli import main
from callahead.loop import HANDOFF_MARGIN, LoopProber, ProbeLoop
from callahead.probe import ProbeResult, SmtpProber, Stage, Verdict
from callahead.routes import Nexthop

HELO = "backup.example.net"
T = TypeVar("T")


@dataclass
class Script:
    """How the fake primary answers: a reply code per stage, and misbehaviour."""

    banner: int = 220
    ehlo: int = 250
    helo: int = 250
    mail: int = 250
    rcpt: int = 250
    greet: bool = True
    """False: accept the connection and never say a word."""
    hang_up: bool = False
    """True: accept the connection and close it at once, without a banner."""
    close_after: str | None = None
    """Verb (``MAIL``, ``RCPT``…) after which the server hangs up instead of replying."""
    delay: dict[str, float] = field(default_factory=dict)
    """Seconds to wait before the reply, per verb (``BANNER`` for the greeting)."""


class FakeSmtpServer:
    """A line-based SMTP server on 127.0.0.1 that records what it receives."""

    def __init__(self, script: Script | None = None) -> None:
        self.script = script if script is not None else Script()
        self.lines: list[str] = []
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def hop(self) -> Nexthop:
        return Nexthop("127.0.0.1", self.port)

    def verbs(self) -> list[str]:
        return [line.split(" ", 1)[0].split(":", 1)[0].upper() for line in self.lines]

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        for writer in list(self._writers):
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _reply(self, writer: asyncio.StreamWriter, verb: str, text: str) -> None:
        delay = self.script.delay.get(verb)
        if delay:
            await asyncio.sleep(delay)
        writer.write(text.encode("ascii"))
        await writer.drain()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        s = self.script
        try:
            if s.hang_up:
                return
            if not s.greet:
                await reader.read()  # until the client gives up
                return
            await self._reply(writer, "BANNER", f"{s.banner} fake.test ESMTP banner\r\n")
            while True:
                raw = await reader.readline()
                if not raw:
                    return
                line = raw.decode("ascii", "replace").rstrip("\r\n")
                self.lines.append(line)
                verb = line.split(" ", 1)[0].split(":", 1)[0].upper()
                if verb == s.close_after:
                    return
                if verb == "EHLO":
                    if s.ehlo == 250:
                        text = "250-fake.test hello\r\n250 8BITMIME\r\n"
                    else:
                        text = f"{s.ehlo} EHLO not here\r\n"
                elif verb == "QUIT":
                    await self._reply(writer, verb, "221 2.0.0 bye\r\n")
                    return
                else:
                    code = {"HELO": s.helo, "MAIL": s.mail, "RCPT": s.rcpt}.get(verb, 502)
                    text = f"{code} fake reply to {verb}\r\n"
                await self._reply(writer, verb, text)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


def closed_port() -> int:
    """A loopback port nobody listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    async def wrapper() -> T:
        return await coro_fn()

    return asyncio.run(wrapper())


async def probe_with(
    servers: list[FakeSmtpServer],
    address: str = "user@example.test",
    *,
    sender: str = "",
    timeout: float = 5.0,
    before: list[Nexthop] | None = None,
) -> tuple[ProbeResult, float]:
    """Start ``servers``, probe ``address`` at the nexthops ``before`` and then at the
    servers in order, close everything, and return the result and the probe's time."""
    for server in servers:
        await server.start()
    hops = (before or []) + [server.hop for server in servers]
    prober = SmtpProber(helo_name=HELO, sender=sender, timeout=timeout)
    try:
        started = time.monotonic()
        result = await prober.probe(address, hops)
        elapsed = time.monotonic() - started
    finally:
        # Let the courtesy QUIT reach servers that answer; hang up on those that stall
        # first, so that no test waits for QUIT_TIMEOUT.
        if all(s.script.greet and not s.script.delay for s in servers):
            await prober.aclose()
        for server in servers:
            await server.close()
        await prober.aclose()
    return result, elapsed


def probe_one(
    script: Script, address: str = "user@example.test", *, sender: str = "", timeout: float = 5.0
) -> tuple[ProbeResult, FakeSmtpServer, float]:
    """Probe ``address`` at one fake primary that follows ``script``."""
    server = FakeSmtpServer(script)

    async def go() -> tuple[ProbeResult, float]:
        return await probe_with([server], address, sender=sender, timeout=timeout)

    result, elapsed = run(go)
    return result, server, elapsed


# --- the dialogue ----------------------------------------------------------------------


def test_dialogue_with_null_sender() -> None:
    result, server, _ = probe_one(Script(rcpt=250))
    assert server.lines[:3] == [
        f"EHLO {HELO}",
        "MAIL FROM:<>",
        "RCPT TO:<user@example.test>",
    ]
    assert server.lines[3:] == ["QUIT"]
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


@pytest.mark.parametrize("code", [550, 553, 421, 451])
def test_mail_from_refused_is_tempfail_and_rcpt_never_sent(code: int) -> None:
    result, server, _ = probe_one(Script(mail=code, rcpt=550))
    assert (result.verdict, result.stage, result.code) == (Verdict.TEMPFAIL, Stage.MAIL, code)
    assert "RCPT" not in server.verbs()


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

    async def go() -> tuple[ProbeResult, float]:
        return await probe_with([], before=[Nexthop("127.0.0.1", port)], timeout=2)

    result, elapsed = run(go)
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

    async def go() -> tuple[ProbeResult, float]:
        return await probe_with([second], before=[refused])

    result, _ = run(go)
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

    async def go() -> tuple[ProbeResult, float]:
        return await probe_with([first, second])

    result, _ = run(go)
    assert result.verdict is verdict
    assert result.primary == str(first.hop)
    assert first.connections == 1
    assert second.connections == 0
    assert second.lines == []


def test_failover_tempfail_tries_the_next() -> None:
    first = FakeSmtpServer(Script(rcpt=451))
    second = FakeSmtpServer(Script(rcpt=250))

    async def go() -> tuple[ProbeResult, float]:
        return await probe_with([first, second])

    result, _ = run(go)
    assert result.verdict is Verdict.VALID
    assert result.primary == str(second.hop)
    assert first.connections == 1
    assert second.connections == 1


def test_all_nexthops_tempfail_reports_the_last() -> None:
    first = FakeSmtpServer(Script(rcpt=451))
    second = FakeSmtpServer(Script(mail=550))

    async def go() -> tuple[ProbeResult, float]:
        return await probe_with([first, second])

    result, _ = run(go)
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
    try:
        probe_loop.run(server.start(), 5)
        prober = LoopProber(
            probe_loop, SmtpProber(helo_name=HELO, sender="", timeout=2.0), timeout=2.0
        )
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
        probe_loop.run(server.close(), 5)
        probe_loop.stop()


def test_loop_prober_gives_up_on_a_stuck_probe(probe_loop: ProbeLoop) -> None:
    server = FakeSmtpServer(Script(greet=False))
    wait_timeout = 0.2
    try:
        probe_loop.run(server.start(), 5)
        # The coroutine itself would wait 30 s for the banner; the hand-off must not.
        prober = LoopProber(
            probe_loop, SmtpProber(helo_name=HELO, sender="", timeout=30.0), timeout=wait_timeout
        )
        started = time.monotonic()
        result = prober.probe("user@example.test", [server.hop])
        elapsed = time.monotonic() - started
        bound = wait_timeout + HANDOFF_MARGIN
        assert result.verdict is Verdict.TEMPFAIL
        assert result.code is None
        assert result.primary == str(server.hop)
        assert bound * 0.9 <= elapsed < bound + 0.5
        assert server.connections == 1
    finally:
        probe_loop.run(server.close(), 5)
        probe_loop.stop()


def test_loop_prober_bound_uses_handoff_margin(
    probe_loop: ProbeLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loop_module, "HANDOFF_MARGIN", 0.1)
    server = FakeSmtpServer(Script(greet=False))
    try:
        probe_loop.run(server.start(), 5)
        prober = LoopProber(
            probe_loop, SmtpProber(helo_name=HELO, sender="", timeout=30.0), timeout=0.1
        )
        started = time.monotonic()
        result = prober.probe("user@example.test", [server.hop])
        assert result.verdict is Verdict.TEMPFAIL
        assert time.monotonic() - started < 0.2 + 0.4
    finally:
        probe_loop.run(server.close(), 5)
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


@pytest.mark.parametrize(("code", "status"), [(250, 0), (550, 1), (451, 2)])
def test_cli_probe_exit_status(
    probe_loop: ProbeLoop, capsys: pytest.CaptureFixture[str], code: int, status: int
) -> None:
    server = FakeSmtpServer(Script(rcpt=code))
    try:
        port = probe_loop.run(server.start(), 5)
        env = {
            "CALLAHEAD_ROUTES": f"example.test=[127.0.0.1]:{port}",
            "CALLAHEAD_HELO_NAME": HELO,
            "CALLAHEAD_PROBE_TIMEOUT": "3",
        }
        assert main(["probe", "<User@Example.TEST>"], env=env) == status
    finally:
        probe_loop.run(server.close(), 5)
        probe_loop.stop()
    out = capsys.readouterr().out
    assert "User@example.test" in out
    assert str(code) in out
    assert "RCPT TO:<User@example.test>" in server.lines
