"""The probe loop's prober on its async path (the policy service's): bounded by the
same deadline as the thread path, and answered with the tempfail result at shutdown."""

from __future__ import annotations

import sys
import threading

import pytest

from callahead.probing.loop import (
    UVLOOP_MISSING,
    LoopKind,
    LoopProber,
    LoopUnavailable,
    ProbeLoop,
    loop_problem,
)
from callahead.routing.routes import Nexthop
from callahead.smtp.verdict import Skip, Verdict
from tests.harness.waiting import wait_for
from tests.unit.engines import AnsweredEngine

HOPS = (Nexthop("127.0.0.1", 2525),)


def test_the_async_path_returns_the_engines_answer(probe_loop: ProbeLoop) -> None:
    engine = AnsweredEngine()
    prober = LoopProber(probe_loop, engine, wait=5.0)
    future = probe_loop.submit(prober.probe_async("a@x.test", HOPS))
    assert engine.started.wait(5.0)
    engine.answer(probe_loop, "a@x.test", Verdict.VALID)
    assert future.result(5.0).verdict is Verdict.VALID


def test_the_async_path_is_bounded_by_the_handoff_deadline(probe_loop: ProbeLoop) -> None:
    prober = LoopProber(probe_loop, AnsweredEngine(), wait=0.2)
    result = probe_loop.run(prober.probe_async("a@x.test", HOPS), timeout=5.0)
    assert result.verdict is Verdict.TEMPFAIL
    assert result.detail == "no result within 0.2s"


def test_stop_answers_waiting_requests_with_the_shutdown_result(probe_loop: ProbeLoop) -> None:
    engine = AnsweredEngine()
    prober = LoopProber(probe_loop, engine, wait=30.0)
    future = probe_loop.submit(prober.probe_async("a@x.test", HOPS))
    assert engine.started.wait(5.0)
    assert prober.stop(grace=1.0) == 0
    result = future.result(5.0)
    assert (result.verdict, result.skipped) == (Verdict.TEMPFAIL, Skip.SHUTDOWN)
    later = probe_loop.run(prober.probe_async("b@x.test", HOPS), timeout=5.0)
    assert later.skipped is Skip.SHUTDOWN


def test_a_cancellation_that_is_not_stop_goes_through(probe_loop: ProbeLoop) -> None:
    engine = AnsweredEngine()
    prober = LoopProber(probe_loop, engine, wait=30.0)
    future = probe_loop.submit(prober.probe_async("a@x.test", HOPS))
    assert engine.started.wait(5.0)
    future.cancel()
    wait_for(future.done, 5.0)
    assert future.cancelled()


# --- which event loop ------------------------------------------------------------------


def test_the_default_loop_is_asyncios_own() -> None:
    loop = ProbeLoop()
    try:
        assert loop.implementation == "asyncio"
        assert type(loop._loop).__module__.startswith("asyncio")
    finally:
        loop._loop.close()


def test_uvloop_when_chosen_runs_the_probes() -> None:
    uvloop = pytest.importorskip("uvloop", reason="uvloop is optional (not in Debian's run)")
    loop = ProbeLoop(kind=LoopKind.UVLOOP)
    loop.start()
    try:
        assert isinstance(loop._loop, uvloop.Loop)
        assert loop.implementation.startswith("uvloop ")
        prober = LoopProber(loop, AnsweredEngine(), wait=0.2)
        result = loop.run(prober.probe_async("a@x.test", HOPS), timeout=5.0)
        assert result.verdict is Verdict.TEMPFAIL  # the deadline, on uvloop's timers
        # A libmilter thread's hand-off (run_coroutine_threadsafe) and its answer.
        engine = AnsweredEngine()
        prober = LoopProber(loop, engine, wait=5.0)

        def answer_when_asked() -> None:
            assert engine.started.wait(5.0)
            engine.answer(loop, "b@x.test", Verdict.VALID)

        answering = threading.Thread(target=answer_when_asked)
        answering.start()
        assert prober.probe("b@x.test", HOPS).verdict is Verdict.VALID
        answering.join(5.0)
    finally:
        loop.stop()


def test_uvloop_chosen_but_missing_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop: ImportError
    assert loop_problem(LoopKind.UVLOOP) == UVLOOP_MISSING
    assert loop_problem(LoopKind.ASYNCIO) is None
    with pytest.raises(LoopUnavailable, match="python3-uvloop"):
        ProbeLoop(kind=LoopKind.UVLOOP)
