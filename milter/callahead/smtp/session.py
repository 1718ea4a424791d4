"""One SMTP session with one primary: the probe dialogue.

A session connects, reads the banner, says EHLO (HELO if EHLO is refused), upgrades with
STARTTLS when asked to, then asks ``RCPT TO:<address>`` for each probe in transactions
shaped as the primary wants them (transaction.py: one ``MAIL FROM:<sender>`` for many
probes, or one recipient per transaction).

**Pipelining.** Once open, the session's commands go through a ``Wire`` (wire.py), which
reads replies strictly in order. Where the primary offers PIPELINING (RFC 2920) a
probe's commands go out in one write, and the pool (pool.py) lets concurrent probes
share the session, each with its own RCPT in the same transaction: their replies come
back in the order they were sent. Without PIPELINING every command waits for the reply
before it, and a session carries one probe at a time.

Replies are classified by ``classify.classify``; a rejection then goes through the
evidence rules of evidence.py (docs/verdicts.md)."""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiosmtplib
from aiosmtplib.typing import SMTPStatus

from ..base.address import UnsendableAddress, needs_smtputf8, wire_address
from ..base.errors import CallaheadError
from ..routing.routes import Nexthop
from .classify import Classification, classify
from .dialogue import Dialogue
from .evidence import ControlSource, EvidenceBook
from .handshake import greet, starttls
from .smtpcompat import banner_reply
from .tls import TlsMode
from .transaction import SessionLost, Transactions, TransactionShape
from .verdict import Basis, ProbeResult, Stage, Verdict
from .wire import Wire

__all__ = [
    "ERROR_BUDGET",
    "MAX_RCPTS_PER_SESSION",
    "MAX_RSETS_PER_SESSION",
    "Session",
    "SessionFailed",
    "SessionLost",
    "SessionSettings",
    "TransactionShape",
]

log = logging.getLogger("callahead.session")

ERROR_BUDGET = 9
"""4xx/5xx replies a session may collect (then it is retired without another command).
A Postfix primary counts each as an error, sleeps 1 s before each reply after the 10th
and hangs up at the 20th; only a delivered message resets the count."""
MAX_RCPTS_PER_SESSION = 500
"""RCPTs in one session (and transaction); Postfix's smtpd_recipient_limit is 1000."""
QUIT_TIMEOUT = 2.0
"""Seconds a courtesy QUIT may take when a session is retired."""
MAX_RSETS_PER_SESSION = 50
"""RSETs one session may send (one recipient per transaction). Postfix counts each RSET
after the 100th (``smtpd_junk_command_limit``) as an error."""


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
    pipelining: bool = True
    """Pipeline commands (and share sessions) where the primary offers PIPELINING."""


class Session:
    """One SMTP connection to one primary, carrying one probe at a time, or several at
    once where the primary offers PIPELINING (the pool decides)."""

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
        self.holders = 0
        """Probes using the session now (kept by the pool)."""
        self.pipelining = False
        """The primary offers PIPELINING and the settings allow it (known once open)."""
        self._utf8 = False
        """The primary offers SMTPUTF8 (known once open)."""
        self.asking_controls = 0
        """Control RCPTs in flight (evidence.py; the pool lets no probe join then)."""
        self.on_joinable: Callable[[], None] = lambda: None
        """Called when the session may first be shared (set by the pool)."""
        self._wire: Wire | None = None
        self._txn: Transactions | None = None
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
        self.last_used = self.created
        self.stage = Stage.CONNECT
        """Where the dialogue is, for reporting a timeout."""
        self._dialogue = Dialogue(settings.transcript)
        note = self._dialogue.note
        self.evidence = EvidenceBook(controls, self._ask_control, lambda: self._utf8, note)
        """Per domain: the controls this session asked, and what they got (the pool
        reserves room for those it may still ask: ``controls_left``)."""
        self._retired = False
        self._draining = False

    @property
    def alive(self) -> bool:
        wire = self._wire
        return self.opened and wire is not None and not wire.closed and not self._retired

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
    def sender_accepted(self) -> bool:
        """The primary accepted this session's MAIL FROM once: until then MAIL FROM goes
        alone, and no other probe shares the session."""
        return self._txn is not None and self._txn.sender_accepted

    @property
    def refused_multi_recipient(self) -> bool:
        """A later RCPT of a transaction of this session got ``5.5.3``."""
        return self._txn is not None and self._txn.refused_multi_recipient

    @property
    def rcpts(self) -> int:
        return 0 if self._txn is None else self._txn.rcpts

    @property
    def rsets(self) -> int:
        return 0 if self._txn is None else self._txn.rsets

    @property
    def errors(self) -> int:
        """4xx and 5xx replies of this session (after its opening), which a Postfix
        primary counts as errors; each one counts, whether its probe still waits for it
        or not."""
        return 0 if self._wire is None else self._wire.refusals

    @property
    def answered(self) -> int:
        """Replies read on this session since it opened (see ``answered_since``)."""
        return 0 if self._wire is None else self._wire.replies

    def queued_behind(self, mark: int) -> bool:
        """A probe that started waiting on this session when ``mark`` replies had been
        read and gave up waited behind other probes: they share the session, and the
        primary answered since. It was slow, not silent."""
        return self.holders > 1 and self.answered > mark and self.alive

    def drain(self) -> None:
        """A probe gave up on the session, which still owes it a reply: the probes on it
        finish, and it takes no other (one would wait behind the reply nobody reads)."""
        self._draining = True

    @property
    def reusable(self) -> bool:
        return (
            self.alive
            and not self._draining
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
            self._utf8 = smtp.supports_extension("smtputf8")
            self.pipelining = self._settings.pipelining and smtp.supports_extension("pipelining")
            self._wire = Wire.take_over(smtp)
            self._txn = Transactions(
                self._wire,
                self._dialogue,
                self.shape,
                self.sender,
                utf8=self._utf8,
                pipelining=self.pipelining,
                retire=self._retire,
                at_stage=self._at_stage,
                sender_accepted=lambda: self.on_joinable(),
            )
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
        self.probes += 1
        utf8 = needs_smtputf8(address)
        offers_utf8 = self._utf8
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
                self.evidence.accepted(address)
            elif found.verdict is Verdict.UNKNOWN:
                found = await self.evidence.judge_unknown(address, found)
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
        """RCPT TO ``path`` on this session (transaction.py); SessionLost once it is
        retired."""
        if self._txn is None or self._retired:
            raise SessionLost("the session was retired")
        return await self._txn.ask(path)

    async def _ask_control(self, path: bytes) -> tuple[Stage, aiosmtplib.SMTPResponse]:
        """RCPT TO a control address (evidence.py), counted in ``asking_controls``. A
        throttle reply or a refused sender retires the session, as for a probe's own."""
        self.asking_controls += 1
        try:
            stage, reply = await self._ask(path)
        finally:
            self.asking_controls -= 1
        if classify(stage, reply.code, reply.message).basis in (Basis.THROTTLE, Basis.SENDER):
            self._retired = True
        return stage, reply

    def _retire(self) -> None:
        self._retired = True

    def _at_stage(self, stage: Stage) -> None:
        self.stage = stage

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
        wire = self._wire
        try:
            if wire is not None and not wire.closed and self.errors < ERROR_BUDGET:
                async with asyncio.timeout(QUIT_TIMEOUT):
                    await self._dialogue.reply(self._dialogue.send(wire, b"QUIT"))
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            log.debug("QUIT to %s failed: %s", self.hop, exc)
        finally:
            self.close()

    def close(self) -> None:
        self._retired = True
        if self._wire is not None:
            self._wire.close()
        self._smtp.close()
