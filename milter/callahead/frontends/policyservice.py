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
disconnected at once. Bounds: at most ``max_connections`` connections (a new one beyond
is disconnected at once, the open ones are served on), ``MAX_REQUEST`` bytes buffered
per connection, and a connection idle longer than Postfix keeps its own
(``smtpd_policy_service_max_idle``) is closed. Refused connections are counted by
reason and logged at most once a minute per reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..base.address import external_form
from ..base.errors import CallaheadError
from ..base.logfmt import escape
from ..core.policy import RECIPIENT_REJECTED, Decision
from .judge import Judge
from .metrics import Metrics
from .unixsocket import BoundSocket, bind_unix

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

log = logging.getLogger("callahead.policyservice")

MAX_REQUEST = 16 * 1024
"""Bytes of one request, at most, its lines and the empty lines before it together
(Postfix's are under 2 KiB). Also the reader's buffer limit, so a connection holds
little more than this however it sends."""
MAX_LINE = MAX_REQUEST
"""Bytes of one attribute line, at most."""
MAX_ATTRIBUTES = 256
"""Attributes of one request, at most (Postfix 3.7 sends about 30)."""
IDLE_MARGIN = 5.0
"""Seconds past Postfix's ``smtpd_policy_service_max_idle`` before an idle connection is
closed: Postfix closes its own first. Closing one it still holds costs its next request
a reconnection after ``smtpd_policy_service_try_delay`` (1 s)."""
IDLE_TIMEOUT = 300.0 + IDLE_MARGIN
"""Seconds a connection may wait for its next request, by default."""
REQUEST_TIMEOUT = 30.0
"""Seconds for the rest of a request once its first line came."""
MAX_CONNECTIONS = 200
"""Connections open at once, by default (``CALLAHEAD_POLICY_MAX_CONNECTIONS``)."""
LOOPBACK: tuple[Network, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)
REFUSAL_LOG_INTERVAL = 60.0
"""Seconds between two log lines about refused connections of one reason."""
DUNNO = "DUNNO"


class RequestError(CallaheadError):
    """A request that cannot be Postfix's: the connection is closed."""


@dataclass(frozen=True, slots=True)
class PolicyRequest:
    attributes: Mapping[str, str]
    malformed: int = 0
    """Lines that were not ``name=value``."""

    def get(self, name: str) -> str:
        return self.attributes.get(name, "")


def action_for(decision: Decision) -> str:
    """The ``action=`` value for a decision: ``DUNNO`` (no opinion) or the reply."""
    reply = decision.reply
    if reply is None:
        return DUNNO
    # Postfix writes "<rcpt>: Recipient address rejected: " before the text itself.
    return f"{reply.code} {reply.xcode} {reply.text.removeprefix(RECIPIENT_REJECTED)}"


class RequestReader:
    """Reads the requests of one connection.

    Postfix writes a whole request at once, so one ``read`` usually brings it all; the
    request is then cut out of the buffer and split into lines by ``bytes`` methods (a
    ``readline`` per attribute cost about a third of the warm path's CPU). A request
    ends at its first empty line (``\\n\\n``, or ``\\n\\r\\n`` from a client that ends its
    lines with CRLF); empty lines before it are skipped but count against
    ``MAX_REQUEST``. Deadlines: ``idle_timeout`` while nothing of the next request has
    come, then ``REQUEST_TIMEOUT`` for the rest of it."""

    def __init__(self, reader: asyncio.StreamReader, idle_timeout: float = IDLE_TIMEOUT) -> None:
        self._reader = reader
        self._idle_timeout = idle_timeout
        self._buffer = b""
        self._skipped = 0
        """Bytes of empty lines skipped before the next request."""

    async def next(self) -> PolicyRequest | None:
        """The next request, or None when the client closed (or stayed silent for the
        idle timeout) between requests."""
        deadline: float | None = None
        loop = asyncio.get_running_loop()
        while True:
            request = self._take()
            if request is not None:
                return request
            if self._buffer and deadline is None:
                deadline = loop.time() + REQUEST_TIMEOUT
            try:
                if deadline is None:
                    async with asyncio.timeout(self._idle_timeout):
                        data = await self._reader.read(MAX_REQUEST)
                else:
                    async with asyncio.timeout_at(deadline):
                        data = await self._reader.read(MAX_REQUEST)
            except TimeoutError:
                if not self._buffer:
                    return None
                raise RequestError("the request was not finished in time") from None
            if not data:
                if not self._buffer:
                    return None
                if not self._buffer.endswith(b"\n"):
                    raise RequestError("the connection closed inside a line")
                raise RequestError("the connection closed inside a request")
            self._buffer += data

    def _take(self) -> PolicyRequest | None:
        """A complete request cut from the buffer, if there is one."""
        buffer = self._buffer
        skip = 0  # empty lines before the request, cut once (not a copy per line)
        while True:
            if buffer.startswith(b"\n", skip):
                skip += 1
            elif buffer.startswith(b"\r\n", skip):
                skip += 2
            else:
                break
        if skip:
            self._skipped += skip
            buffer = self._buffer = buffer[skip:]
        end, size = buffer.find(b"\n\n"), 2
        crlf = buffer.find(b"\n\r\n")
        if crlf >= 0 and (end < 0 or crlf < end):
            end, size = crlf, 3
        size += end
        if end < 0:
            if self._skipped + len(buffer) > MAX_REQUEST:
                raise RequestError(f"a request longer than {MAX_REQUEST} bytes")
            return None
        if self._skipped + size > MAX_REQUEST:
            raise RequestError(f"a request longer than {MAX_REQUEST} bytes")
        self._buffer = buffer[size:]
        self._skipped = 0
        # One decode for the whole request: bytes that are not UTF-8 stay as surrogates
        # (a recipient is judged bad_address, not mistaken for another).
        text = buffer[:end].decode("utf-8", "surrogateescape")
        if "\r" in text:
            text = text.replace("\r\n", "\n").removesuffix("\r")
        lines = text.split("\n")
        if len(lines) > MAX_ATTRIBUTES:
            raise RequestError(f"more than {MAX_ATTRIBUTES} attributes")
        try:  # every line name=value, as Postfix writes them: built in C
            attributes = dict(line.split("=", 1) for line in lines)
        except ValueError:  # a line without "="
            attributes = {"": ""}
        if "" not in attributes:
            return PolicyRequest(attributes, 0)
        attributes = {}
        malformed = 0
        for line in lines:
            name, sep, value = line.partition("=")
            if sep and name:
                attributes[name] = value
            else:
                malformed += 1
        return PolicyRequest(attributes, malformed)


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
    ) -> None:
        """``clients``: the networks an ``inet`` client must be in (a unix socket's
        are the filesystem's business); ``idle_timeout``: seconds a connection may wait
        between two requests."""
        self._judge = judge
        self._metrics = metrics
        self._clients = tuple(clients)
        self._max_connections = max_connections
        self._idle_timeout = idle_timeout
        self._servers: list[asyncio.Server] = []
        self._bound: BoundSocket | None = None
        self._connections: set[asyncio.StreamWriter] = set()
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
            writer.close()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        if self._bound is not None:
            self._bound.remove()  # only if it is still the socket this process bound
            self._bound = None

    def _refusal(self, writer: asyncio.StreamWriter) -> str | None:
        """Why a new connection is refused (``client``, ``limit``), or None."""
        peer = writer.get_extra_info("peername")
        if isinstance(peer, tuple) and not _allowed(peer[0], self._clients):
            return "client"
        if len(self._connections) >= self._max_connections:
            return "limit"
        return None

    def _refuse(self, writer: asyncio.StreamWriter, reason: str) -> None:
        writer.close()
        self._metrics.policy_refused.labels(reason).inc()
        now = time.monotonic()
        logged, since = self._refusals.get(reason, (-REFUSAL_LOG_INTERVAL, 0))
        if now - logged < REFUSAL_LOG_INTERVAL:
            self._refusals[reason] = (logged, since + 1)
            return
        self._refusals[reason] = (now, 0)
        more = f" ({since} more refused since the last line)" if since else ""
        if reason == "client":
            log.warning(
                "policy client %s is not in CALLAHEAD_POLICY_CLIENTS: disconnected%s",
                _peer(writer),
                more,
            )
        else:
            log.warning(
                "policy client %s: %d connections open, CALLAHEAD_POLICY_MAX_CONNECTIONS: "
                "disconnected (Postfix falls back to smtpd_policy_service_default_action)%s",
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
        self._metrics.policy_connections.inc()
        requests = RequestReader(reader, self._idle_timeout)
        try:
            while True:
                try:
                    request = await requests.next()
                except RequestError as exc:
                    self._metrics.policy_bad_requests.inc()
                    log.warning("policy client %s: %s: closing", _peer(writer), exc)
                    return
                if request is None:
                    return
                self._busy += 1
                try:
                    action = await self.answer(request)
                    writer.write(b"action=" + action.encode("utf-8", "replace") + b"\n\n")
                    await writer.drain()
                finally:
                    self._busy -= 1
                    if self._drained is not None and not self._busy:
                        self._drained.set()
        except ConnectionError:
            pass
        finally:
            self._metrics.policy_connections.dec()
            self._connections.discard(writer)
            writer.close()

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
        if state != "RCPT":
            return DUNNO
        client = request.get("client_address") or None
        queue_id = request.get("queue_id") or "NOQUEUE"
        # Postfix hands a policy service the recipient in its internal form, a quoted
        # local part unquoted ("a b"@x as a b@x); quoted back, it is the mailbox the
        # client named, the one the milter sees and the primary is asked about.
        recipient = external_form(request.get("recipient"))
        decision = await self._judge.judge_async(recipient, client, queue_id)
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
