"""Open probe sessions to one primary, reused from probe to probe.

At most ``size`` sessions exist at once; a probe takes an idle one (the most recently
used first) or opens a new one, and waits when all are busy. Sessions idle for
``idle`` seconds are closed before a typical server's idle timeout closes them.

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
from collections.abc import Callable

from .session import Session


class SessionPool:
    def __init__(
        self,
        factory: Callable[[], Session],
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

    async def acquire(self, *, opened_after: float = float("-inf")) -> Session:
        """An open session opened after ``opened_after`` (monotonic time), or a new
        unopened one (the caller opens it). Waits for a free slot; cancel the wait to
        give up."""
        await self._slots.acquire()
        self._busy += 1
        try:
            now = time.monotonic()
            for index in range(len(self._idle) - 1, -1, -1):
                session = self._idle[index]
                if not self._usable(session, now):
                    del self._idle[index]
                    self._retire_session(session)
                elif session.created > opened_after:
                    del self._idle[index]
                    return session
            if self._idle and self._busy + len(self._idle) > self._size:
                # Only sessions too old for this address are idle: make room.
                self._retire_session(self._idle.pop(0))
            self._on_open()
            return self._factory()
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
