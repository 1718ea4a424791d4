"""Run the milter: the probe loop, metrics, watchdog and libmilter, until a stop signal.

SIGHUP reloads the routes (router.py). libmilter's own signal thread takes SIGHUP as a
stop, so it must never get one: libmilter runs in a thread of its own (which, like
libmilter's threads, blocks SIGHUP), and the main thread keeps SIGHUP unblocked with a
handler, so the kernel hands it the signal (it prefers the main thread of a process)."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import Milter

from .adapter import CallaheadMilter
from .assembly import build_policy, build_resolver, build_router
from .config import Config
from .loop import HANDOFF_MARGIN, ProbeLoop
from .metrics import Metrics
from .postfixmaps import PostfixConfigError
from .router import Router
from .watchdog import HealthMonitor, notify

log = logging.getLogger(__name__)

EX_UNAVAILABLE = 69
MILTER_COMMAND_TIMEOUT = 30
"""Postfix's default milter_command_timeout, in seconds."""


SHUTDOWN_GRACE = 2.0
"""Seconds, after SIGTERM, for the threads waiting on cancelled probes to answer."""
SESSION_CLOSE_TIMEOUT = 5.0
"""Seconds for closing the pooled probe sessions (QUIT) at shutdown."""
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
SIGNAL_POLL = 0.05
"""Seconds between two looks for a second stop signal."""
UNCLAIMED_AFTER = 0.3
"""Seconds a stop signal must stay pending to count as one nobody takes."""


def _exit_on_second_signal() -> None:
    """Exit at once on a stop signal that nobody takes.

    The stop signals are blocked in every thread; libmilter's signal thread takes the
    first one with sigwait and then ends. A signal is briefly pending even on its way to
    that thread, so only one still pending after ``UNCLAIMED_AFTER`` seconds counts as
    nobody's: the second one, which ends the process at once, whatever the shutdown is
    waiting for."""
    pending_since: float | None = None
    while True:
        pending = signal.sigpending() & STOP_SIGNALS
        now = time.monotonic()
        if not pending:
            pending_since = None
        elif pending_since is None:
            pending_since = now
        elif now - pending_since >= UNCLAIMED_AFTER:
            signum = min(pending)
            log.warning("second stop signal (%s): exiting at once", signum.name)
            logging.shutdown()
            os._exit(128 + signum)
        time.sleep(SIGNAL_POLL)


def _reload(router: Router) -> None:
    """SIGHUP: re-read the routes; on failure the old ones stay. One log line either way."""
    try:
        routes = router.reload()
    except PostfixConfigError as exc:
        log.error("SIGHUP: reload failed, keeping the old routes: %s", exc)
    except Exception:  # a handler in the main thread must never end the process
        log.exception("SIGHUP: reload failed, keeping the old routes")
    else:
        log.info("SIGHUP: routes reloaded: %s", routes)


def _run_milter(config: Config) -> BaseException | None:
    """``Milter.runmilter`` in a thread of its own (see the module doc); returns what it
    raised. The main thread waits in ``join``, where SIGHUP handlers run."""
    raised: list[BaseException] = []

    def run() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            Milter.runmilter("callahead", config.milter_socket, timeout=300)
        except BaseException as exc:  # noqa: BLE001 (handed to the main thread)
            raised.append(exc)

    thread = threading.Thread(target=run, name="callahead-milter")
    thread.start()
    thread.join()
    return raised[0] if raised else None


def serve(config: Config) -> int:
    """Run until SIGTERM or SIGINT; returns the exit status.

    The stop signals are blocked in every thread (the mask is set before any thread
    starts), so only libmilter's own signal thread takes the first one: libmilter stops
    listening (it notices within about 5 s) and returns. Then the probes in flight are
    cancelled, so every libmilter thread waiting on one answers Postfix with the
    tempfail action within ``SHUTDOWN_GRACE``, and the pooled sessions are closed with
    QUIT within ``SESSION_CLOSE_TIMEOUT``: about 12 s at most from signal to exit. A
    second signal exits at once (``_exit_on_second_signal``)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    loop = ProbeLoop()
    metrics = Metrics()
    resolver, dns_client = build_resolver(config)
    router = build_router(config, loop, dns_client)
    signal.signal(signal.SIGHUP, lambda _signum, _frame: _reload(router))
    policy, cache, engine, prober = build_policy(
        config, loop, metrics, routes=router, resolver=resolver
    )
    longest = engine.settings.longest_answer + HANDOFF_MARGIN
    if longest >= MILTER_COMMAND_TIMEOUT:
        log.warning(
            "CALLAHEAD_PROBE_WAIT + CALLAHEAD_PROBE_TIMEOUT allow answers of up to %.0f s: "
            "set Postfix's milter_command_timeout above that (its default is %d s)",
            longest,
            MILTER_COMMAND_TIMEOUT,
        )
    metrics.track_cache_size(cache.__len__)
    if config.metrics_listen is not None:
        host, port = config.metrics_listen
        try:
            metrics.serve(host, port)
        except OSError as exc:
            log.error("cannot serve metrics on %s:%d: %s", host, port, exc)
            return EX_UNAVAILABLE
    loop.start()
    metrics.probe_loop_up.set_function(lambda: 1.0 if loop.healthy else 0.0)
    monitor = HealthMonitor(lambda: loop.healthy)
    monitor.start()
    Milter.factory = lambda: CallaheadMilter(policy, metrics)
    # callahead changes nothing in a message; it only asks for its macros and replies.
    Milter.set_flags(Milter.SETSYMLIST)
    log.info(
        "callahead listening on %s; routes: %s; metrics: %s",
        config.socket,
        router.describe(),
        "off" if config.metrics_listen is None else "{}:{}".format(*config.metrics_listen),
    )
    threading.Thread(target=_exit_on_second_signal, name="callahead-signals", daemon=True).start()
    notify("READY=1")
    try:
        raised = _run_milter(config)
        if isinstance(raised, Milter.milter.error):
            log.error("milter stopped: %s (socket %s)", raised, config.socket)
            return EX_UNAVAILABLE
        if raised is not None:
            raise raised
    finally:
        notify("STOPPING=1")
        log.info("callahead stopping")
        left = prober.stop(SHUTDOWN_GRACE)
        if left:
            log.warning("%d recipient(s) still waiting on a probe at exit", left)
        monitor.stop()
        try:
            loop.run(engine.aclose(), timeout=SESSION_CLOSE_TIMEOUT)
        except TimeoutError:
            log.warning("probe sessions did not close in time")
        loop.stop()
    log.info("callahead stopped")
    return 0
