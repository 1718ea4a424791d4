"""Open probe sessions to one primary, reused from probe to probe.

At most ``size`` sessions exist at once; a probe takes an idle one (the most recently
used first) or opens a new one, and waits when all are busy. Sessions idle for
``idle`` seconds are closed before a typical server's idle timeout closes them.
Lives on the probe event loop; not thread-safe.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from .probe import Session


class SessionPool:
    def __init__(
        self,
        factory: Callable[[], Session],
        *,
        size: int,
        idle: float,
        on_open: Callable[[], None] = lambda: None,
    ) -> None:
        self._factory = factory
        self._idle_limit = idle
        self._slots = asyncio.Semaphore(size)
        self._idle: list[Session] = []
        self._busy = 0
        self._on_open = on_open
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def open_sessions(self) -> int:
        return self._busy + len(self._idle)

    async def acquire(self) -> Session:
        """An open session, or a new unopened one (the caller opens it). Waits for a
        free slot; cancel the wait to give up."""
        await self._slots.acquire()
        self._busy += 1
        now = time.monotonic()
        while self._idle:
            session = self._idle.pop()
            if session.alive and now - session.last_used < self._idle_limit:
                return session
            self._retire(session)
        self._on_open()
        return self._factory()

    def release(self, session: Session) -> None:
        """Give a session back: kept if still reusable, retired otherwise."""
        self._busy -= 1
        self._slots.release()
        if session.reusable:
            session.last_used = time.monotonic()
            self._idle.append(session)
        else:
            self._retire(session)

    def _retire(self, session: Session) -> None:
        task = asyncio.get_running_loop().create_task(session.quit())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def reap(self, *, drop_all: bool = False) -> None:
        """Close the sessions idle for too long and the ones the primary closed; with
        ``drop_all``, every idle session."""
        now = time.monotonic()
        keep = []
        for session in self._idle:
            if not drop_all and session.alive and now - session.last_used < self._idle_limit:
                keep.append(session)
            else:
                self._retire(session)
        self._idle = keep

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for session in idle:
            self._retire(session)
        if self._closing:
            await asyncio.wait(list(self._closing), timeout=3)
