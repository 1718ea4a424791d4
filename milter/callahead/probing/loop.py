"""One asyncio event loop in a daemon thread, shared by every probe.

libmilter runs each SMTP connection in a thread of its own; those threads hand their
probe to this loop with ``run_coroutine_threadsafe`` and wait for the result with a
bound, so a stuck probe can never hold a Postfix smtpd process past the deadline.

Errors the loop cannot hand to anyone (an ``accept`` out of file descriptors, retried
each second by asyncio) go through ``QuietErrors``: one line a minute with a count,
never a traceback per try.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import errno
import importlib.metadata
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from ..base.errors import CallaheadError
from ..base.logfmt import escape
from ..routing.routes import Nexthop
from ..smtp.verdict import ProbeResult, Skip, Stage, Verdict
from .engine import ProbeEngine

log = logging.getLogger("callahead.loop")

T = TypeVar("T")

HANDOFF_MARGIN = 1.0
"""Seconds a milter thread waits beyond the longest answer the engine can take (the wait
for a probe slot plus the probe timeout) before it gives up."""


HEARTBEAT_INTERVAL = 0.5
"""Seconds between two beats of the probe loop's heartbeat."""
STALL_LIMIT = 5.0
"""Seconds without a beat after which the probe loop counts as stuck: recipients then
get the tempfail action at once instead of each waiting the whole handoff time."""


RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
"""Out of file descriptors or memory: asyncio stops accepting on that socket for a second
(``socket.accept() out of system resource``) and tries again."""
ERROR_LOG_INTERVAL = 60.0
"""Seconds between two log lines about the same kind of loop error."""


class QuietErrors:
    """An event loop's exception handler: errors that repeat are logged once per
    ``interval`` with how many came since, not once each.

    An ``OSError`` out of file descriptors or memory (``RESOURCE_ERRNOS``: what asyncio
    meets accepting a connection when idle connections hold every descriptor) is a
    warning without a traceback: it says what ran out, not where. Any other ``OSError``
    gets asyncio's own line, traceback and all, the first time, then the same
    one-a-minute line. Everything else goes to asyncio's own handler unchanged. Before
    this, asyncio logged each retry with its traceback (about 15 lines a second per
    listening socket), which journald rate-limits, so the decision lines were lost."""

    def __init__(
        self, interval: float = ERROR_LOG_INTERVAL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._interval = interval
        self._clock = clock
        self._seen: dict[tuple[str, int | None], tuple[float, int]] = {}
        """(error class, errno) -> (when its last line was logged, how many since)."""

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if not isinstance(exc, OSError):
            loop.default_exception_handler(context)
            return
        key = (type(exc).__name__, exc.errno)
        now = self._clock()
        last = self._seen.get(key)
        if last is not None and now - last[0] < self._interval:
            self._seen[key] = (last[0], last[1] + 1)
            return
        self._seen[key] = (now, 0)
        more = f" ({last[1]} more since the last line)" if last is not None and last[1] else ""
        event = context.get("message") or "event loop error"
        if exc.errno in RESOURCE_ERRNOS:
            log.warning(
                "%s: %s; tried again each second, logged at most every %gs%s",
                event,
                exc,
                self._interval,
                more,
            )
        elif last is None:
            loop.default_exception_handler(context)
        else:
            log.warning("%s: %s%s", event, exc, more)


class LoopKind(enum.Enum):
    """``CALLAHEAD_EVENT_LOOP``: which event loop implementation runs the probe loop."""

    ASYNCIO = "asyncio"
    UVLOOP = "uvloop"


UVLOOP_MISSING = (
    "CALLAHEAD_EVENT_LOOP=uvloop, but uvloop is not installed "
    "(Debian: apt install python3-uvloop; pip: pip install uvloop)"
)


class LoopUnavailable(CallaheadError):
    """``CALLAHEAD_EVENT_LOOP=uvloop`` without uvloop installed."""


def loop_problem(kind: LoopKind) -> str | None:
    """Why an event loop of ``kind`` cannot be made here, or None."""
    if kind is LoopKind.UVLOOP:
        try:
            import uvloop  # noqa: F401 -- only whether it imports
        except ImportError:
            return UVLOOP_MISSING
    return None


def new_event_loop(kind: LoopKind = LoopKind.ASYNCIO) -> tuple[asyncio.AbstractEventLoop, str]:
    """A new event loop of ``kind``, and what it is, for the start-up line.

    asyncio's own is the default: measured on the warm policy path (bench/policycpu.py,
    bench/RESULTS-policycpu.md), uvloop cost no less CPU per request, since what is left
    there is Python code and the socket write, not the loop's own work."""
    if kind is LoopKind.UVLOOP:
        try:
            import uvloop  # optional: imported only where chosen
        except ImportError:
            raise LoopUnavailable(UVLOOP_MISSING) from None
        return uvloop.new_event_loop(), f"uvloop {importlib.metadata.version('uvloop')}"
    return asyncio.new_event_loop(), "asyncio"


class ProbeLoop:
    """Owns the event loop thread. Start it once, stop it at shutdown.

    The loop beats every ``HEARTBEAT_INTERVAL`` seconds; ``healthy`` says whether the
    thread runs and has beaten within ``STALL_LIMIT`` (a callback that blocks the loop,
    or a dead thread, shows as a missing beat)."""

    def __init__(
        self, *, stall_limit: float = STALL_LIMIT, kind: LoopKind = LoopKind.ASYNCIO
    ) -> None:
        self._loop, self.implementation = new_event_loop(kind)
        """``implementation``: which loop this is, in words."""
        self._loop.set_exception_handler(QuietErrors())
        self._thread = threading.Thread(target=self._run, name="callahead-probes", daemon=True)
        self._stall_limit = stall_limit
        self._last_beat = time.monotonic()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._beat()
        self._loop.run_forever()

    def _beat(self) -> None:
        self._last_beat = time.monotonic()
        self._loop.call_later(HEARTBEAT_INTERVAL, self._beat)

    @property
    def silent_for(self) -> float:
        """Seconds since the last heartbeat."""
        return time.monotonic() - self._last_beat

    @property
    def healthy(self) -> bool:
        return self._thread.is_alive() and self.silent_for < self._stall_limit

    def start(self) -> None:
        self._thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the loop; its future can be waited on and cancelled."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def call_soon(self, callback: Callable[..., object], *args: object) -> None:
        """Call ``callback(*args)`` on the loop, from any thread, without waiting."""
        self._loop.call_soon_threadsafe(callback, *args)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``coro`` on the loop and wait for it; on timeout, cancel it and raise
        ``TimeoutError``."""
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"no result within {timeout:.3g}s") from None

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()  # not left to the garbage collector, in any order


class LoopProber:
    """The policy's ``Prober``: runs ``ProbeEngine`` probes on a ``ProbeLoop``.

    Thread-safe: each libmilter thread waits for its own probe. ``stop`` (at shutdown)
    cancels the probes in flight, so that every waiting thread gets its answer (the
    tempfail action) at once, and answers every later request the same way."""

    def __init__(self, loop: ProbeLoop, engine: ProbeEngine, wait: float | None = None) -> None:
        self._loop = loop
        self._engine = engine
        self._wait = wait if wait is not None else engine.settings.longest_answer + HANDOFF_MARGIN
        self._pending: set[concurrent.futures.Future[ProbeResult]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        """Policy-service requests waiting on a probe, on the loop."""
        self._changed = threading.Condition()
        self._stopping = False

    def probe(self, address: str, hops: Sequence[Nexthop]) -> ProbeResult:
        if not self._loop.healthy:
            return ProbeResult.not_probed(
                Skip.LOOP_STALLED,
                hops,
                f"the probe loop has not answered for {self._loop.silent_for:.1f}s",
            )
        with self._changed:
            if self._stopping:
                return _stopping(hops)
            future = self._loop.submit(self._engine.probe(address, hops))
            self._pending.add(future)
        try:
            return future.result(self._wait)
        except concurrent.futures.TimeoutError:
            future.cancel()
            return self._overran(address, hops)
        except concurrent.futures.CancelledError:
            return _stopping(hops)
        finally:
            with self._changed:
                self._pending.discard(future)
                self._changed.notify_all()

    async def probe_async(self, address: str, hops: Sequence[Nexthop]) -> ProbeResult:
        """The same on the probe loop itself (the policy service): no thread handoff."""
        task = asyncio.current_task()
        assert task is not None
        with self._changed:
            if self._stopping:
                return _stopping(hops)
            self._tasks.add(task)
        try:
            async with asyncio.timeout(self._wait):
                return await self._engine.probe(address, hops)
        except TimeoutError:
            return self._overran(address, hops)
        except asyncio.CancelledError:
            if self._stopping and task.uncancel() == 0:  # cancelled by stop(), not by us
                return _stopping(hops)
            raise
        finally:
            with self._changed:
                self._tasks.discard(task)

    def _overran(self, address: str, hops: Sequence[Nexthop]) -> ProbeResult:
        log.warning("probe for <%s> overran its deadline of %.3gs", escape(address), self._wait)
        return ProbeResult(
            Verdict.TEMPFAIL,
            Stage.CONNECT,
            None,
            f"no result within {self._wait:.3g}s",
            self._wait,
            str(hops[0]) if hops else "",
        )

    @property
    def in_flight(self) -> int:
        """Threads waiting on a probe now."""
        with self._changed:
            return len(self._pending)

    def stop(self, grace: float) -> int:
        """Cancel the probes in flight and refuse new ones; wait up to ``grace`` seconds
        for the waiting threads to take their answers. Returns how many did not."""
        with self._changed:
            self._stopping = True
            for future in self._pending:
                future.cancel()
            for task in self._tasks:
                self._loop.call_soon(task.cancel)
            self._changed.wait_for(lambda: not self._pending, timeout=grace)
            return len(self._pending)


def _stopping(hops: Sequence[Nexthop]) -> ProbeResult:
    return ProbeResult.not_probed(Skip.SHUTDOWN, hops, "callahead is stopping")
