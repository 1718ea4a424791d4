"""The session pool, with sessions that never touch the network."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from callahead.probing.pool import PIPELINE_DEPTH, SessionPool, joinable
from callahead.routing.routes import Nexthop
from callahead.smtp.evidence import CONTROLS_PER_DOMAIN, VERIFIED_CONTROLS
from callahead.smtp.session import ERROR_BUDGET, Session, SessionSettings
from callahead.smtp.tls import TlsMode

T = TypeVar("T")
HOP = Nexthop("127.0.0.1", 2525)
SETTINGS = SessionSettings("backup.example.net", "", TlsMode.NONE, None)


class FakeSession(Session):
    """A session whose liveness the test decides; records QUIT and close."""

    def __init__(self, number: int, hop: Nexthop = HOP) -> None:
        super().__init__(hop, SETTINGS)
        self.number = number
        self.opened = True
        self.connected = True
        self.keep = True
        self.quits = 0

    @property
    def alive(self) -> bool:
        return self.connected and not self._retired

    @property
    def reusable(self) -> bool:
        return self.alive and self.keep

    async def quit(self) -> None:
        self.quits += 1
        self.close()

    def close(self) -> None:
        self._retired = True
        self.connected = False


class Factory:
    def __init__(self) -> None:
        self.made: list[FakeSession] = []
        self.opened = 0

    def __call__(self, hop: Nexthop) -> Session:
        session = FakeSession(len(self.made) + 1, hop)
        self.made.append(session)
        return session

    def on_open(self) -> None:
        self.opened += 1


def run(fn: Callable[[], Awaitable[T]]) -> T:
    async def wrapper() -> T:
        return await fn()

    return asyncio.run(wrapper())


async def take(pool: SessionPool) -> FakeSession:
    session = await pool.acquire(HOP)
    assert isinstance(session, FakeSession)
    return session


def make(size: int = 2, idle: float = 30.0) -> tuple[SessionPool, Factory]:
    factory = Factory()
    return SessionPool(factory, size=size, idle=idle, on_open=factory.on_open), factory


def test_a_released_session_is_reused() -> None:
    async def go() -> None:
        pool, factory = make()
        first = await take(pool)
        assert factory.opened == 1
        assert pool.open_sessions == 1
        pool.release(first)
        assert pool.open_sessions == 1
        for _ in range(10):
            again = await take(pool)
            assert again is first
            pool.release(again)
        assert factory.opened == 1
        assert len(factory.made) == 1
        await pool.aclose()
        assert first.quits == 1
        assert pool.open_sessions == 0

    run(go)


def test_most_recently_used_first() -> None:
    async def go() -> None:
        pool, _ = make(size=3)
        a = await take(pool)
        b = await take(pool)
        pool.release(a)
        pool.release(b)
        assert await take(pool) is b
        assert await take(pool) is a
        await pool.aclose()

    run(go)


def test_size_bounds_the_sessions_and_acquire_waits() -> None:
    async def go() -> None:
        pool, factory = make(size=2)
        a = await take(pool)
        b = await take(pool)
        assert pool.open_sessions == 2
        waiter = asyncio.ensure_future(pool.acquire(HOP))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        assert len(factory.made) == 2
        pool.release(a)
        got = await asyncio.wait_for(waiter, 1)
        assert got is a  # the released one, not a third connection
        assert len(factory.made) == 2
        # A cancelled wait gives nothing up.
        other = asyncio.ensure_future(pool.acquire(HOP))
        await asyncio.sleep(0.01)
        other.cancel()
        with pytest.raises(asyncio.CancelledError):
            await other
        pool.release(b)
        pool.release(got)
        assert pool.open_sessions == 2
        c = await take(pool)
        d = await take(pool)
        assert {c, d} == {a, b}
        await pool.aclose()

    run(go)


def test_unreusable_session_is_retired_on_release() -> None:
    async def go() -> None:
        pool, factory = make()
        spent = await take(pool)
        spent.keep = False  # e.g. its error budget is spent
        pool.release(spent)
        await asyncio.sleep(0)
        assert spent.quits == 1
        assert pool.open_sessions == 0
        fresh = await take(pool)
        assert fresh is not spent
        assert factory.opened == 2
        pool.release(fresh)
        await pool.aclose()

    run(go)


def test_dead_idle_session_is_skipped() -> None:
    async def go() -> None:
        pool, factory = make()
        session = await take(pool)
        pool.release(session)
        session.connected = False  # the primary hung up meanwhile
        fresh = await take(pool)
        assert fresh is not session
        assert factory.opened == 2
        await asyncio.sleep(0)
        assert session.quits == 1
        pool.release(fresh)
        await pool.aclose()

    run(go)


def test_session_idle_too_long_is_not_reused() -> None:
    async def go() -> None:
        pool, factory = make(idle=10)
        session = await take(pool)
        pool.release(session)
        session.last_used = time.monotonic() - 11
        fresh = await take(pool)
        assert fresh is not session
        assert factory.opened == 2
        pool.release(fresh)
        await pool.aclose()

    run(go)


def test_reap_closes_stale_and_dead_sessions_and_keeps_fresh_ones() -> None:
    async def go() -> None:
        pool, _ = make(size=3, idle=10)
        stale, dead, fresh = [await take(pool) for _ in range(3)]
        for s in (stale, dead, fresh):
            pool.release(s)
        stale.last_used = time.monotonic() - 10.5
        dead.connected = False
        pool.reap()
        await asyncio.sleep(0)
        assert [s.quits for s in (stale, dead, fresh)] == [1, 1, 0]
        assert pool.open_sessions == 1
        pool.reap(drop_all=True)
        await asyncio.sleep(0)
        assert fresh.quits == 1
        assert pool.open_sessions == 0
        await pool.aclose()

    run(go)


def test_session_older_than_max_age_is_not_reused() -> None:
    async def go() -> None:
        factory = Factory()
        pool = SessionPool(factory, size=2, idle=30, max_age=10, on_open=factory.on_open)
        session = await take(pool)
        pool.release(session)
        session.created = time.monotonic() - 10.5  # used a moment ago, but opened long ago
        fresh = await take(pool)
        assert fresh is not session
        assert factory.opened == 2
        await asyncio.sleep(0)
        assert session.quits == 1
        # Released past its age, a session is retired rather than kept.
        fresh.created = time.monotonic() - 10.5
        pool.release(fresh)
        await asyncio.sleep(0)
        assert fresh.quits == 1
        assert pool.open_sessions == 0
        await pool.aclose()

    run(go)


def test_opened_after_skips_older_sessions_and_keeps_them_for_others() -> None:
    """A probe of an address judged at time T takes only a session opened after T: an
    older one may hold the primary's old tables. Other addresses may still use it."""

    async def go() -> None:
        pool, factory = make(size=3)
        old = await take(pool)
        pool.release(old)
        judged = time.monotonic()
        newer = await pool.acquire(HOP, opened_after=judged)
        assert newer is not old
        assert newer.created > judged
        assert factory.opened == 2
        pool.release(newer)
        assert await pool.acquire(HOP, opened_after=judged) is newer
        pool.release(newer)
        assert await take(pool) is newer  # most recently used first
        assert await take(pool) is old  # still fine for an address never judged
        await pool.aclose()

    run(go)


def test_opened_after_makes_room_at_the_size_limit() -> None:
    async def go() -> None:
        pool, _ = make(size=1)
        old = await take(pool)
        pool.release(old)
        fresh = await pool.acquire(HOP, opened_after=time.monotonic())
        assert fresh is not old
        await asyncio.sleep(0)
        assert old.quits == 1  # retired to stay within the size
        assert pool.open_sessions == 1
        pool.release(fresh)
        await pool.aclose()

    run(go)


def test_a_factory_that_raises_gives_the_slot_back() -> None:
    async def go() -> None:
        def broken(hop: Nexthop) -> Session:
            raise ValueError("cannot build a session")

        pool = SessionPool(broken, size=1, idle=30)
        for _ in range(3):
            with pytest.raises(ValueError):
                await asyncio.wait_for(pool.acquire(HOP), 1.0)
        assert pool.open_sessions == 0

    run(go)


def test_sessions_to_any_address_of_the_primary_are_reused_unless_avoided() -> None:
    other = Nexthop("127.0.0.2", 2525)

    async def go() -> None:
        pool, factory = make(size=2)
        first = await pool.acquire(HOP)
        pool.release(first)
        # Another address of the same primary: the idle session to the first is reused.
        assert await pool.acquire(other) is first
        pool.release(first)
        # A failover from the first address: a new session, to the address asked for.
        fresh = await pool.acquire(other, avoid={HOP})
        assert (fresh is not first, fresh.hop) == (True, other)
        pool.release(fresh)
        # Both idle: the one to the address asked for comes first.
        assert await pool.acquire(HOP) is first
        assert await pool.acquire(other) is fresh
        pool.release(first)
        pool.release(fresh)
        # Full of sessions that may not be used: the oldest idle one makes room.
        third = await pool.acquire(Nexthop("127.0.0.3", 2525), avoid={HOP, other})
        assert len(factory.made) == 3 and pool.open_sessions == 2
        await asyncio.sleep(0)  # the retired session's QUIT task runs
        assert [s.quits for s in factory.made[:2]] == [1, 0]
        pool.release(third)
        await pool.aclose()

    run(go)


class PipelinedSession(FakeSession):
    """A session to a primary that offers PIPELINING, has accepted the sender, and has
    refused ``refused`` RCPTs so far (the test decides)."""

    def __init__(self, number: int, hop: Nexthop = HOP) -> None:
        super().__init__(number, hop)
        self.pipelining = True
        self.refused = 0

    @property
    def sender_accepted(self) -> bool:
        return True

    @property
    def errors(self) -> int:
        return self.refused


def test_a_shared_session_reserves_each_probe_and_each_domain_s_controls() -> None:
    # A rejection may ask the domain's verified controls and postmaster@ (once per
    # session and domain, smtp/evidence.py), all of which a primary in drift refuses: a
    # session takes no more probes than would keep even that within ERROR_BUDGET, below
    # Postfix's smtpd_soft_error_limit (10).
    assert CONTROLS_PER_DOMAIN == VERIFIED_CONTROLS + 1
    session = PipelinedSession(1)
    for refused in range(ERROR_BUDGET + 1):
        session.refused = refused
        for holders in range(1, PIPELINE_DEPTH + 1):
            session.holders = holders
            for domains in range(1, holders + 2):
                worst = refused + holders + 1 + domains * CONTROLS_PER_DOMAIN
                expected = worst <= ERROR_BUDGET and holders < PIPELINE_DEPTH
                assert joinable(session, domains) is expected, (refused, holders, domains)


async def share(pool: SessionPool, domains: list[str]) -> tuple[Session, int]:
    """Acquire for probes of ``domains`` in turn, while they share the first session;
    the session and how many hold it."""
    first = await pool.acquire(HOP, domain=domains[0])
    for domain in domains[1:]:
        waiter = asyncio.ensure_future(pool.acquire(HOP, domain=domain))
        await asyncio.sleep(0)
        if not waiter.done():
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            break
        assert waiter.result() is first
    return first, first.holders


def pipelined_pool() -> tuple[SessionPool, list[PipelinedSession]]:
    made: list[PipelinedSession] = []

    def factory(hop: Nexthop) -> Session:
        made.append(PipelinedSession(len(made) + 1, hop))
        return made[-1]

    return SessionPool(factory, size=1, idle=30.0), made


def test_probes_share_a_session_while_the_worst_case_fits() -> None:
    async def go() -> None:
        # Each of its own domain: 1 + 3 RCPTs each, two probes fit in 9.
        pool, made = pipelined_pool()
        session, holders = await share(pool, [f"d{n}.test" for n in range(8)])
        assert holders == 2
        pool.release(session, "d1.test")
        pool.release(session, "d0.test")
        # All of one domain (the domain's controls are asked once): 6 + 3 fit in 9.
        session, holders = await share(pool, ["example.test"] * 8)
        assert holders == ERROR_BUDGET - CONTROLS_PER_DOMAIN == 6
        # Once the primary has refused RCPTs, the room left shrinks with them: after 4,
        # two probes of the domain (4 + 2 + 3 = 9), not three.
        for _ in range(holders - 1):
            pool.release(session, "example.test")
        made[0].refused = 4
        await share(pool, ["example.test"] * 8)
        assert session.holders == 2
        # A probe of unknown domain ("") counts as a domain of its own.
        pool.release(session, "example.test")
        made[0].refused = 0
        await share(pool, ["", "", "", ""])
        assert session.holders == 1 + 1  # 2 + 2 * 3 fit in 9; 3 + 3 * 3 do not
        assert len(made) == 1
        await pool.aclose()

    run(go)
