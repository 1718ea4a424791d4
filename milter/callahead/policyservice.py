"""The Postfix policy service front end (SMTPD access policy delegation,
``check_policy_service``), served on the probe loop.

Postfix's smtpd sends a request as ``name=value`` lines ended by an empty line, and
reads one ``action=...`` line and an empty line back; it keeps the connection open for
the next request (up to ``smtpd_policy_service_max_idle`` and ``_max_ttl``), one
connection per smtpd process. For ``protocol_state=RCPT`` the recipient is judged by the
shared core (judge.py); every other state gets ``DUNNO`` (no opinion).

Robustness: a request that is not ``name=value`` lines, or not an access policy
request, gets ``DUNNO`` and a log line; a line or a request too long to be Postfix's
closes the connection (Postfix then retries, and at last applies
``smtpd_policy_service_default_action``). Nothing a client sends can crash the service
or get it to answer anything but a well-formed action.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import CallaheadError
from .judge import Judge
from .logfmt import escape
from .metrics import Metrics
from .policy import Decision

log = logging.getLogger(__name__)

MAX_LINE = 16 * 1024
"""Bytes of one attribute line, at most (Postfix's are far shorter)."""
MAX_ATTRIBUTES = 256
"""Attributes of one request, at most (Postfix 3.7 sends about 30)."""
IDLE_TIMEOUT = 3600.0
"""Seconds a connection may wait for its next request (Postfix closes its own after
``smtpd_policy_service_max_idle``, 300 s)."""
REQUEST_TIMEOUT = 30.0
"""Seconds for the rest of a request once its first line came."""
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
    return f"{reply.code} {reply.xcode} {reply.text}"


async def read_request(reader: asyncio.StreamReader) -> PolicyRequest | None:
    """The next request, or None when the client closed (or stayed silent for
    ``IDLE_TIMEOUT``) between requests.

    One deadline for the whole request (a timer per line cost a sixth of the warm path's
    CPU): ``IDLE_TIMEOUT`` for its first line, then ``REQUEST_TIMEOUT`` for the rest."""
    attributes: dict[str, str] = {}
    malformed = 0
    first = True
    try:
        async with asyncio.timeout(IDLE_TIMEOUT) as deadline:
            while True:
                raw = await reader.readline()
                if not raw:
                    if first:
                        return None
                    raise RequestError("the connection closed inside a request")
                if not raw.endswith(b"\n"):
                    raise RequestError("the connection closed inside a line")
                line = raw[:-1].removesuffix(b"\r")
                if not line:
                    if first:  # an empty line before any attribute: nothing was asked
                        continue
                    return PolicyRequest(attributes, malformed)
                if first:
                    first = False
                    deadline.reschedule(asyncio.get_running_loop().time() + REQUEST_TIMEOUT)
                name, sep, value = line.partition(b"=")
                if not sep or not name:
                    malformed += 1
                elif len(attributes) >= MAX_ATTRIBUTES:
                    raise RequestError(f"more than {MAX_ATTRIBUTES} attributes")
                else:
                    attributes[name.decode("ascii", "replace")] = value.decode(
                        "utf-8", "surrogateescape"
                    )
    except (ValueError, asyncio.LimitOverrunError):
        raise RequestError(f"a line longer than {MAX_LINE} bytes") from None
    except TimeoutError:
        if first:
            return None
        raise RequestError("the request was not finished in time") from None


class PolicyService:
    """Serves policy requests on the probe loop; one coroutine per connection."""

    def __init__(self, judge: Judge, metrics: Metrics) -> None:
        self._judge = judge
        self._metrics = metrics
        self._servers: list[asyncio.Server] = []
        self._unix_path = ""
        self._connections: set[asyncio.StreamWriter] = set()
        self._busy = 0
        """Requests being answered now."""
        self._answered = asyncio.Condition()

    async def start(self, kind: str, host: str, port: int, path: str) -> None:
        """Listen on ``inet`` ``host``:``port`` or ``unix`` ``path``; raises OSError."""
        if kind == "unix":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            server = await asyncio.start_unix_server(self._serve, path=path, limit=MAX_LINE)
            self._unix_path = path
        else:
            server = await asyncio.start_server(
                self._serve, host=host, port=port, limit=MAX_LINE, reuse_address=True
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
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace), self._answered:
                await self._answered.wait_for(lambda: self._busy == 0)
        for writer in list(self._connections):
            writer.close()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        if self._unix_path:
            with contextlib.suppress(OSError):
                os.unlink(self._unix_path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        self._metrics.policy_connections.inc()
        try:
            while True:
                try:
                    request = await read_request(reader)
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
                    async with self._answered:
                        self._answered.notify_all()
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
        self._metrics.policy_requests.labels(_STATES.get(state, "other")).inc()
        if state != "RCPT":
            return DUNNO
        client = request.get("client_address") or None
        queue_id = request.get("queue_id") or "NOQUEUE"
        decision = await self._judge.judge_async(request.get("recipient"), client, queue_id)
        return action_for(decision)


_STATES = {
    s: s.lower()
    for s in ("CONNECT", "EHLO", "HELO", "MAIL", "RCPT", "DATA", "END-OF-MESSAGE", "VRFY", "ETRN")
}
"""protocol_state values counted by name; anything else is ``other`` (bounded labels)."""


def _peer(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"[{peer[0]}]:{peer[1]}"
    return "(unix socket)"
