"""The probe loop's prober on its async path (the policy service's): bounded by the
same deadline as the thread path, and answered with the tempfail result at shutdown."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

from callahead.engine import ProbeEngine
from callahead.loop import LoopProber, ProbeLoop
from callahead.routes import Nexthop
from callahead.verdict import ProbeResult, Skip, Stage, Verdict
from tests.harness.waiting import wait_for

from .settings import probe_settings

HOPS = (Nexthop("127.0.0.1", 2525),)


class HeldEngine(ProbeEngine):
    """Probes that end only when released (``release``), or never."""

    def __init__(self) -> None:
        super().__init__(probe_settings())
        self.started = threading.Event()
        self.release: asyncio.Event | None = None

    async def probe(
        self,
        address: str,
        hops: Sequence[Nexthop],
        *,
        recheck: bool = False,
        background: bool = False,
    ) -> ProbeResult:
        self.release = asyncio.Event()
        self.started.set()
        await self.release.wait()
        return ProbeResult(Verdict.VALID, Stage.RCPT, 250, "2.1.5 Ok", 0.0, str(hops[0]))


def test_the_async_path_returns_the_engines_answer(probe_loop: ProbeLoop) -> None:
    engine = HeldEngine()
    prober = LoopProber(probe_loop, engine, wait=5.0)
    future = probe_loop.submit(prober.probe_async("a@x.test", HOPS))
    assert engine.started.wait(5.0)
    assert engine.release is not None
    probe_loop.call_soon(engine.release.set)
    assert future.result(5.0).verdict is Verdict.VALID


def test_the_async_path_is_bounded_by_the_handoff_deadline(probe_loop: ProbeLoop) -> None:
    prober = LoopProber(probe_loop, HeldEngine(), wait=0.2)
    result = probe_loop.run(prober.probe_async("a@x.test", HOPS), timeout=5.0)
    assert result.verdict is Verdict.TEMPFAIL
    assert result.detail == "no result within 0.2s"


def test_stop_answers_waiting_requests_with_the_shutdown_result(probe_loop: ProbeLoop) -> None:
    engine = HeldEngine()
    prober = LoopProber(probe_loop, engine, wait=30.0)
    future = probe_loop.submit(prober.probe_async("a@x.test", HOPS))
    assert engine.started.wait(5.0)
    assert prober.stop(grace=1.0) == 0
    result = future.result(5.0)
    assert (result.verdict, result.skipped) == (Verdict.TEMPFAIL, Skip.SHUTDOWN)
    later = probe_loop.run(prober.probe_async("b@x.test", HOPS), timeout=5.0)
    assert later.skipped is Skip.SHUTDOWN


def test_a_cancellation_that_is_not_stop_goes_through(probe_loop: ProbeLoop) -> None:
    engine = HeldEngine()
    prober = LoopProber(probe_loop, engine, wait=30.0)
    future = probe_loop.submit(prober.probe_async("a@x.test", HOPS))
    assert engine.started.wait(5.0)
    future.cancel()
    wait_for(future.done, 5.0)
    assert future.cancelled()
