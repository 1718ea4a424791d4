"""The pymilter adapter: what Postfix hands over in, a reply and a return code out.

Only the recipient callback does work. ``data`` is implemented because without it
Postfix's DATA macros get no reply over TCP and every message stalls on a delayed ACK
(44 ms measured); it answers ACCEPT, so the end of the message is never sent to us.
Every other optional callback is negotiated away.

Connections: libmilter has no cap of its own. Debian's is built with its pool of workers:
one thread polls the idle connections and a worker thread runs only while a command is
handled, so an open connection costs a file descriptor (a build without the pool makes
a thread per connection). Those that negotiate are counted (``MilterConnections``); one
beyond the cap fails its negotiation, so libmilter closes it at once, and Postfix
applies ``milter_default_action`` (accept, in the README's settings) to that SMTP
session, as it does when callahead is down. A connection that never negotiates calls no
Python code at all: libmilter drops it once idle past its timeout (it looks every 600 s),
and only who may connect (the unix socket's group) bounds those.
"""

from __future__ import annotations

import logging
import re
import resource
import threading
import time

import Milter

from ..base.address import external_form, internal_form
from .judge import Judge
from .maillog.ledger import Held
from .metrics import Metrics

log = logging.getLogger("callahead.adapter")


_warned_no_client = threading.Event()

RCPT_MACROS = "i {client_addr}"
"""The Postfix queue id and the client address, for the decision log line."""

MAX_ARGUMENT = 2048
"""Characters of an RCPT argument that are read as Postfix reads them, at most: Postfix's
default ``line_length_limit`` (2048) bounds the whole command line it reads, so a longer
argument comes from a raised limit or from a client speaking to the milter directly.
RFC 5321 4.5.3.1.3 allows a path of 256 octets, and no probe carries an address over
500 (``MAX_ADDRESS_OCTETS``)."""
_SOURCE_ROUTE = re.compile(r'@[^:,<>@"\s]*(?:,@[^:,<>@"\s]*)*:')
"""The source route (RFC 5321 4.1.2's A-d-l, ``@a,@b:``) before a mailbox."""


MAX_CONNECTIONS = 1000
"""Milter connections at once, at most (ten times Postfix's default smtpd process
limit); and at most half the descriptors the process may open."""
REFUSAL_LOG_INTERVAL = 60.0
"""Seconds between two log lines about connections over the cap."""


class MilterConnections:
    """The milter connections that negotiated and are not closed yet, counted across
    libmilter's threads, against a cap."""

    def __init__(self, limit: int | None = None) -> None:
        """``limit`` None: ``default_limit()``, read when the first connection comes."""
        self._limit = limit
        self._open = 0
        self._lock = threading.Lock()
        self._refused = 0
        self._logged = -REFUSAL_LOG_INTERVAL

    @property
    def open(self) -> int:
        return self._open

    @property
    def limit(self) -> int:
        if self._limit is None:
            self._limit = default_limit()
        return self._limit

    def take(self) -> bool:
        """Count a new connection; False (not counted) when the cap is reached."""
        with self._lock:
            if self._open >= self.limit:
                self._refused += 1
                return False
            self._open += 1
            return True

    def give_back(self) -> None:
        with self._lock:
            self._open -= 1

    def refusals_to_log(self) -> int:
        """How many connections were refused since the last log line, when a line is
        due (at most one every ``REFUSAL_LOG_INTERVAL``); else 0."""
        with self._lock:
            now = time.monotonic()
            if not self._refused or now - self._logged < REFUSAL_LOG_INTERVAL:
                return 0
            self._logged = now
            refused, self._refused = self._refused, 0
            return refused


def default_limit() -> int:
    """``MAX_CONNECTIONS``, or half the file descriptors the process may open if fewer
    (1024 without the unit's ``LimitNOFILE``): the other half is for the policy service,
    the probe sessions and the rest."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(1, min(MAX_CONNECTIONS, soft // 2))


CONNECTIONS = MilterConnections()
"""What every ``CallaheadMilter`` counts itself in, unless it is given its own."""


def milter_recipient(to: str) -> str:
    """The mailbox Postfix relays to, from the RCPT argument it hands a milter as the
    client wrote it: ``<mailbox>`` without extra or unbalanced brackets, blanks or a
    source route. ``bob@x>``, ``<<bob@x>>`` and ``< bob@x >`` are all ``<bob@x>`` to
    Postfix (and to its policy service); judged as written, the domain was ``x>``
    (unrouted, accepted unprobed) or the local part `` bob`` (unsendable), so an
    unknown user got past verification. ``<@a,@b:u@x>`` is ``<u@x>``: Postfix relays to
    the mailbox alone (RFC 5321 C lets it ignore the route); judged with its route,
    each route prefix was a new address (a cache miss, a fresh probe of a cached user),
    and the probe carried the route to a primary that may refuse it (``501 5.1.3``: a
    reject). A quoted local part starts with ``"``, so nothing of it is taken off.
    Blanks and RFC 822 comments outside a quoted string go as well: Postfix reads
    ``<a @x>`` and ``<a(note)@x>`` as ``a@x`` (judged as written: unsendable, the
    tempfail action without a probe). Last, the local part is written as Postfix writes
    it when it relays (and as the policy service quotes back what it is told): quoted
    only where it is not a dot-atom. ``<@x>`` is ``<""@x>``, ``<a:b@x>`` is
    ``<"a:b"@x>``, ``<"ab"@x>`` is ``<ab@x>``; judged as written, the primary was asked
    about another spelling than the one mail goes to (``a:b@x`` drew a syntax error: a
    tempfail, the unknown user accepted)."""
    written = _path(to)
    if len(written) > MAX_ARGUMENT:
        # Garbage: judged as written, never cut (a cut could leave a short address that
        # is someone else's). Over 500 characters, it can be neither cached nor probed:
        # the tempfail action if its domain is routed, skipped if not; never a reject.
        return f"<{written}>"
    address = _without_blanks_and_comments(written)
    if address is None:
        return f"<{written}>"  # refused by Postfix before a milter hears of it
    route = _SOURCE_ROUTE.match(address)
    if route is not None:
        address = address[route.end() :]
    return f"<{external_form(internal_form(address))}>"


def _path(to: str) -> str:
    """The RCPT argument inside however many leading blanks and ``<`` and trailing blanks
    and ``>`` Postfix forgives; a blank is what ``str.isspace`` says (as ``\\s`` in a
    regular expression). Linear: the expression ``[\\s<]*(.*?)[\\s>]*`` it replaces took
    quadratic time over a run of blanks or ``>`` inside the argument (17 s for 60 KB,
    the probe loop and the policy service stalled with it)."""
    start, end = 0, len(to)
    while start < end and (to[start] == "<" or to[start].isspace()):
        start += 1
    while end > start and (to[end - 1] == ">" or to[end - 1].isspace()):
        end -= 1
    return to[start:end]


def _without_blanks_and_comments(address: str) -> str | None:
    """``address`` as Postfix's RFC 822 tokenizer reads it outside quoted strings: no
    blanks, no ``(comments)``, and a backslash-escaped character as itself (``a\\b``
    is ``ab``), and a tab inside a quoted string as a space (``"a<TAB>b"`` reaches the
    policy service and the primary as ``"a b"``); None if a quote, a comment or an
    escape is left open (Postfix refuses those)."""
    out: list[str] = []
    quoted = False
    depth = 0
    escaped = False
    for char in address:
        if escaped:
            escaped = False
            if depth == 0:
                out.append(char)
        elif char == "\\":
            escaped = True
            if quoted:
                out.append(char)
        elif quoted:
            quoted = char != '"'
            out.append(" " if char == "\t" else char)
        elif char == "(":
            depth += 1
        elif depth:
            depth -= char == ")"
        elif char == '"':
            quoted = True
            out.append(char)
        elif char not in " \t":
            out.append(char)
    if quoted or depth or escaped:
        return None
    return "".join(out)


class CallaheadMilter(Milter.Base):  # type: ignore[misc]
    """One instance per SMTP connection, created by libmilter's negotiate callback."""

    def __init__(
        self, judge: Judge, metrics: Metrics, connections: MilterConnections | None = None
    ) -> None:
        self._judge = judge
        self._metrics = metrics
        self._connections = connections if connections is not None else CONNECTIONS
        self._counted = False
        self._held = Held(judge.ledger)

    def negotiate(self, opts: list[int]) -> int:
        """Ask only for the RCPT stage, with only the macros we log; or, beyond the
        connection cap, fail (TEMPFAIL), so that libmilter closes the connection at once.

        pymilter's own negotiate (and so its ``@symlist``) hands libmilter the macro list
        as bytes, which raises under Python 3; it then answers ALL_OPTS, and Postfix
        would call every callback for every message. This does the same negotiation
        with the list as text, and keeps the skipped callbacks skipped even when the
        MTA cannot set macro lists."""
        if not self._connections.take():
            self._over_the_cap()
            return int(Milter.TEMPFAIL)
        self._counted = True
        self._metrics.milter_connections.inc()
        self._actions, offered, _, _ = opts
        if self._actions & Milter.SETSYMLIST:
            try:
                self._ctx.setsymlist(Milter.M_ENVRCPT, RCPT_MACROS)
            except (TypeError, ValueError, Milter.milter.error) as exc:
                log.warning("cannot ask the MTA for the macros %s: %s", RCPT_MACROS, exc)
        opts[1] = self._protocol = offered & ~self.protocol_mask()
        opts[2] = opts[3] = 0
        return int(Milter.CONTINUE)

    def envrcpt(self, to: str, *params: str) -> int:
        queue_id = self.getsymval("i") or "NOQUEUE"
        client: str | None = self.getsymval("{client_addr}")
        if not client and self._judge.policy.guard_enabled:
            self._no_client_address()
        decision = self._judge.judge(milter_recipient(to), client, queue_id)
        self._held.note(decision, queue_id)
        reply = decision.reply
        if reply is None:
            # Valid, undecided-and-accepting, or not ours: let Postfix go on. Never
            # ACCEPT, which would skip the checks of the recipients that follow.
            return int(Milter.CONTINUE)
        self.setreply(reply.code, reply.xcode, reply.text)
        return int(Milter.REJECT if reply.permanent else Milter.TEMPFAIL)

    def close(self) -> int:
        """The connection ended (libmilter calls this once for every connection)."""
        self._held.clear()
        if self._counted:
            self._counted = False
            self._connections.give_back()
            self._metrics.milter_connections.dec()
        return int(Milter.CONTINUE)

    def _over_the_cap(self) -> None:
        self._metrics.milter_refused.inc()
        refused = self._connections.refusals_to_log()
        if refused:
            log.warning(
                "%d milter connection(s) refused: %d open, the most allowed; Postfix "
                "applies milter_default_action to their sessions (logged at most every "
                "%gs)",
                refused,
                self._connections.open,
                REFUSAL_LOG_INTERVAL,
            )

    def _no_client_address(self) -> None:
        """Postfix sent no ``{client_addr}``: the guard cannot count this client. Say so
        once, and count every such recipient."""
        self._metrics.client_address_missing.inc()
        if not _warned_no_client.is_set():
            _warned_no_client.set()
            log.warning(
                "the MTA sends no {client_addr} macro at RCPT TO: the dictionary-attack "
                "guard (CALLAHEAD_CLIENT_UNKNOWN_LIMIT) cannot count clients and is off in "
                "effect; add {client_addr} to milter_rcpt_macros in main.cf"
            )

    def data(self) -> int:
        # Every recipient has been judged by the time the client says DATA, so ACCEPT:
        # it tells Postfix this milter wants nothing more of this message, which saves
        # the end-of-message round trip (measured: 0.65 -> 0.73 of plain Postfix's
        # messages per second). Answering at all avoids the 44 ms delayed-ACK stall.
        # The queue id (Postfix's default milter_data_macros) is known by now: the
        # recipients accepted before it was go to the backscatter meter's ledger.
        self._held.bind(self.getsymval("i"))
        return int(Milter.ACCEPT)

    def abort(self) -> int:
        """The transaction ended without a message (RSET, a new MAIL, a lost client)."""
        self._held.clear()
        return int(Milter.CONTINUE)

    def eom(self) -> int:
        return int(Milter.CONTINUE)
