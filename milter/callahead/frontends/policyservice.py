"""The Postfix policy service front end (SMTPD access policy delegation,
``check_policy_service``), served on the probe loop.

Postfix's smtpd sends a request as ``name=value`` lines ended by an empty line, and
reads one ``action=...`` line and an empty line back; it keeps the connection open for
the next request (up to ``smtpd_policy_service_max_idle`` and ``_max_ttl``), one
connection per smtpd process. For ``protocol_state=RCPT`` the recipient is judged by the
shared core (judge.py); every other state gets ``DUNNO`` (no opinion).

Robustness: a request that is not ``name=value`` lines, or not an access policy
request, gets ``DUNNO`` and a log line; a request over ``MAX_REQUEST`` bytes (or
``MAX_ATTRIBUTES`` attributes) closes the connection (Postfix then retries once, and at
last applies ``smtpd_policy_service_default_action``, DUNNO in the README's settings).
Nothing a client sends can crash the service or get it to answer anything but a
well-formed action.

Exposure: an answer tells which addresses exist, and ``client_address`` (the key of
the dictionary guard) is the requester's word. On ``inet`` only clients of the allowed
networks (``CALLAHEAD_POLICY_CLIENTS``, loopback by default) are served; any other is
disconnected at once. Bounds: at most ``max_connections`` connections, ``MAX_REQUEST``
bytes buffered per connection, a connection idle longer than Postfix keeps its own
(``smtpd_policy_service_max_idle``) is closed, and so is one that reads no answer for
``WRITE_TIMEOUT`` seconds (a client that sends requests and never reads them cannot hold
its connection).

At the cap a new connection takes the place of an open one: the oldest that has not sent
a whole request yet (Postfix's smtpd sends its request as soon as it connects, so a
flood of connections that say nothing only pushes out itself), else the one idle longest
between two requests (the smtpd whose connection it was reconnects for its next
request); never one whose request is being read or answered. Only when every open one
is busy is the new one disconnected. Refused, displaced and stalled connections are
counted and logged at most once a minute per reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import Iterable

from ..base.address import external_form
from ..base.logfmt import escape
from ..core.policy import RECIPIENT_REJECTED, Decision
from .judge import Judge
from .maillog.ledger import Transactions
from .metrics import Metrics
from .policyrequest import MAX_REQUEST, PolicyRequest, RequestError, RequestReader
from .unixsocket import BoundSocket, bind_unix

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

log = logging.getLogger("callahead.policyservice")

IDLE_MARGIN = 5.0
"""Seconds past Postfix's ``smtpd_policy_service_max_idle`` before an idle connection is
closed: Postfix closes its own first. Closing one it still holds costs its next request
a reconnection after ``smtpd_policy_service_try_delay`` (1 s)."""
IDLE_TIMEOUT = 300.0 + IDLE_MARGIN
"""Seconds a connection may wait for its next request, by default."""
WRITE_TIMEOUT = 10.0
"""Seconds an answer may wait for the client to read (only once the socket's buffers
are full: an answer is about 20 bytes, and Postfix reads each one at once)."""
MAX_CONNECTIONS = 200
"""Connections open at once, by default (``CALLAHEAD_POLICY_MAX_CONNECTIONS``)."""
LOOPBACK: tuple[Network, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)
REFUSAL_LOG_INTERVAL = 60.0
"""Seconds between two log lines about refused connections of one reason."""
DUNNO = "DUNNO"


def action_for(decision: Decision) -> str:
    """The ``action=`` value for a decision: ``DUNNO`` (no opinion) or the reply."""
    reply = decision.reply
    if reply is None:
        return DUNNO
    # Postfix writes "<rcpt>: Recipient address rejected: " before the text itself.
    return f"{reply.code} {reply.xcode} {reply.text.removeprefix(RECIPIENT_REJECTED)}"


class PolicyService:
    """Serves policy requests on the probe loop; one coroutine per connection."""

    def __init__(
        self,
        judge: Judge,
        metrics: Metrics,
        *,
        clients: Iterable[Network] = LOOPBACK,
        max_connections: int = MAX_CONNECTIONS,
        idle_timeout: float = IDLE_TIMEOUT,
        write_timeout: float = WRITE_TIMEOUT,
    ) -> None:
        """``clients``: the networks an ``inet`` client must be in (a unix socket's
        are the filesystem's business); ``idle_timeout``: seconds a connection may wait
        between two requests; ``write_timeout``: seconds an answer may wait to be read."""
        self._judge = judge
        self._metrics = metrics
        self._clients = tuple(clients)
        self._max_connections = max_connections
        self._idle_timeout = idle_timeout
        self._write_timeout = write_timeout
        self._servers: list[asyncio.Server] = []
        self._bound: BoundSocket | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        self._silent: dict[asyncio.StreamWriter, None] = {}
        """Open connections that have not sent a whole request yet, oldest first."""
        self._idle: dict[asyncio.StreamWriter, RequestReader] = {}
        """Answered connections waiting for their next request, idle longest first (one
        met with part of its next request read is mid-request: taken out)."""
        self._displaced: dict[str, int] = {}
        """Displaced connections since the last log line, by what they were."""
        self._busy = 0
        """Requests being answered now."""
        self._drained: asyncio.Event | None = None
        """Set when the last request being answered is done, once ``aclose`` waits."""
        self._state_counters = {
            state: metrics.policy_requests.labels(label)
            for state, label in [*_STATES.items(), ("", "other")]
        }
        self._other_state = self._state_counters[""]
        self._refusals: dict[str, tuple[float, int]] = {}
        """Reason -> (when its last log line was written, refusals since then)."""
        self._transactions = Transactions(judge.ledger)
        """What was accepted, for the backscatter meter (``CALLAHEAD_MAILLOG``)."""

    async def start(self, kind: str, host: str, port: int, path: str) -> None:
        """Listen on ``inet`` ``host``:``port`` or ``unix`` ``path``; raises OSError, or
        ``UnixSocketError`` for a path that is not a stale socket."""
        if kind == "unix":
            bound = bind_unix(path)
            try:
                server = await asyncio.start_unix_server(
                    self._serve, sock=bound.sock, limit=MAX_REQUEST
                )
            except OSError:
                bound.sock.close()
                bound.remove()
                raise
            self._bound = bound
        else:
            server = await asyncio.start_server(
                self._serve, host=host, port=port, limit=MAX_REQUEST, reuse_address=True
            )
        self._servers.append(server)

    @property
    def connections(self) -> int:
        return len(self._connections)

    async def aclose(self, grace: float = 2.0) -> None:
        """Stop listening, give the requests being answered up to ``grace`` seconds
        (LoopProber.stop has answered those waiting on a probe), then close every
        connection."""
        for server in self._servers:
            server.close()
        if self._busy:
            self._drained = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self._drained.wait()
        for writer in list(self._connections):
            self._close(writer)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        if self._bound is not None:
            self._bound.remove()  # only if it is still the socket this process bound
            self._bound = None

    def _refusal(self, writer: asyncio.StreamWriter) -> str | None:
        """Why a new connection is refused (``client``, ``limit``), or None; at the cap,
        an open connection is displaced to make room if one can be."""
        peer = writer.get_extra_info("peername")
        if isinstance(peer, tuple) and not _allowed(peer[0], self._clients):
            return "client"
        if len(self._connections) >= self._max_connections and not self._displace():
            return "limit"
        return None

    def _displace(self) -> bool:
        """Close the oldest connection that has not sent a whole request, else the one
        idle longest between requests; False when every open one is busy."""
        victim, kind = next(iter(self._silent), None), "that never sent a request"
        while victim is None and self._idle:
            waiting, requests = next(iter(self._idle.items()))
            del self._idle[waiting]
            if not requests.pending:
                victim, kind = waiting, "idle between requests"
        if victim is None:
            return False
        self._forget(victim)
        victim.transport.abort()
        self._metrics.policy_displaced.inc()
        self._displaced[kind] = self._displaced.get(kind, 0) + 1
        if self._more("displaced") is not None:  # the counts by kind say how many
            counts = ", ".join(f"{n} {what}" for what, n in self._displaced.items())
            self._displaced.clear()
            log.warning(
                "policy connections: %d open, CALLAHEAD_POLICY_MAX_CONNECTIONS: closed to "
                "make room for newer ones: %s (logged at most every %gs)",
                self._max_connections,
                counts,
                REFUSAL_LOG_INTERVAL,
            )
        return True

    def _forget(self, writer: asyncio.StreamWriter) -> None:
        self._connections.discard(writer)
        self._silent.pop(writer, None)
        self._idle.pop(writer, None)
        self._metrics.policy_connections.dec()

    def _more(self, reason: str, what: str = "refused") -> str | None:
        """None when a line of ``reason`` was logged within ``REFUSAL_LOG_INTERVAL``
        (this one is counted for the next line); else what the next line adds: how many
        went unlogged since the last one."""
        now = time.monotonic()
        logged, since = self._refusals.get(reason, (-REFUSAL_LOG_INTERVAL, 0))
        if now - logged < REFUSAL_LOG_INTERVAL:
            self._refusals[reason] = (logged, since + 1)
            return None
        self._refusals[reason] = (now, 0)
        return f" ({since} more {what} since the last line)" if since else ""

    def _refuse(self, writer: asyncio.StreamWriter, reason: str) -> None:
        writer.close()
        self._metrics.policy_refused.labels(reason).inc()
        more = self._more(reason)
        if more is None:
            return
        if reason == "client":
            log.warning(
                "policy client %s is not in CALLAHEAD_POLICY_CLIENTS: disconnected%s",
                _peer(writer),
                more,
            )
        else:
            log.warning(
                "policy client %s: %d connections open, CALLAHEAD_POLICY_MAX_CONNECTIONS, "
                "each with a request being read or answered: disconnected (Postfix falls "
                "back to smtpd_policy_service_default_action)%s",
                _peer(writer),
                len(self._connections),
                more,
            )

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reason = self._refusal(writer)
        if reason is not None:
            self._refuse(writer, reason)
            return
        self._connections.add(writer)
        self._silent[writer] = None
        self._metrics.policy_connections.inc()
        requests = RequestReader(reader, self._idle_timeout)
        try:
            while True:
                try:
                    request = await requests.next()
                except RequestError as exc:
                    if writer in self._connections:  # else displaced: cut short by us
                        self._metrics.policy_bad_requests.inc()
                        log.warning("policy client %s: %s: closing", _peer(writer), exc)
                    return
                if request is None or writer not in self._connections:
                    return
                self._silent.pop(writer, None)
                self._idle.pop(writer, None)
                self._busy += 1
                try:
                    action = await self.answer(request)
                    writer.write(b"action=" + action.encode("utf-8", "replace") + b"\n\n")
                    if writer.transport.get_write_buffer_size():
                        # Only an answer the kernel did not take can make drain() wait
                        # (and a timeout costs a timer per request: bench/coldpath.py).
                        try:
                            async with asyncio.timeout(self._write_timeout):
                                await writer.drain()
                        except TimeoutError:
                            self._stalled(writer)
                            return
                    else:
                        await writer.drain()  # raises if the connection was lost
                finally:
                    self._busy -= 1
                    if self._drained is not None and not self._busy:
                        self._drained.set()
                if not requests.pending:
                    self._idle[writer] = requests
        except ConnectionError:
            pass
        finally:
            if writer in self._connections:
                self._forget(writer)
            self._close(writer)

    def _close(self, writer: asyncio.StreamWriter) -> None:
        """Close a connection. ``close`` keeps it open until the answers still buffered
        are read: a client that never reads them loses it ``write_timeout`` later."""
        writer.close()
        transport = writer.transport
        if transport.get_write_buffer_size():
            asyncio.get_running_loop().call_later(self._write_timeout, transport.abort)

    def _stalled(self, writer: asyncio.StreamWriter) -> None:
        """The client read no answer for ``write_timeout`` seconds: drop the connection
        at once (``close`` would wait for the unread answers to be sent, holding it)."""
        writer.transport.abort()
        self._metrics.policy_stalled.inc()
        more = self._more("stalled", "disconnected")
        if more is not None:
            log.warning(
                "policy client %s read no answer for %gs: disconnected%s",
                _peer(writer),
                self._write_timeout,
                more,
            )

    async def answer(self, request: PolicyRequest) -> str:
        """The action for one request."""
        if request.malformed or request.get("request") != "smtpd_access_policy":
            self._metrics.policy_bad_requests.inc()
            log.warning(
                "policy request with %d malformed line(s), request=%s: DUNNO",
                request.malformed,
                escape(request.get("request")[:64]),
            )
            return DUNNO
        state = request.get("protocol_state")
        self._state_counters.get(state, self._other_state).inc()
        queue_id = request.get("queue_id") or "NOQUEUE"
        if state != "RCPT":
            self._transactions.bind(request.get("instance"), queue_id)
            return DUNNO
        client = request.get("client_address") or None
        # Postfix hands a policy service the recipient in its internal form, a quoted
        # local part unquoted ("a b"@x as a b@x); quoted back, it is the mailbox the
        # client named, the one the milter sees and the primary is asked about.
        recipient = external_form(request.get("recipient"))
        decision = await self._judge.judge_async(recipient, client, queue_id)
        self._transactions.note(request.get("instance"), decision, queue_id)
        return action_for(decision)


_STATES = {
    s: s.lower()
    for s in ("CONNECT", "EHLO", "HELO", "MAIL", "RCPT", "DATA", "END-OF-MESSAGE", "VRFY", "ETRN")
}
"""protocol_state values counted by name; anything else is ``other`` (bounded labels)."""


def _allowed(host: object, networks: tuple[Network, ...]) -> bool:
    """Whether a peer's address is in one of ``networks`` (an IPv4-mapped IPv6 peer,
    as a dual-stack listener sees IPv4 clients, by its IPv4 address)."""
    try:
        address = ipaddress.ip_address(str(host))
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        elif address.scope_id:
            address = ipaddress.IPv6Address(str(address).partition("%")[0])
    return any(address in network for network in networks)


def _peer(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"[{escape(str(peer[0]))}]:{peer[1]}"
    return "(unix socket)"
