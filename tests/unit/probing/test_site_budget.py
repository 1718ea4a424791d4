"""The engine asks a primary's site budget (budget.SiteBudget, CALLAHEAD_SITE_PRIMARY_RATE)
after its own: a refusal skips the probe (primary_budget) and gives the local token
back, a site budget that cannot be asked lets the probe go on (the local budget is the
floor), a background probe never waits for a token, and a cancelled wait hands the
local token back too."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from callahead.probing.engine import ProbeEngine
from callahead.routing.routes import Nexthop
from callahead.smtp.verdict import Skip, Verdict
from tests.harness.fixtures import StartScripted
from tests.harness.scripted import Script, ScriptedServer
from tests.unit.settings import probe_settings

OK = "250 2.1.5 OK"


class FakeSite:
    """A site budget with ``tokens`` in all; records what it was asked."""

    def __init__(self, tokens: int, *, wait: float = 0.0) -> None:
        self.rate = 3.0
        self.tokens = tokens
        self.wait = wait
        self.asked: list[tuple[str, float]] = []

    async def take(self, primary: str, max_wait: float) -> bool:
        self.asked.append((primary, max_wait))
        if self.wait:
            await asyncio.sleep(self.wait)
        if self.tokens <= 0:
            return False
        self.tokens -= 1
        return True


def hop(server: ScriptedServer) -> Nexthop:
    return Nexthop(server.host, server.port)


@asynccontextmanager
async def engine_for(site: FakeSite, **overrides: Any) -> AsyncIterator[ProbeEngine]:
    engine = ProbeEngine(probe_settings(helo_name="backup.test", **overrides), site_budget=site)
    try:
        yield engine
    finally:
        await engine.aclose()


def test_a_site_refusal_skips_the_probe_and_gives_the_local_token_back(
    scripted: StartScripted,
) -> None:
    server = scripted(Script(rcpt_default=OK))
    site = FakeSite(tokens=0)

    async def go() -> None:
        async with engine_for(site, primary_rate=1.0, probe_wait=0.5) as engine:
            over = await engine.probe("a@x.test", [hop(server)])
            assert over.skipped is Skip.PRIMARY_BUDGET
            assert over.verdict is Verdict.TEMPFAIL
            assert "over every backup" in over.detail
            # The local token (a bucket of one) was given back: a probe that may not
            # wait at all still finds it, and the site has one now.
            site.tokens = 1
            later = await engine.probe("b@x.test", [hop(server)], background=True)
            assert later.verdict is Verdict.VALID, later.detail

    asyncio.run(go())
    assert server.rcpts() == ["b@x.test"]
    assert [name for name, _ in site.asked] == [str(hop(server))] * 2


def test_a_local_refusal_never_asks_the_site(scripted: StartScripted) -> None:
    server = scripted(Script(rcpt_default=OK))
    site = FakeSite(tokens=10)

    async def go() -> None:
        async with engine_for(site, primary_rate=1.0, probe_wait=0) as engine:
            assert (await engine.probe("a@x.test", [hop(server)])).verdict is Verdict.VALID
            over = await engine.probe("b@x.test", [hop(server)])
            assert over.skipped is Skip.PRIMARY_BUDGET

    asyncio.run(go())
    assert len(site.asked) == 1 and site.tokens == 9


def test_without_a_local_budget_the_site_alone_decides_and_background_never_waits(
    scripted: StartScripted,
) -> None:
    server = scripted(Script(rcpt_default=OK))
    site = FakeSite(tokens=1)

    async def go() -> None:
        async with engine_for(site, probe_wait=1.5) as engine:
            await engine.probe("a@x.test", [hop(server)], recheck=True, background=True)
            over = await engine.probe("b@x.test", [hop(server)])
            assert over.skipped is Skip.PRIMARY_BUDGET

    asyncio.run(go())
    (_, background), (_, recipient) = site.asked
    assert background == 0.0  # a token there now, or none
    assert 1.0 < recipient <= 1.5  # a recipient may wait what is left of probe_wait
    assert server.rcpts() == ["a@x.test"]


def test_a_cancelled_site_wait_gives_the_local_token_back(scripted: StartScripted) -> None:
    server = scripted(Script(rcpt_default=OK))
    site = FakeSite(tokens=5, wait=10.0)

    async def go() -> None:
        async with engine_for(site, primary_rate=1.0, probe_wait=0) as engine:
            probe = asyncio.create_task(engine.probe("a@x.test", [hop(server)]))
            while not site.asked:
                await asyncio.sleep(0.01)
            probe.cancel()
            await asyncio.gather(probe, return_exceptions=True)
            site.wait = 0.0
            # The local bucket of one still has its token: no wait, no refusal.
            result = await engine.probe("b@x.test", [hop(server)])
            assert result.verdict is Verdict.VALID, result.detail

    asyncio.run(go())
    assert server.rcpts() == ["b@x.test"]
