"""Tell the service manager how callahead is doing: readiness, stopping, and a
watchdog that pings only while the probe loop's heartbeat is alive.

The sd_notify protocol is one datagram to the unix socket named by ``NOTIFY_SOCKET``
(``@name`` for the abstract namespace); without that variable nothing is sent. With the
unit's ``WatchdogSec=``, systemd sets ``WATCHDOG_USEC`` and restarts callahead when the
pings stop: a probe loop that is stuck (every recipient would wait the whole handoff
time) stops the pings, and a restart brings it back.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping

from ..base.logfmt import escape

log = logging.getLogger("callahead.watchdog")

DEFAULT_CHECK_INTERVAL = 1.0
"""Seconds between health checks when systemd asks for no watchdog."""


def notify(state: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (``READY=1``, ``WATCHDOG=1``, ``STOPPING=1``...) to the service
    manager; False when there is none or the socket cannot be reached."""
    address = (os.environ if env is None else env).get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("cannot notify the service manager at %s: %s", escape(address), exc)
        return False
    return True


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Half of systemd's ``WATCHDOG_USEC`` in seconds (pings twice per period), or None
    when no watchdog is asked for (or it is meant for another process)."""
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


class HealthMonitor:
    """A daemon thread that checks ``healthy()`` every interval: pings the watchdog while
    it holds, and logs once when it stops holding and once when it holds again."""

    def __init__(
        self,
        healthy: Callable[[], bool],
        *,
        interval: float | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self._healthy = healthy
        self._env = dict(os.environ if env is None else env)
        ping_every = watchdog_interval(self._env)
        self.pinging = ping_every is not None
        self._interval = interval or ping_every or DEFAULT_CHECK_INTERVAL
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="callahead-watchdog", daemon=True)
        self.up = True

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def check(self) -> bool:
        """One check (the thread's step, callable from tests)."""
        healthy = self._healthy()
        if healthy and self.pinging:
            notify("WATCHDOG=1", self._env)
        if healthy != self.up:
            self.up = healthy
            if healthy:
                log.info("the probe loop answers again")
            else:
                log.error(
                    "the probe loop is not answering: recipients get the tempfail action "
                    "without a probe%s",
                    "; the service manager's watchdog will restart callahead"
                    if self.pinging
                    else "",
                )
        return healthy

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.check()
