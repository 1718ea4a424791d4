"""Open probe sessions to one primary, reused from probe to probe.

At most ``size`` sessions exist at once; a probe takes an idle one (the most recently
used first), else opens a new one, else shares a busy one (below), and waits when none
of these is possible. Sessions idle for ``idle`` seconds are closed before a typical
server's idle timeout closes them.

**Shared sessions (pipelining).** A session to a primary that offers PIPELINING carries
up to ``PIPELINE_DEPTH`` probes at once (``joinable``): a probe that finds the
pool full and no session idle joins a busy one (the least shared first) and sends its
RCPT behind the ones in flight, rather than waiting for one to finish. The pool still
opens its ``size`` sessions first, so that a primary works on as many probes at once as
before (a reply that waits, as an accepted RCPT for an inflow token, holds up only the
probes behind it on its session). A session is shared only once the primary accepted
its sender, only while even a refusal of every probe on it, and of every control their
rejections may ask, would keep it within its error budget (``has_room``: 6 probes of one
domain, 2 of different domains), and only when opened after the probe's address was
last judged.

**One pool per primary, not per address.** A primary named by its MX host (a large MX
pool such as Microsoft 365's hands out other addresses at every lookup) has sessions to
several of its addresses in one pool: a probe takes an idle session to any of them, as
Postfix's smtp(8) looks its connection cache up by destination first and by address
second, and opens a new one to the address it was given. ``avoid`` keeps a failover to
another address of the same primary off the sessions to addresses already tried. When
the pool is full of idle sessions none of which may be used, the oldest is closed to
make room, so at most ``size`` sessions exist however many addresses come and go.

**A current view.** A primary reads its lookup tables when a connection begins (Postfix's
smtpd keeps the tables it opened for the whole session), so an old session answers for
an old primary. Sessions live at most ``max_age`` seconds, and a probe can ask for a
session opened after a given moment (``opened_after``: when its address was last
judged), so that a user added on the primary after that answer is seen at once.

Lives on the probe event loop; not thread-safe.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Collection

from ..routing.routes import Nexthop
from ..smtp.evidence import CONTROLS_PER_DOMAIN
from ..smtp.session import ERROR_BUDGET, MAX_RCPTS_PER_SESSION, MAX_RSETS_PER_SESSION, Session

PIPELINE_DEPTH = 8
"""Probes that may share one session of a primary that offers PIPELINING."""


def has_room(session: Session, probes: int, domains: int) -> bool:
    """``probes`` probes on ``session``, of ``domains`` domains, would keep it within
    ``ERROR_BUDGET`` and its recipient and RSET limits even if every probe were refused
    and every domain's controls asked and refused too (a Postfix primary sleeps before
    each reply after its 10th error, ``smtpd_soft_error_limit``). The controls of a
    domain already asked on the session are counted in its errors and again here: a
    bound, not a forecast."""
    rcpts = probes + domains * CONTROLS_PER_DOMAIN
    return (
        session.errors + rcpts <= ERROR_BUDGET
        and session.rcpts + rcpts <= MAX_RCPTS_PER_SESSION
        and session.rsets + probes <= MAX_RSETS_PER_SESSION
    )


def room_for_one(session: Session, domain: str) -> bool:
    """An idle ``session`` may take one probe of ``domain``: its refusal, and every
    control of the domain the session may still ask refused too (none once one vouched:
    ``EvidenceBook.controls_left``), keep it within ``ERROR_BUDGET`` and its recipient and
    RSET limits. A session that judged the domain already keeps taking its probes up to
    the budget; one of other domains leaves room for their controls."""
    rcpts = 1 + session.evidence.controls_left(domain)
    return (
        session.errors + rcpts <= ERROR_BUDGET
        and session.rcpts + rcpts <= MAX_RCPTS_PER_SESSION
        and session.rsets + 1 <= MAX_RSETS_PER_SESSION
    )


def joinable(session: Session, domains: int) -> bool:
    """One more probe may share ``session`` now, making ``domains`` domains among its
    probes: the primary offers PIPELINING and has accepted the session's sender, no
    control address is being asked on it (an accepted control may open a queue file at
    the primary and wait up to ``in_flow_delay`` for it: 1 s at a Postfix primary whose
    inflow tokens are spent), and the session has room (``has_room``) for every probe on
    it, this one too."""
    holders = session.holders
    return (
        session.pipelining
        and session.sender_accepted
        and not session.asking_controls
        and 0 < holders < PIPELINE_DEPTH
        and session.reusable
        and has_room(session, holders + 1, domains)
    )


def _domains(held: list[str], domain: str) -> int:
    """Distinct domains of the probes ``held`` and one more of ``domain``; an unknown
    domain ("") counts as a domain of its own."""
    all_held = [*held, domain]
    return len({d for d in all_held if d}) + all_held.count("")


class SessionPool:
    def __init__(
        self,
        factory: Callable[[Nexthop], Session],
        *,
        size: int,
        idle: float,
        max_age: float = float("inf"),
        on_open: Callable[[], None] = lambda: None,
        on_share: Callable[[], None] = lambda: None,
    ) -> None:
        self._factory = factory
        self._idle_limit = idle
        self._max_age = max_age
        self._size = size
        self._idle: list[Session] = []
        self._busy: list[Session] = []
        """Sessions held by at least one probe (opened, or being opened)."""
        self._held: dict[Session, list[str]] = {}
        """The domains of the probes holding each busy session."""
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._on_open = on_open
        self._on_share = on_share
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def open_sessions(self) -> int:
        return len(self._busy) + len(self._idle)

    def _usable(self, session: Session, now: float) -> bool:
        return (
            session.alive
            and now - session.last_used < self._idle_limit
            and now - session.created < self._max_age
        )

    async def acquire(
        self,
        hop: Nexthop,
        *,
        opened_after: float = float("-inf"),
        avoid: Collection[Nexthop] = (),
        domain: str = "",
    ) -> Session:
        """An open session opened after ``opened_after`` (monotonic time) to an address
        not in ``avoid`` (one to ``hop`` first): an idle one, else a new unopened one to
        ``hop`` (the caller opens it), else a busy one to share. Waits for one of these;
        cancel the wait to give up. Every session acquired is released, with the same
        ``domain`` (the probed address's: a session's probes of one domain share one
        reserve for its controls; "" for unknown)."""
        while True:
            session = self._take(hop, opened_after, avoid, domain)
            if session is not None:
                return session
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                raise

    def _take(
        self, hop: Nexthop, opened_after: float, avoid: Collection[Nexthop], domain: str
    ) -> Session | None:
        now = time.monotonic()
        chosen: int | None = None
        for index in range(len(self._idle) - 1, -1, -1):
            session = self._idle[index]
            if not self._usable(session, now):
                del self._idle[index]
                self._retire_session(session)
                if chosen is not None:
                    chosen -= 1
            elif (
                session.created > opened_after
                and session.hop not in avoid
                and room_for_one(session, domain)
                and (chosen is None or (session.hop == hop != self._idle[chosen].hop))
            ):
                chosen = index
        if chosen is not None:
            return self._hold(self._idle.pop(chosen), domain)
        if self.open_sessions < self._size:
            return self._new(hop, domain)
        shared = self._shared(hop, opened_after, avoid, now, domain)
        if shared is not None:
            shared.holders += 1
            self._held.setdefault(shared, []).append(domain)
            self._on_share()
            return shared
        if self._idle:
            # Only sessions too old for this address, or to addresses already tried,
            # are idle: make room.
            self._retire_session(self._idle.pop(0))
            return self._new(hop, domain)
        return None

    def _shared(
        self,
        hop: Nexthop,
        opened_after: float,
        avoid: Collection[Nexthop],
        now: float,
        domain: str,
    ) -> Session | None:
        """The busy session a probe may share: one to ``hop`` first, the least shared."""
        best: Session | None = None
        for session in self._busy:
            if (
                joinable(session, _domains(self._held.get(session, []), domain))
                and session.created > opened_after
                and now - session.created < self._max_age
                and session.hop not in avoid
                and (
                    best is None
                    or (session.hop == hop, -session.holders) > (best.hop == hop, -best.holders)
                )
            ):
                best = session
        return best

    def _new(self, hop: Nexthop, domain: str) -> Session:
        self._on_open()
        return self._hold(self._factory(hop), domain)

    def _hold(self, session: Session, domain: str) -> Session:
        session.holders = 1
        self._held[session] = [domain]
        session.on_joinable = self._wake
        self._busy.append(session)
        return session

    def release(self, session: Session, domain: str = "") -> None:
        """Give a session back (``domain`` as acquired): once its last probe is done,
        kept if still reusable, retired otherwise."""
        session.holders -= 1
        held = self._held.get(session, [])
        if domain in held:
            held.remove(domain)
        if session.holders <= 0:
            session.holders = 0
            self._held.pop(session, None)
            self._busy.remove(session)
            now = time.monotonic()
            if session.reusable and now - session.created < self._max_age:
                session.last_used = now
                self._idle.append(session)
            else:
                self._retire_session(session)
        self._wake()

    def _wake(self) -> None:
        """Let the waiting probes look again, in the order they came."""
        waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _retire_session(self, session: Session) -> None:
        task = asyncio.get_running_loop().create_task(session.quit())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def reap(self, *, drop_all: bool = False) -> None:
        """Close the sessions idle or alive for too long and the ones the primary
        closed; with ``drop_all``, every idle session."""
        now = time.monotonic()
        keep = []
        for session in self._idle:
            if not drop_all and self._usable(session, now):
                keep.append(session)
            else:
                self._retire_session(session)
        if len(keep) < len(self._idle):
            self._idle = keep
            self._wake()

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for session in idle:
            self._retire_session(session)
        if self._closing:
            await asyncio.wait(list(self._closing), timeout=3)
