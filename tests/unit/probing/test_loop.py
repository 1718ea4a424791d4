"""The probe loop's prober on its async path (the policy service's): bounded by the
same deadline as the thread path, and answered with the tempfail result at shutdown."""

from __future__ import annotations

from callahead.probing.loop import LoopProber, ProbeLoop
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
