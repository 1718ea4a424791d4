"""Open probe sessions to one primary, reused from probe to probe.

At most ``size`` sessions exist at once; a probe takes an idle one (the most recently
used first) or opens a new one, and waits when all are busy. Sessions idle for
``idle`` seconds are closed before a typical server's idle timeout closes them.

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
from collections.abc import Callable, Collection

from ..routing.routes import Nexthop
from ..smtp.session import Session


class SessionPool:
    def __init__(
        self,
        factory: Callable[[Nexthop], Session],
        *,
        size: int,
        idle: float,
        max_age: float = float("inf"),
        on_open: Callable[[], None] = lambda: None,
    ) -> None:
        self._factory = factory
        self._idle_limit = idle
        self._max_age = max_age
        self._size = size
        self._slots = asyncio.Semaphore(size)
        self._idle: list[Session] = []
        self._busy = 0
        self._on_open = on_open
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def open_sessions(self) -> int:
        return self._busy + len(self._idle)

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
    ) -> Session:
        """An open session opened after ``opened_after`` (monotonic time) to an address
        not in ``avoid`` (one to ``hop`` first), or a new unopened one to ``hop`` (the
        caller opens it). Waits for a free slot; cancel the wait to give up."""
        await self._slots.acquire()
        self._busy += 1
        try:
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
                    and (chosen is None or (session.hop == hop != self._idle[chosen].hop))
                ):
                    chosen = index
            if chosen is not None:
                return self._idle.pop(chosen)
            if self._idle and self._busy + len(self._idle) > self._size:
                # Only sessions too old for this address, or to addresses already
                # tried, are idle: make room.
                self._retire_session(self._idle.pop(0))
            self._on_open()
            return self._factory(hop)
        except BaseException:
            self._busy -= 1
            self._slots.release()
            raise

    def release(self, session: Session) -> None:
        """Give a session back: kept if still reusable, retired otherwise."""
        self._busy -= 1
        self._slots.release()
        now = time.monotonic()
        if session.reusable and now - session.created < self._max_age:
            session.last_used = now
            self._idle.append(session)
        else:
            self._retire_session(session)

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
        self._idle = keep

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for session in idle:
            self._retire_session(session)
        if self._closing:
            await asyncio.wait(list(self._closing), timeout=3)
