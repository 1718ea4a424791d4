"""Run the front ends (milter, policy service) with the probe loop, metrics, admin socket
and watchdog, until a stop signal.

SIGHUP reloads the routes (router.py). libmilter's own signal thread takes SIGHUP as a
stop, so it must never get one: libmilter runs in a thread of its own (which, like
libmilter's threads, blocks SIGHUP), and the main thread keeps SIGHUP unblocked with a
handler, so the kernel hands it the signal (it prefers the main thread of a process)."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import signal
import threading
import time

import Milter

from ..caching import cachefile
from ..caching.catchall import LoopCatchAll
from ..caching.refresh import LoopRefresher
from ..caching.sharedcache import SharedGate
from ..frontends.adapter import CallaheadMilter
from ..frontends.admin import AdminError, AdminServer, Health, report_answer
from ..frontends.judge import Judge
from ..frontends.maillog.meterstart import start_meter
from ..frontends.maillog.tally import DomainTally
from ..frontends.metrics import Metrics
from ..frontends.milterloop import MilterStartError, open_milter, run_milter
from ..frontends.policyservice import IDLE_MARGIN, PolicyService
from ..frontends.unixsocket import UnixSocketError
from ..probing.engine import ProbeEngine
from ..probing.loop import ProbeLoop
from ..routing.postfixsettings import PostfixConfigError
from ..routing.router import Router
from .assembly import answer_time, build_learner, build_policy
from .config import Config
from .hookcheck import HookCheck
from .watchdog import HealthMonitor, notify

log = logging.getLogger("callahead.server")

EX_UNAVAILABLE = 69
MILTER_COMMAND_TIMEOUT = 30
"""Postfix's default milter_command_timeout, in seconds."""
MILTER_TIMEOUT = 300
"""Seconds libmilter waits on a quiet Postfix connection (smfi_settimeout)."""


START_TIMEOUT = 5.0
"""Seconds for setting up a listening socket (policy service, admin) at start."""
SHUTDOWN_GRACE = 2.0
"""Seconds, after SIGTERM, for the threads waiting on cancelled probes to answer."""
SESSION_CLOSE_TIMEOUT = 5.0
"""Seconds for closing the pooled probe sessions (QUIT) at shutdown."""
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
SIGNAL_WAIT = 60.0
"""Seconds of one wait for the stop signals (each wait ends early on SIGHUP too)."""
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


def _reload(router: Router, hooks: HookCheck) -> None:
    """SIGHUP: re-read the routes; on failure the old ones stay. One log line either way.
    Then Postfix's hooks are checked again, in a thread (hookcheck.py)."""
    try:
        routes = router.reload()
    except PostfixConfigError as exc:
        log.error("SIGHUP: reload failed, keeping the old routes: %s", exc)
    except Exception:  # a handler in the main thread must never end the process
        log.exception("SIGHUP: reload failed, keeping the old routes")
    else:
        log.info("SIGHUP: routes reloaded: %s", routes)
    hooks.start()


async def _close(
    policy_service: PolicyService,
    admin: AdminServer,
    refresher: LoopRefresher,
    catchall: LoopCatchAll | None,
    engine: ProbeEngine,
    shared: SharedGate | None,
) -> None:
    await policy_service.aclose(SHUTDOWN_GRACE)
    await admin.aclose()
    await refresher.aclose()
    if catchall is not None:
        await catchall.aclose()
    if shared is not None:
        await shared.aclose()
    await engine.aclose()


def serve(config: Config) -> int:
    """Run until SIGTERM or SIGINT; returns the exit status.

    The stop signals are blocked in every thread (the mask is set before any thread
    starts), so only one thread takes the first one: libmilter's own signal thread
    (libmilter stops listening, which it notices within about 5 s, and returns), or,
    without a milter, the main thread in ``sigtimedwait``. Then the probes in flight are
    cancelled, so every recipient waiting on one (a libmilter thread, a policy request)
    is answered with the tempfail action within ``SHUTDOWN_GRACE``, and the pooled
    sessions are closed with QUIT within ``SESSION_CLOSE_TIMEOUT``: about 12 s at most
    from signal to exit. A second signal exits at once (``_exit_on_second_signal``)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    loop = ProbeLoop(kind=config.event_loop)
    metrics = Metrics()
    parts = build_policy(config, loop, metrics)
    cache, engine = parts.cache, parts.engine
    hooks = HookCheck(config, metrics)
    signal.signal(signal.SIGHUP, lambda _signum, _frame: _reload(parts.router, hooks))
    longest = answer_time(config)
    if config.socket and longest >= MILTER_COMMAND_TIMEOUT:
        log.warning(
            "CALLAHEAD_PROBE_WAIT + CALLAHEAD_PROBE_TIMEOUT (and the route lookups, with "
            "CALLAHEAD_POSTFIX_CONFIG) allow answers of up to %.0f s: "
            "set Postfix's milter_command_timeout above that (its default is %d s)",
            longest,
            MILTER_COMMAND_TIMEOUT,
        )
    metrics.track_cache_size(cache.__len__)
    metrics_shown = "off"
    if config.metrics_listen is not None:
        host, port = config.metrics_listen
        try:
            metrics_server = metrics.serve(host, port)
        except OSError as exc:
            log.error("cannot serve metrics on %s:%d: %s", host, port, exc)
            return EX_UNAVAILABLE
        metrics_shown = f"{host}:{port}"
        if metrics_server.off_loopback:
            metrics_shown += " (not loopback)"
            log.warning(
                "metrics listen on %s:%d, not a loopback address: any host that reaches it "
                "reads them (primaries, cache size, decision counts); firewall the port or "
                "set CALLAHEAD_METRICS_LISTEN=127.0.0.1:%d",
                host,
                port,
                port,
            )
    if config.cache_file:
        cachefile.load_into(cache, config.cache_file)
    loop.start()
    if parts.shared is not None:
        loop.call_soon(parts.shared.start)
    metrics.probe_loop_up.set_function(lambda: 1.0 if loop.healthy else 0.0)
    tally = DomainTally()  # `callahead report`: per domain, bounded
    meter = start_meter(  # CALLAHEAD_MAILLOG, and the cache that learns from it
        config.maillog, metrics.maillog, build_learner(config, parts, loop, metrics), tally
    )
    judge = Judge(parts.policy, metrics, meter.ledger if meter is not None else None, tally)
    policy_service = PolicyService(
        judge,
        metrics,
        clients=config.policy_clients,
        max_connections=config.policy_max_connections,
        idle_timeout=config.policy_max_idle + IDLE_MARGIN,
    )
    admin = AdminServer(
        cache,
        lambda: Health(loop.healthy, loop.silent_for, engine.primary_states(), config.dry_run),
        metrics.cache_counters,
        config.cache_file,
        parts.shared,
        save=(
            cachefile.SaveAfterChange(cache, config.cache_file).save if config.cache_file else None
        ),
        report=lambda: report_answer(tally, metered=meter is not None),
    )
    monitor = HealthMonitor(lambda: loop.healthy)
    saver: concurrent.futures.Future[None] | None = None
    try:
        if config.policy_listen is not None:
            listen = config.policy_listen
            try:
                loop.run(
                    policy_service.start(listen.kind, listen.host, listen.port, listen.path),
                    timeout=START_TIMEOUT,
                )
            except (OSError, TimeoutError, UnixSocketError) as exc:
                log.error("cannot serve policy requests on %s: %s", listen, exc)
                return EX_UNAVAILABLE
        if config.admin_socket:
            try:
                loop.run(admin.start(config.admin_socket), timeout=START_TIMEOUT)
            except (AdminError, TimeoutError) as exc:
                # Mail matters more than the admin commands: serve without them.
                log.error("admin socket off (callahead cache/status will not work): %s", exc)
        if config.socket and not _open_milter(config, judge, metrics):
            return EX_UNAVAILABLE
        if config.cache_file:
            saver = loop.submit(
                cachefile.save_every(cache, config.cache_file, config.cache_save_interval)
            )
        monitor.start()
        log.info(
            "callahead listening: milter %s, policy service %s; routes: %s; metrics: %s; "
            "shared cache: %s; event loop: %s",
            config.socket or "off",
            config.policy_listen or "off",
            parts.router.describe(),
            metrics_shown,
            parts.shared.store.shown if parts.shared is not None else "off",
            loop.implementation,
        )
        if config.dry_run:
            log.warning("CALLAHEAD_DRY_RUN=yes: recipients are judged and logged, never refused")
        # Does Postfix name callahead where it listens? postconf takes ~0.1 s a call: read
        # in a thread, so READY=1 does not wait for it (hookcheck.py).
        hooks.start()
        threading.Thread(
            target=_exit_on_second_signal, name="callahead-signals", daemon=True
        ).start()
        if config.socket:
            return _run_milter(config)
        notify("READY=1")
        signum = _wait_for_stop()
        log.info("stop signal (%s)", signal.Signals(signum).name)
        return 0
    finally:
        notify("STOPPING=1")
        log.info("callahead stopping")
        left = parts.prober.stop(SHUTDOWN_GRACE)
        if left:
            log.warning("%d recipient(s) still waiting on a probe at exit", left)
        monitor.stop()
        if meter is not None:
            meter.stop()
        if saver is not None:
            saver.cancel()
        try:
            loop.run(
                _close(
                    policy_service, admin, parts.refresher, parts.catchall, engine, parts.shared
                ),
                timeout=SHUTDOWN_GRACE + SESSION_CLOSE_TIMEOUT,
            )
        except TimeoutError:
            log.warning("probe sessions did not close in time")
        loop.stop()
        if config.cache_file:
            cachefile.save_from(cache, config.cache_file)
        log.info("callahead stopped")


def _wait_for_stop() -> int:
    """The first stop signal, taken in the main thread (no milter). Not ``sigwait``:
    glibc's restarts itself when SIGHUP's handler interrupts it, so the handler (which
    Python runs only once the call returns) would wait for the stop; Python's
    ``sigtimedwait`` returns on the interruption and runs the handler at once."""
    while True:
        taken = signal.sigtimedwait(STOP_SIGNALS, SIGNAL_WAIT)
        if taken is not None:
            return taken.si_signo


def _open_milter(config: Config, judge: Judge, metrics: Metrics) -> bool:
    """Register the milter and bind and listen on its socket (``open_milter``), so that
    READY=1, sent once every socket is up, means that Postfix's connection is taken:
    libmilter's loop (``_run_milter``) then accepts what was queued meanwhile. False
    (logged) when the socket cannot be opened."""
    Milter.factory = lambda: CallaheadMilter(judge, metrics)
    # callahead changes nothing in a message; it only asks for its macros and replies.
    Milter.set_flags(Milter.SETSYMLIST)
    try:
        open_milter("callahead", config.milter_socket, MILTER_TIMEOUT)
    except MilterStartError as exc:
        log.error("cannot serve the milter on %s: %s", config.socket, exc)
        return False
    return True


def _run_milter(config: Config) -> int:
    """libmilter's loop on the open socket until the first stop signal, in a thread of
    its own (see the module doc); the main thread waits in ``join``, where SIGHUP
    handlers run."""
    raised: list[BaseException] = []

    def run() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            run_milter()
        except BaseException as exc:  # noqa: BLE001 (handed to the main thread)
            raised.append(exc)

    thread = threading.Thread(target=run, name="callahead-milter")
    thread.start()
    notify("READY=1")
    thread.join()
    if raised and isinstance(raised[0], MilterStartError):
        log.error("milter stopped: %s (socket %s)", raised[0], config.socket)
        return EX_UNAVAILABLE
    if raised:
        raise raised[0]
    return 0
