"""One SMTP session with one primary: the probe dialogue.

A session connects, reads the banner, says EHLO (HELO if EHLO is refused), upgrades with
STARTTLS when asked to, then opens one transaction with ``MAIL FROM:<sender>`` and asks
``RCPT TO:<address>`` for each probe. Several probes share the transaction: a Postfix
primary takes an inflow token only for a transaction's first accepted recipient, and no
RSET (a "junk" command Postfix limits) is needed, unless the primary refuses
multi-recipient bounces (``TransactionShape``).

Replies are classified by ``classify.classify`` (stage, enhanced status code, text); a
rejection then goes through the evidence rules of evidence.py (docs/verdicts.md).

**Transaction shape.** A primary with Postfix's ``reject_multi_recipient_bounce``
answers every RCPT after the first accepted one of a ``MAIL FROM:<>`` transaction with
``550 5.5.3 ... Multi-recipient bounce``. Such a reply on a later RCPT is never judged:
the RCPT is asked again in a transaction of its own (RSET, MAIL FROM), and the
primary's ``TransactionShape`` switches to one recipient per transaction for every
session after (the engine may switch to the fallback sender instead).
"""

from __future__ import annotations

import functools
import logging
import ssl
import time
from dataclasses import dataclass

import aiosmtplib
from aiosmtplib.typing import SMTPStatus

from ..base.address import UnsendableAddress, needs_smtputf8, wire_address
from ..base.errors import CallaheadError
from ..routing.routes import Nexthop
from .classify import Classification, classify, refuses_multi_recipient_bounce
from .dialogue import Dialogue
from .evidence import ControlSource, EvidenceBook
from .handshake import greet, starttls
from .smtpcompat import banner_reply
from .tls import TlsMode
from .verdict import Basis, ProbeResult, Stage, Verdict

log = logging.getLogger("callahead.session")

ERROR_BUDGET = 9
"""4xx/5xx replies a session may collect. A Postfix primary counts every one as an
error, sleeps 1 s before each reply after the 10th and hangs up at the 20th; only a
delivered message resets the count. A session is retired after this many, without
sending it another command."""
MAX_RCPTS_PER_SESSION = 500
"""RCPTs in one session (and transaction); Postfix's smtpd_recipient_limit is 1000."""
QUIT_TIMEOUT = 2.0
"""Seconds a courtesy QUIT may take when a session is retired."""
MAX_RSETS_PER_SESSION = 50
"""RSETs one session may send (one recipient per transaction). Postfix counts each RSET
after the 100th (``smtpd_junk_command_limit``) as an error."""


@dataclass(slots=True)
class TransactionShape:
    """How one primary wants its probe transactions: learnt by its sessions, shared by
    them (the engine keeps one per primary)."""

    single_rcpt: bool = False
    """One recipient per transaction: the primary refused a later RCPT of a
    transaction (``5.5.3``, Postfix's ``reject_multi_recipient_bounce``)."""


class SessionLost(CallaheadError):
    """The session died before the primary answered RCPT TO (closed, 421, reset): the
    probe may be retried on a fresh session."""


class SessionFailed(CallaheadError):
    """Opening the session failed; carries the result to report."""

    def __init__(self, result: ProbeResult) -> None:
        super().__init__(result.detail)
        self.result = result


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
        self,
        hop: Nexthop,
        settings: SessionSettings,
        *,
        sender: str | None = None,
        shape: TransactionShape | None = None,
        controls: ControlSource | None = None,
    ) -> None:
        self.hop = hop
        self._settings = settings
        self.sender = settings.sender if sender is None else sender
        """MAIL FROM of this session's transaction."""
        self.shape = shape if shape is not None else TransactionShape()
        self.refused_multi_recipient = False
        """A later RCPT of a transaction of this session got ``5.5.3``."""
        self.rsets = 0
        self._txn_rcpts = 0
        """RCPTs sent in the open transaction."""
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
        self._dialogue = Dialogue(settings.transcript)
        self._evidence = EvidenceBook(
            controls,
            self._ask,
            lambda: self._smtp.supports_extension("smtputf8"),
            self._dialogue.note,
        )
        """Per domain: the controls this session asked, and what they got."""
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
        return self._dialogue.lines

    def timed_out(self, budget: float, started: float) -> ProbeResult:
        """The result of a probe that ran out of time on this session, which is closed."""
        self.close()
        self._dialogue.note(f"no reply within {budget:.3g}s")
        return self.undecided(
            self.waiting_at, f"timed out after {budget:.3g}s", started, "no reply in time"
        )

    def undecided(self, stage: Stage, detail: str, started: float, why: str) -> ProbeResult:
        """Undecided without a reply, at ``stage`` of this session (lost, timed out)."""
        return ProbeResult.no_reply(
            Verdict.TEMPFAIL,
            stage,
            detail,
            started,
            str(self.hop),
            why=why,
            transcript=self.transcript,
        )

    @property
    def reusable(self) -> bool:
        return (
            self.alive
            and self.errors < ERROR_BUDGET
            and self.rcpts < MAX_RCPTS_PER_SESSION
            and self.rsets < MAX_RSETS_PER_SESSION
        )

    def _fail(self, stage: Stage, code: int | None, detail: str, started: float) -> SessionFailed:
        reached = code is not None and code != SMTPStatus.domain_unavailable
        if code is None:
            self._dialogue.note(detail)
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
                self._dialogue.heard(banner.code, banner.message)
            except (aiosmtplib.SMTPConnectTimeoutError, aiosmtplib.SMTPConnectError) as exc:
                refused = banner_reply(exc)  # a banner but 220, in either aiosmtplib
                if refused is not None:
                    code, message = refused
                    self._dialogue.heard(code, message)
                    raise self._fail(Stage.BANNER, code, message, started) from None
                stage = Stage.BANNER if smtp.protocol is not None else Stage.CONNECT
                raise self._fail(stage, None, str(exc), started) from None
            fail = functools.partial(self._fail, started=started)
            stage = self.stage = Stage.EHLO
            await greet(self._smtp, self._settings.helo_name, self._dialogue, fail)
            if self._settings.tls is not TlsMode.NONE:
                stage = self.stage = Stage.STARTTLS
                await starttls(self._smtp, self._settings, self.hop.host, self._dialogue, fail)
        except SessionFailed:
            self.close()
            raise
        except (aiosmtplib.SMTPException, OSError, ssl.SSLError) as exc:
            self.close()
            raise self._fail(stage, None, str(exc) or type(exc).__name__, started) from None
        self.opened = True

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
            stage, reply = await self._ask(rcpt)
            if stage is Stage.MAIL:
                return self._result(Stage.MAIL, reply.code, reply.message, started)
            found = classify(Stage.RCPT, reply.code, reply.message)
            if found.verdict is Verdict.VALID:
                self._evidence.accepted(address)
            elif found.verdict is Verdict.UNKNOWN:
                found = await self._evidence.judge_unknown(address, found)
        except (aiosmtplib.SMTPServerDisconnected, ConnectionError) as exc:
            self._retired = True
            raise SessionLost(str(exc) or type(exc).__name__) from None
        except aiosmtplib.SMTPResponseException as exc:
            # An oversized or malformed reply: a fault of the primary, not a verdict.
            self._retired = True
            self.close()
            self._dialogue.note(f"unreadable reply: {exc.message}")
            return self._result(Stage.RCPT, None, f"unreadable reply: {exc.message}", started)
        if found.basis in (Basis.THROTTLE, Basis.SENDER):
            # Throttled: a fresh session may fare better. Sender refused (delayed to RCPT
            # TO): every RCPT of this transaction would be refused the same way.
            self._retired = True
        return self._result(Stage.RCPT, reply.code, reply.message, started, found)

    async def _ask(self, path: bytes) -> tuple[Stage, aiosmtplib.SMTPResponse]:
        """One RCPT TO in a transaction shaped as the primary wants it: (RCPT, its
        reply), or (MAIL, the refusal of MAIL FROM). A ``5.5.3`` on a later RCPT of the
        transaction is never the answer: the RCPT is asked again in a new one."""
        if self._in_transaction and self.shape.single_rcpt and self._txn_rcpts > 0:
            await self._reset()
        if not self._in_transaction:
            mail = await self._begin()
            if not 200 <= mail.code < 300:
                return Stage.MAIL, mail
        self.stage = Stage.RCPT
        later = self._txn_rcpts > 0
        reply = await self._rcpt_command(path)
        if later and refuses_multi_recipient_bounce(reply.code, reply.message):
            self.refused_multi_recipient = True
            self.shape.single_rcpt = True
            self._dialogue.note(
                "a later RCPT of the transaction was refused (5.5.3: multi-recipient "
                "bounce): asked again in a transaction of its own"
            )
            await self._reset()
            mail = await self._begin()
            if not 200 <= mail.code < 300:
                return Stage.MAIL, mail
            self.stage = Stage.RCPT
            reply = await self._rcpt_command(path)
        return Stage.RCPT, reply

    async def _begin(self) -> aiosmtplib.SMTPResponse:
        """``MAIL FROM``; raises SessionLost for 421. A refusal retires the session."""
        self.stage = Stage.MAIL
        command = b"FROM:<" + self.sender.encode("ascii") + b">"
        if self._smtp.supports_extension("smtputf8"):
            command += b" SMTPUTF8"
        reply = await self._dialogue.command(self._smtp, b"MAIL", command)
        if reply.code == SMTPStatus.domain_unavailable:
            self._retired = True
            raise SessionLost(f"{reply.code} {reply.message}")
        if not 200 <= reply.code < 300:
            self.errors += 1
            self._retired = True
            return reply
        self._in_transaction = True
        self._txn_rcpts = 0
        return reply

    async def _reset(self) -> None:
        """``RSET``: the open transaction ends. Raises SessionLost unless it is 2xx."""
        self.rsets += 1
        self._in_transaction = False
        reply = await self._dialogue.command(self._smtp, b"RSET")
        if not 200 <= reply.code < 300:
            self._retired = True
            raise SessionLost(f"RSET: {reply.code} {reply.message}")

    async def _rcpt_command(self, path: bytes) -> aiosmtplib.SMTPResponse:
        """One RCPT TO; raises SessionLost for 421 and for a full transaction."""
        reply = await self._dialogue.command(self._smtp, b"RCPT", b"TO:<" + path + b">")
        if reply.code == SMTPStatus.domain_unavailable:
            self._retired = True
            raise SessionLost(f"{reply.code} {reply.message}")
        self.rcpts += 1
        self._txn_rcpts += 1
        if not 200 <= reply.code < 300:
            self.errors += 1
            if reply.code == SMTPStatus.insufficient_storage and self._txn_rcpts > 1:
                # "too many recipients": this transaction is full, not the address.
                self._retired = True
                raise SessionLost(f"{reply.code} {reply.message}")
        return reply

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
