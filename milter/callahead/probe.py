"""The SMTP probe dialogue with one primary, on one (reusable) session.

A session connects, reads the banner, says EHLO (HELO if EHLO is refused), upgrades with
STARTTLS when asked to, then opens one transaction with ``MAIL FROM:<sender>`` and asks
``RCPT TO:<address>`` for each probe. Several probes share the transaction: a Postfix
primary takes an inflow token only for a transaction's first accepted recipient, and no
RSET (a "junk" command Postfix limits) is ever needed.

Replies are classified by ``verdict.classify`` (stage, enhanced status code, text). A
rejection that is about the recipient becomes *unknown* only once the same session has
had ``RCPT TO:<postmaster@domain>`` accepted (RFC 5321 4.5.1 requires every domain to
accept it): a primary that refuses even postmaster@ is refusing the prober, and its
rejections prove nothing about the recipient.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass

import aiosmtplib

from .routes import Nexthop
from .verdict import Basis, Classification, Stage, Verdict, classify, unproven

log = logging.getLogger(__name__)

MAX_COMMAND_LINE_OCTETS = 512
"""RFC 5321 4.5.3.1.4: a command line, CRLF included. A server that reads no more than
this could take the rest of a longer line as a command of its own."""
MAX_ADDRESS_OCTETS = MAX_COMMAND_LINE_OCTETS - len(b"RCPT TO:<>\r\n")
"""The longest address a probe puts on the wire (500 octets). The 64-octet local-part
and 256-octet path limits of RFC 5321 4.5.3.1 are not enforced: servers are told not
to, Postfix does not, and refusing them let padded addresses skip verification."""

ERROR_BUDGET = 9
"""4xx/5xx replies a session may collect. A Postfix primary counts every one as an
error, sleeps 1 s before each reply after the 10th and hangs up at the 20th; only a
delivered message resets the count. A session is retired after this many, without
sending it another command."""
MAX_RCPTS_PER_SESSION = 500
"""RCPTs in one session (and transaction); Postfix's smtpd_recipient_limit is 1000."""
QUIT_TIMEOUT = 2.0
"""Seconds a courtesy QUIT may take when a session is retired."""


class Skip(enum.Enum):
    """Why no probe was made at all."""

    OVERLOAD = "overload"
    PRIMARY_DOWN = "primary_down"
    LOOP_STALLED = "loop_stalled"
    """callahead's own probe loop is not answering (see loop.py's heartbeat)."""
    SHUTDOWN = "shutdown"
    """callahead is stopping: probes in flight were cancelled, no new ones start."""


class TlsMode(enum.Enum):
    """Named as Postfix's smtp_tls_security_level names them."""

    NONE = "none"
    MAY = "may"
    ENCRYPT = "encrypt"


class UnsendableAddress(ValueError):
    """An address that no SMTP command may carry; it is never put on the wire."""


POSTMASTER = "postmaster"
"""RFC 5321 4.5.1: every domain must accept mail for postmaster@domain."""


@dataclass(frozen=True, slots=True)
class ProbeResult:
    verdict: Verdict
    stage: Stage
    code: int | None
    """The primary's reply code at ``stage``; None when there was no reply."""
    detail: str
    """The primary's reply text or the error, for logs only, never for the sender."""
    duration: float
    primary: str
    """The nexthop that gave the answer (or the last one tried)."""
    reached: bool = True
    """False for connection-level failures (refused, timeout, 421, disconnect, TLS)."""
    skipped: Skip | None = None
    """Set when no probe was made (``verdict`` is then TEMPFAIL)."""
    basis: Basis = Basis.NO_REPLY
    """Why the reply got its verdict (see verdict.py)."""
    why: str = ""
    """The classification in one sentence, for ``--explain`` and the logs."""
    transcript: tuple[str, ...] = ()
    """The session's SMTP dialogue (``C: ...``/``S: ...``), when it was recorded."""

    @classmethod
    def not_probed(cls, skip: Skip | None, hops: Sequence[Nexthop], detail: str) -> ProbeResult:
        """Undecided without a probe (``skip`` says why; None: the probe was abandoned)."""
        primary = str(hops[0]) if hops else ""
        return cls(Verdict.TEMPFAIL, Stage.CONNECT, None, detail, 0.0, primary, False, skip)


def needs_smtputf8(address: str) -> bool:
    """True when the local part is not ASCII (the domain is sent in A-label form)."""
    return not address.rpartition("@")[0].isascii()


def wire_address(address: str, *, allow_utf8: bool = False) -> bytes:
    """The bytes of ``address`` for a ``<...>`` path, or ``UnsendableAddress``.

    Refuses anything that could end a command early or break the path: control
    characters (CR, LF, NUL…), angle brackets or spaces outside a well-formed quoted
    local part, a non-ASCII domain (send the A-label), a non-ASCII local part unless
    ``allow_utf8`` (SMTPUTF8), and an address too long for one command line."""
    if not address:
        raise UnsendableAddress("empty address")
    if any(ord(c) < 32 or ord(c) == 127 for c in address):
        raise UnsendableAddress("control character in address")
    local, sep, domain = address.rpartition("@")
    if not sep or not local or not domain:
        raise UnsendableAddress("address has no local part or no domain")
    if not domain.isascii():
        raise UnsendableAddress("non-ASCII domain (expected its A-label form)")
    if not local.isascii() and not allow_utf8:
        raise UnsendableAddress("non-ASCII local part needs SMTPUTF8")
    if local.startswith('"'):
        if not _is_quoted_string(local):
            raise UnsendableAddress("malformed quoted local part")
    elif any(c in local for c in '<> "\\'):
        raise UnsendableAddress("unquoted local part holds a forbidden character")
    if any(c in domain for c in '<> "\\'):
        raise UnsendableAddress("forbidden character in domain")
    try:
        raw = address.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from undecodable bytes
        raise UnsendableAddress("address is not valid UTF-8") from None
    if len(raw) > MAX_ADDRESS_OCTETS:
        raise UnsendableAddress("address too long for an SMTP command line")
    return raw


def _is_quoted_string(local: str) -> bool:
    """RFC 5321 Quoted-string: DQUOTE *(qtext / quoted-pair) DQUOTE, nothing after it."""
    if len(local) < 2 or not local.endswith('"'):
        return False
    inner = local[1:-1]
    i = 0
    while i < len(inner):
        c = inner[i]
        if c == "\\":
            i += 2
            if i > len(inner):
                return False
            continue
        if c == '"':
            return False
        i += 1
    return True


class SessionLost(Exception):
    """The session died before the primary answered RCPT TO (closed, 421, reset): the
    probe may be retried on a fresh session."""


class SessionFailed(Exception):
    """Opening the session failed; carries the result to report."""

    def __init__(self, result: ProbeResult) -> None:
        super().__init__(result.detail)
        self.result = result


def unverified_tls_context() -> ssl.SSLContext:
    """Opportunistic TLS, as Postfix's ``may`` and ``encrypt``: encrypt, don't verify."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@dataclass(frozen=True, slots=True)
class SessionSettings:
    helo_name: str
    sender: str
    tls: TlsMode
    tls_context: ssl.SSLContext | None
    transcript: bool = False
    """Record the dialogue (``callahead probe --explain``); off on the hot path."""


class Session:
    """One SMTP connection to one primary, carrying probes one at a time."""

    def __init__(
        self, hop: Nexthop, settings: SessionSettings, *, sender: str | None = None
    ) -> None:
        self.hop = hop
        self._settings = settings
        self.sender = settings.sender if sender is None else sender
        """MAIL FROM of this session's transaction."""
        self._smtp = aiosmtplib.SMTP(
            hostname=hop.host,
            port=hop.port,
            local_hostname=settings.helo_name,
            start_tls=False,
            use_tls=False,
            timeout=None,
        )
        self.created = time.monotonic()
        """Before the connection: the primary's view of its tables is at least this new."""
        self.opened = False
        self.probes = 0
        self.rcpts = 0
        self.errors = 0
        self.last_used = self.created
        self.stage = Stage.CONNECT
        """Where the dialogue is, for reporting a timeout."""
        self.vouched: set[str] = set()
        """Domains whose postmaster@ this session has had accepted."""
        self._transcript: list[str] | None = [] if settings.transcript else None
        self._in_transaction = False
        self._retired = False

    @property
    def alive(self) -> bool:
        return self.opened and self._smtp.is_connected and not self._retired

    @property
    def waiting_at(self) -> Stage:
        """The stage a probe on this session is stuck at, for reporting a timeout."""
        if self.stage is Stage.CONNECT and self._smtp.protocol is not None:
            return Stage.BANNER
        return self.stage

    @property
    def transcript(self) -> tuple[str, ...]:
        return () if self._transcript is None else tuple(self._transcript)

    def _said(self, line: str) -> None:
        if self._transcript is not None:
            self._transcript.append(f"C: {line}")

    def _heard(self, code: int, message: str) -> None:
        if self._transcript is not None:
            lines = message.split("\n") or [""]
            for i, text in enumerate(lines):
                sep = " " if i == len(lines) - 1 else "-"
                self._transcript.append(f"S: {code}{sep}{text}")

    def _note(self, text: str) -> None:
        if self._transcript is not None:
            self._transcript.append(f"-- {text}")

    def timed_out(self, budget: float, started: float) -> ProbeResult:
        """The result of a probe that ran out of time on this session, which is closed."""
        self.close()
        self._note(f"no reply within {budget:.3g}s")
        return ProbeResult(
            Verdict.TEMPFAIL,
            self.waiting_at,
            None,
            f"timed out after {budget:.3g}s",
            time.monotonic() - started,
            str(self.hop),
            reached=False,
            why="no reply in time",
            transcript=self.transcript,
        )

    @property
    def reusable(self) -> bool:
        return self.alive and self.errors < ERROR_BUDGET and self.rcpts < MAX_RCPTS_PER_SESSION

    def _fail(self, stage: Stage, code: int | None, detail: str, started: float) -> SessionFailed:
        reached = code is not None and code != 421
        if code is None:
            self._note(detail)
        found = classify(stage, code, detail)
        return SessionFailed(
            ProbeResult(
                Verdict.TEMPFAIL,
                stage,
                code,
                detail,
                time.monotonic() - started,
                str(self.hop),
                reached=reached,
                basis=found.basis,
                why=found.why,
                transcript=self.transcript,
            )
        )

    async def open(self) -> None:
        """Connect, banner, EHLO/HELO, STARTTLS per the TLS mode. Raises SessionFailed."""
        started = time.monotonic()
        smtp = self._smtp
        stage = Stage.CONNECT
        try:
            try:
                self.stage = Stage.CONNECT
                banner = await smtp.connect()
                self._heard(banner.code, banner.message)
            except aiosmtplib.SMTPConnectResponseError as exc:
                self._heard(exc.code, exc.message)
                raise self._fail(Stage.BANNER, exc.code, exc.message, started) from None
            except (aiosmtplib.SMTPConnectTimeoutError, aiosmtplib.SMTPConnectError) as exc:
                stage = Stage.BANNER if smtp.protocol is not None else Stage.CONNECT
                raise self._fail(stage, None, str(exc), started) from None
            stage = self.stage = Stage.EHLO
            await self._greet(started)
            if self._settings.tls is not TlsMode.NONE:
                stage = self.stage = Stage.STARTTLS
                await self._starttls(started)
        except SessionFailed:
            self.close()
            raise
        except (aiosmtplib.SMTPException, OSError, ssl.SSLError) as exc:
            self.close()
            raise self._fail(stage, None, str(exc) or type(exc).__name__, started) from None
        self.opened = True

    async def _greet(self, started: float) -> None:
        helo = self._settings.helo_name
        self._said(f"EHLO {helo}")
        try:
            reply = await self._smtp.ehlo()
            self._heard(reply.code, reply.message)
        except aiosmtplib.SMTPHeloError as exc:
            self._heard(exc.code, exc.message)
            if exc.code == 421 or not self._smtp.is_connected:
                raise self._fail(Stage.EHLO, exc.code, exc.message, started) from None
            reply = await self._command(b"HELO", helo.encode("ascii"))
            if not 200 <= reply.code < 300:
                raise self._fail(Stage.EHLO, reply.code, reply.message, started) from None

    async def _starttls(self, started: float) -> None:
        smtp = self._smtp
        offered = smtp.supports_extension("starttls")
        if not offered:
            if self._settings.tls is TlsMode.ENCRYPT:
                raise self._fail(Stage.STARTTLS, None, "STARTTLS not offered", started)
            return
        self._said("STARTTLS")
        try:
            reply = await smtp.starttls(
                tls_context=self._settings.tls_context or unverified_tls_context(),
                server_hostname=self.hop.host,
            )
            self._heard(reply.code, reply.message)
        except aiosmtplib.SMTPResponseException as exc:
            self._heard(exc.code, exc.message)
            if self._settings.tls is TlsMode.ENCRYPT or exc.code == 421 or not smtp.is_connected:
                raise self._fail(Stage.STARTTLS, exc.code, exc.message, started) from None
            return  # "may": carry on in plaintext, as Postfix does
        except (ssl.SSLError, OSError, aiosmtplib.SMTPException) as exc:
            # A failed handshake is a connection-level failure of this primary.
            raise self._fail(
                Stage.STARTTLS, None, f"TLS handshake failed: {exc}", started
            ) from None
        self._note("TLS handshake done")
        await self._greet(started)

    async def _command(self, verb: bytes, argument: bytes) -> aiosmtplib.SMTPResponse:
        if self._transcript is not None:
            self._said((verb + b" " + argument).decode("utf-8", "replace"))
        reply = await self._smtp.execute_command(verb, argument)
        self._heard(reply.code, reply.message)
        return reply

    async def rcpt(self, address: str, started: float) -> ProbeResult:
        """Probe one address on this (open) session. Raises SessionLost when the session
        died before the primary answered."""
        smtp = self._smtp
        self.probes += 1
        utf8 = needs_smtputf8(address)
        offers_utf8 = smtp.supports_extension("smtputf8")
        if utf8 and not offers_utf8:
            return self._result(Stage.RCPT, None, "primary does not offer SMTPUTF8", started)
        try:
            rcpt = wire_address(address, allow_utf8=True)
        except UnsendableAddress as exc:
            # Never on the wire; and no reason to throw away a healthy session.
            return self._result(Stage.RCPT, None, f"address cannot be sent: {exc}", started)
        try:
            if not self._in_transaction:
                self.stage = Stage.MAIL
                command = b"FROM:<" + self.sender.encode("ascii") + b">"
                if offers_utf8:
                    command += b" SMTPUTF8"
                reply = await self._command(b"MAIL", command)
                if reply.code == 421:
                    raise SessionLost(f"{reply.code} {reply.message}")
                if not 200 <= reply.code < 300:
                    self.errors += 1
                    self._retired = True
                    return self._result(Stage.MAIL, reply.code, reply.message, started)
                self._in_transaction = True
            self.stage = Stage.RCPT
            reply = await self._rcpt_command(rcpt)
            found = classify(Stage.RCPT, reply.code, reply.message)
            if found.basis is Basis.RECIPIENT:
                found = await self._vouched_for(address, found)
        except (aiosmtplib.SMTPServerDisconnected, ConnectionError) as exc:
            self._retired = True
            raise SessionLost(str(exc) or type(exc).__name__) from None
        except aiosmtplib.SMTPResponseException as exc:
            # An oversized or malformed reply: a fault of the primary, not a verdict.
            self._retired = True
            self.close()
            self._note(f"unreadable reply: {exc.message}")
            return self._result(Stage.RCPT, None, f"unreadable reply: {exc.message}", started)
        if found.basis in (Basis.THROTTLE, Basis.SENDER):
            # Throttled: a fresh session may fare better. Sender refused (delayed to RCPT
            # TO): every RCPT of this transaction would be refused the same way.
            self._retired = True
        return self._result(Stage.RCPT, reply.code, reply.message, started, found)

    async def _rcpt_command(self, path: bytes) -> aiosmtplib.SMTPResponse:
        """One RCPT TO; raises SessionLost for 421 and for a full transaction."""
        reply = await self._command(b"RCPT", b"TO:<" + path + b">")
        if reply.code == 421:
            self._retired = True
            raise SessionLost(f"{reply.code} {reply.message}")
        self.rcpts += 1
        if not 200 <= reply.code < 300:
            self.errors += 1
            if reply.code == 452 and self.rcpts > 1:
                # "too many recipients": this transaction is full, not the address.
                self._retired = True
                raise SessionLost(f"{reply.code} {reply.message}")
        return reply

    async def _vouched_for(self, address: str, found: Classification) -> Classification:
        """``found`` (a rejection of the recipient) if this session has had
        postmaster@domain accepted (asking for it now if need be), else unproven."""
        local, _, domain = address.rpartition("@")
        if local.lower() == POSTMASTER:
            return unproven("it is postmaster@ itself")
        if domain not in self.vouched:
            reply = await self._rcpt_command(f"{POSTMASTER}@{domain}".encode("ascii"))
            if not 200 <= reply.code < 300:
                return unproven(f"{reply.code} {reply.message}")
            self.vouched.add(domain)
        return dataclasses.replace(
            found,
            why=f"{found.why}; postmaster@{domain} was accepted on the same session, so "
            "the primary is judging recipients",
        )

    def _result(
        self,
        stage: Stage,
        code: int | None,
        detail: str,
        started: float,
        found: Classification | None = None,
    ) -> ProbeResult:
        if found is None:
            found = classify(stage, code, detail)
        return ProbeResult(
            found.verdict,
            stage,
            code,
            detail,
            time.monotonic() - started,
            str(self.hop),
            basis=found.basis,
            why=found.why,
            transcript=self.transcript,
        )

    async def quit(self) -> None:
        """Retire politely: QUIT, unless the error budget is spent (then just hang up,
        since a Postfix primary would make even QUIT wait)."""
        try:
            if self._smtp.is_connected and self.errors < ERROR_BUDGET:
                await self._smtp.quit(timeout=QUIT_TIMEOUT)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            log.debug("QUIT to %s failed: %s", self.hop, exc)
        finally:
            self.close()

    def close(self) -> None:
        self._retired = True
        self._smtp.close()
