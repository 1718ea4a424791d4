"""One asyncio event loop in a daemon thread, shared by every probe.

libmilter runs each SMTP connection in a thread of its own; those threads hand their
probe to this loop with ``run_coroutine_threadsafe`` and wait for the result with a
bound, so a stuck probe can never hold a Postfix smtpd process past the deadline.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from .engine import ProbeEngine
from .probe import ProbeResult
from .routes import Nexthop
from .verdict import Stage, Verdict

log = logging.getLogger(__name__)

T = TypeVar("T")

HANDOFF_MARGIN = 1.0
"""Seconds a milter thread waits beyond the longest answer the engine can take (the wait
for a probe slot plus the probe timeout) before it gives up."""


class ProbeLoop:
    """Owns the event loop thread. Start it once, stop it at shutdown."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="callahead-probes", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def start(self) -> None:
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``coro`` on the loop and wait for it; on timeout, cancel it and raise
        ``TimeoutError``."""
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
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


class LoopProber:
    """The policy's ``Prober``: runs ``ProbeEngine`` probes on a ``ProbeLoop``."""

    def __init__(self, loop: ProbeLoop, engine: ProbeEngine, wait: float | None = None) -> None:
        self._loop = loop
        self._engine = engine
        self._wait = wait if wait is not None else engine.settings.longest_answer + HANDOFF_MARGIN

    def probe(self, address: str, hops: Sequence[Nexthop]) -> ProbeResult:
        try:
            return self._loop.run(self._engine.probe(address, hops), self._wait)
        except TimeoutError as exc:
            log.warning("probe for %s overran its deadline: %s", address, exc)
            return ProbeResult(
                Verdict.TEMPFAIL,
                Stage.CONNECT,
                None,
                str(exc),
                self._wait,
                str(hops[0]) if hops else "",
            )
