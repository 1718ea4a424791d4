"""``/metrics`` over HTTP: a small event loop of its own, in one thread, with a cap on
connections and a deadline on each.

prometheus-client's own server (``start_http_server``) made a thread per connection,
with no cap and no timeout: 300 half-sent requests held 300 threads for as long as their
senders liked. Here every connection is a coroutine of one loop; a connection has
``timeout`` seconds to send its request and as long again to read the answer, and at
most ``max_connections`` are open. A new one beyond the cap takes the place of the
oldest that has not sent its whole request yet (a scraper sends its request at once,
so a flood of half-sent ones only displaces itself), or is closed when every open one
is being answered. Cut-off connections are logged once a minute with a count.

Not the probe loop: a stalled probe loop must still be seen at ``/metrics``
(``callahead_probe_loop_up`` 0, alert ``CallaheadProbeLoopStalled``). The collectors
run in this thread, as they did in prometheus-client's.

Any ``GET`` (or ``HEAD``) path answers the exposition, as prometheus-client's server
did; the connection is closed after each answer (HTTP/1.0 style, as before).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from ..probing.loop import QuietErrors

log = logging.getLogger("callahead.metrics")

MAX_CONNECTIONS = 16
"""Connections open at once (Prometheus keeps one per scrape, an HA pair two)."""
TIMEOUT = 5.0
"""Seconds for a connection to send its request head, and again to read the answer."""
MAX_HEAD = 8 * 1024
"""Bytes of a request head (request line and header lines), at most."""
MAX_HEADER_LINES = 100
LOG_INTERVAL = 60.0
"""Seconds between two log lines about cut-off connections."""
START_TIMEOUT = 5.0


class MetricsServer:
    """Serves ``registry`` at ``/metrics`` from a thread of its own."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        max_connections: int = MAX_CONNECTIONS,
        timeout: float = TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._registry = registry
        self._max_connections = max_connections
        self._timeout = timeout
        self._clock = clock
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="callahead-metrics", daemon=True)
        self._reading: dict[asyncio.StreamWriter, None] = {}
        """Connections still sending their request, oldest first."""
        self._answering: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self.address: tuple[str, int] = ("", 0)
        """The address and port it listens on (the port the system chose for port 0)."""
        self._cut: dict[str, int] = {}
        """Connections cut off since the last log line, by why."""
        self._logged = -LOG_INTERVAL

    @property
    def connections(self) -> int:
        """Connections open now."""
        return len(self._reading) + len(self._answering)

    @property
    def off_loopback(self) -> bool:
        """It listens where other hosts can reach it (not a loopback address)."""
        try:
            return not ipaddress.ip_address(self.address[0]).is_loopback
        except ValueError:
            return True

    def start(self, host: str, port: int) -> None:
        """Listen on ``host``:``port`` (raises ``OSError``) and serve from now on."""
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(MAX_CONNECTIONS)
        except OSError:
            sock.close()
            raise
        self.address = sock.getsockname()[:2]
        self._loop = loop = asyncio.new_event_loop()
        loop.set_exception_handler(QuietErrors())
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(sock), loop).result(START_TIMEOUT)

    def stop(self) -> None:
        """Close every connection and the listening socket, and end the thread."""
        loop = self._loop
        if loop is None or not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._close(), loop).result(START_TIMEOUT)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(START_TIMEOUT)
        if not self._thread.is_alive():
            loop.close()

    def _run(self) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    async def _listen(self, sock: socket.socket) -> None:
        self._server = await asyncio.start_server(self._serve, sock=sock, limit=MAX_HEAD)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in [*self._reading, *self._answering]:
            writer.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connections >= self._max_connections:
            if not self._reading:
                writer.transport.abort()
                self._note("refused (every open one being answered)")
                return
            oldest = next(iter(self._reading))
            del self._reading[oldest]
            oldest.transport.abort()
            self._note("dropped for a newer one (its request unfinished)")
        self._reading[writer] = None
        try:
            try:
                async with asyncio.timeout(self._timeout):
                    method = await _request_method(reader)
            except TimeoutError:
                self._note(f"cut off (no whole request within {self._timeout:g}s)")
                return
            if method is None or writer not in self._reading:
                return  # closed by the client or dropped above, or not HTTP
            del self._reading[writer]
            self._answering.add(writer)
            writer.write(self._response(method))
            try:
                async with asyncio.timeout(self._timeout):
                    await writer.drain()
            except TimeoutError:
                self._note(f"cut off (the answer not read within {self._timeout:g}s)")
                return
            writer.close()
        except (ConnectionError, ValueError, asyncio.LimitOverrunError):
            pass  # reset by the client, or a line over MAX_HEAD
        finally:
            self._reading.pop(writer, None)
            self._answering.discard(writer)
            if not writer.is_closing():
                writer.transport.abort()

    def _response(self, method: str) -> bytes:
        if method not in ("GET", "HEAD"):
            return _http(405, "Method Not Allowed", b"", "text/plain", "Allow: GET, HEAD\r\n")
        body = generate_latest(self._registry)
        return _http(200, "OK", body, CONTENT_TYPE_LATEST, send_body=method == "GET")

    def _note(self, why: str) -> None:
        """Count a cut-off connection; log the counts at most once a ``LOG_INTERVAL``."""
        self._cut[why] = self._cut.get(why, 0) + 1
        now = self._clock()
        if now - self._logged < LOG_INTERVAL:
            return
        self._logged = now
        counts = ", ".join(f"{n} {why}" for why, n in self._cut.items())
        self._cut.clear()
        log.warning(
            "metrics: connections: %s; at most %d open, logged at most every %gs",
            counts,
            self._max_connections,
            LOG_INTERVAL,
        )


async def _request_method(reader: asyncio.StreamReader) -> str | None:
    """The method of an HTTP request once its whole head came (request line and header
    lines up to the empty line); None when the client closed first or the head is not
    HTTP. Raises ValueError for a line over the reader's limit."""
    line = await reader.readline()
    parts = line.split()
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
        return None
    size = len(line)
    for _ in range(MAX_HEADER_LINES):
        header = await reader.readline()
        size += len(header)
        if not header.endswith(b"\n") or size > MAX_HEAD:
            return None
        if header in (b"\r\n", b"\n"):
            return parts[0].decode("ascii", "replace")
    return None


def _http(
    code: int,
    reason: str,
    body: bytes,
    content_type: str,
    extra: str = "",
    *,
    send_body: bool = True,
) -> bytes:
    head = (
        f"HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n{extra}\r\n"
    )
    return head.encode("ascii") + (body if send_body else b"")
