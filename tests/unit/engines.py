"""One probe engine for the unit tests of what drives an engine (the loop's prober,
refresh ahead, catch-all checks): its probes wait until the test answers them, or
forever, and it records what it was asked."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypedDict, Unpack

from callahead.caching.cache import PositiveCache
from callahead.probing.engine import EngineSettings, ProbeEngine
from callahead.probing.loop import ProbeLoop
from callahead.routing.routes import Nexthop
from callahead.smtp.verdict import ProbeResult, Stage, Verdict
from tests.harness.waiting import wait_for

from .settings import probe_settings

CODES = {Verdict.VALID: 250, Verdict.UNKNOWN: 550, Verdict.TEMPFAIL: 451}


def answer_of(verdict: Verdict, primary: str = "[127.0.0.1]:2525") -> ProbeResult:
    """A result with that verdict, as a primary's RCPT reply gives it."""
    return ProbeResult(verdict, Stage.RCPT, CODES[verdict], "scripted", 0.01, primary)


@dataclass(frozen=True)
class Asked:
    address: str
    hops: tuple[Nexthop, ...]
    recheck: bool
    background: bool
    keep: bool = True


class ProbeFlags(TypedDict, total=False):
    """The keyword arguments of ``ProbeEngine.probe`` (False unless given; keep True)."""

    recheck: bool
    background: bool
    keep: bool


class AnsweredEngine(ProbeEngine):
    """Probes wait until the test answers them (``give``, ``answer``); a valid answer is
    cached in ``cache``, if given, as the real engine does (not with ``keep=False``).
    ``free`` is what ``has_free_slot`` says; ``started`` is set by the first probe,
    ``cancelled`` when a waiting probe is cancelled."""

    def __init__(
        self, cache: PositiveCache | None = None, settings: EngineSettings | None = None
    ) -> None:
        super().__init__(settings if settings is not None else probe_settings())
        self.free = True
        self.asked: list[Asked] = []
        self.started = threading.Event()
        self.cancelled = threading.Event()
        self._cache = cache
        self._answers: dict[str, asyncio.Future[ProbeResult]] = {}
        self._lock = threading.Lock()

    @property
    def has_free_slot(self) -> bool:
        return self.free

    async def probe(
        self, address: str, hops: Sequence[Nexthop], **flags: Unpack[ProbeFlags]
    ) -> ProbeResult:
        recheck, background = flags.get("recheck", False), flags.get("background", False)
        keep = flags.get("keep", True)
        future: asyncio.Future[ProbeResult] = asyncio.get_running_loop().create_future()
        with self._lock:
            self.asked.append(Asked(address, tuple(hops), recheck, background, keep))
            self._answers[address] = future
        self.started.set()
        try:
            result = await future
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        if keep and result.verdict is Verdict.VALID and self._cache is not None:
            self._cache.add(address)
        return result

    def waiting(self, address: str | None = None) -> bool:
        """Is a probe of ``address`` (of anything, when None) waiting for its answer?"""
        with self._lock:
            return address in self._answers if address is not None else bool(self._answers)

    def give(self, loop: ProbeLoop, address: str, result: ProbeResult) -> None:
        with self._lock:
            future = self._answers.pop(address)
        loop.call_soon(future.set_result, result)

    def answer(self, loop: ProbeLoop, address: str, verdict: Verdict) -> None:
        self.give(loop, address, answer_of(verdict))

    def give_next(self, loop: ProbeLoop, result: ProbeResult) -> str:
        """Answer the probe that waits (once one does); returns its address."""
        wait_for(self.waiting, 5.0, what="a probe")
        with self._lock:
            address = next(iter(self._answers))
        self.give(loop, address, result)
        return address
