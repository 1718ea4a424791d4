"""The probe loop's prober on its async path (the policy service's): bounded by the
same deadline as the thread path, and answered with the tempfail result at shutdown;
and the loop's handler of errors nobody else can take (an accept out of descriptors)."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import sys
import threading
from asyncio import constants as asyncio_constants
from typing import Any

import pytest

from callahead.probing.loop import (
    UVLOOP_MISSING,
    LoopKind,
    LoopProber,
    LoopUnavailable,
    ProbeLoop,
    QuietErrors,
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


# --- errors the loop cannot hand to anyone ---------------------------------------------


class OutOfDescriptors(socket.socket):
    """A listening socket whose ``accept`` fails as when every descriptor is taken."""

    tries = 0

    def accept(self) -> tuple[socket.socket, Any]:
        OutOfDescriptors.tries += 1
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))


def test_accept_out_of_descriptors_is_one_line_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, probe_loop: ProbeLoop
) -> None:
    """asyncio retries such an accept each second and logged each try with its
    traceback (through the loop's exception handler): journald then rate-limited the
    process, and the decision lines were lost with the tracebacks."""
    monkeypatch.setattr(asyncio_constants, "ACCEPT_RETRY_DELAY", 0.01)
    OutOfDescriptors.tries = 0
    listener = OutOfDescriptors(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))

    async def serve() -> asyncio.Server:
        return await asyncio.start_server(lambda r, w: None, sock=listener)

    with caplog.at_level(logging.DEBUG):
        server = probe_loop.run(serve(), timeout=5)
        try:
            with socket.create_connection(listener.getsockname(), timeout=5):
                wait_for(lambda: OutOfDescriptors.tries >= 20, 10, what="20 tries")
        finally:
            probe_loop.call_soon(server.close)
    lines = [r for r in caplog.records if "out of system resource" in r.getMessage()]
    assert len(lines) == 1
    assert "Too many open files" in lines[0].getMessage()
    # Only what the accept errors logged: a task of an earlier test that the garbage
    # collector finds meanwhile is logged by asyncio too, and is not this test's concern.
    about_accept = [r for r in caplog.records if "accept" in r.getMessage()]
    assert not [r for r in about_accept if r.exc_info or r.name == "asyncio"], about_accept


def test_repeated_errors_are_counted_into_one_line_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    handler = QuietErrors(interval=60.0, clock=lambda: now[0])
    loop = asyncio.new_event_loop()
    emfile = {"message": "socket.accept() out of system resource", "exception": OSError(24, "x")}
    other = {"message": "Exception in callback", "exception": OSError(errno.EPROTO, "y")}
    try:
        with caplog.at_level(logging.DEBUG):
            for _ in range(61):  # one a second for a minute: t = 100 ... 160
                handler(loop, emfile)
                handler(loop, other)
                now[0] += 1.0
            handler(loop, {"message": "not an OSError", "exception": ValueError("z")})
    finally:
        loop.close()
    accept = [r.getMessage() for r in caplog.records if "out of system resource" in r.getMessage()]
    assert len(accept) == 2
    assert "more since" not in accept[0]
    assert "(59 more since the last line)" in accept[1]
    assert not [r for r in caplog.records if "out of system" in r.getMessage() and r.exc_info]
    # Any other OSError: asyncio's own line (with its traceback) the first time.
    protocol = [r for r in caplog.records if "Exception in callback" in r.getMessage()]
    assert len(protocol) == 2
    assert protocol[0].name == "asyncio" and protocol[0].exc_info
    assert "(59 more since the last line)" in protocol[1].getMessage()
    assert any("not an OSError" in r.getMessage() for r in caplog.records)
