"""The thread-and-loop base of the harness's own SMTP servers (``Primary``,
``SilentServer``, ``ScriptedServer``): an asyncio TCP server on 127.0.0.1 running its own
loop in its own thread, so that a test (synchronous, or async on a loop of its own) talks
to it over real sockets.

Why not aiosmtpd's ``Controller``, which runs a server in a thread too: these servers
must count and record every connection, be stopped and started again on the same port
(a primary that restarts), and hang up on every open connection when stopped (a primary
that goes away). ``Controller.start()`` opens a connection of its own and reads the
banner to see that the server is up (one more connection on every count and record, and
a one-second wait on a server scripted to stay silent), and ``Controller.stop()`` closes
its event loop, so that ``start()`` fails afterwards with "Event loop is closed". Working
around both would mean overriding its private methods; this base is shorter.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

from tests.harness.lifecycle import StartStop, forget_at_exit, stop_at_exit
from tests.harness.ports import free_port

__all__ = ["HOST", "ThreadedServer"]

HOST = "127.0.0.1"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


# Servers still running at interpreter exit are stopped, so that no thread keeps a
class ThreadedServer(StartStop):
    """An asyncio TCP server on 127.0.0.1 running in a thread with its own loop."""

    _kind = "server"

    def __init__(self, port: int | None, host: str = HOST) -> None:
        """``host``: 127.0.0.1, or another loopback address (the MX-route tests run
        primaries on port 25 of 127.0.53.x)."""
        self._host = host
        self._port = port if port is not None else free_port(host)
        self._state_lock = threading.Lock()  # start/stop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        # Only touched from the loop thread.
        self._transports: set[asyncio.BaseTransport] = set()
        self._count_lock = threading.Lock()
        self._connections = 0

    # -- properties ----------------------------------------------------------------

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        return (self._host, self._port)

    @property
    def running(self) -> bool:
        return self._thread is not None

    @property
    def connections(self) -> int:
        """TCP sessions accepted so far (over all start/stop cycles)."""
        with self._count_lock:
            return self._connections

    # -- for subclasses ------------------------------------------------------------

    def _make_protocol(self) -> asyncio.BaseProtocol:
        raise NotImplementedError

    def _connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Called by protocols, in the loop thread."""
        self._transports.add(transport)
        with self._count_lock:
            self._connections += 1

    def _connection_lost(self, transport: asyncio.BaseTransport | None) -> None:
        """Called by protocols, in the loop thread."""
        if transport is not None:
            self._transports.discard(transport)

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Listen on ``port``; returns once connections are accepted."""
        with self._state_lock:
            if self._thread is not None:
                raise RuntimeError(f"{self._kind} on port {self._port} is already running")
            loop = asyncio.new_event_loop()
            ready = threading.Event()
            failure: list[BaseException] = []
            thread = threading.Thread(
                target=self._run,
                args=(loop, ready, failure),
                name=f"{self._kind}-{self._port}",
                daemon=True,
            )
            thread.start()
            if not ready.wait(START_TIMEOUT):
                # The loop never came up; nothing else we can do but tell.
                raise RuntimeError(f"{self._kind} on port {self._port} did not start")
            if failure:
                thread.join(STOP_TIMEOUT)
                raise failure[0]
            self._loop = loop
            self._thread = thread
            stop_at_exit(self)

    def _run(
        self,
        loop: asyncio.AbstractEventLoop,
        ready: threading.Event,
        failure: list[BaseException],
    ) -> None:
        asyncio.set_event_loop(loop)
        try:
            try:
                self._server = loop.run_until_complete(
                    loop.create_server(
                        self._make_protocol, self._host, self._port, reuse_address=True
                    )
                )
            except BaseException as exc:  # noqa: BLE001 - handed to start()'s caller
                failure.append(exc)
                return
            finally:
                ready.set()
            loop.run_forever()
        finally:
            self._abort_all()
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            self._server = None
            loop.close()

    def _abort_all(self) -> None:
        for transport in list(self._transports):
            # abort(): drop the connection at once, unsent data and all.
            abort = getattr(transport, "abort", None)
            if callable(abort):
                abort()
            else:
                transport.close()
        self._transports.clear()

    async def _shutdown(self) -> None:
        server = self._server
        if server is not None:
            server.close()
        # Let connections already accepted by the kernel reach connection_made, so
        # that they are aborted too.
        await asyncio.sleep(0)
        self._abort_all()
        await asyncio.sleep(0)

    def stop(self) -> None:
        """Close the listening socket and every open connection. Idempotent."""
        with self._state_lock:
            loop, thread = self._loop, self._thread
            if loop is None or thread is None:
                return
            try:
                if thread.is_alive():
                    future = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
                    try:
                        future.result(STOP_TIMEOUT)
                    finally:
                        loop.call_soon_threadsafe(loop.stop)
                thread.join(STOP_TIMEOUT)
                if thread.is_alive():
                    raise RuntimeError(f"{self._kind} on port {self._port} did not stop")
            finally:
                self._loop = None
                self._thread = None
                forget_at_exit(self)

    def restart(self) -> None:
        self.stop()
        self.start()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<{type(self).__name__} {self._host}:{self._port} {state}>"
