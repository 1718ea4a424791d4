"""The transactions of one open probe session: each probe's ``RCPT TO`` in a transaction
shaped as the primary wants it, over the session's ``Wire``.

Several probes share a transaction (one ``MAIL FROM`` per session): a Postfix primary
takes an inflow token only for a transaction's first accepted recipient, and no RSET (a
"junk" command Postfix limits) is needed, unless the primary refuses multi-recipient
bounces (``TransactionShape``).

**Transaction shape.** A primary with Postfix's ``reject_multi_recipient_bounce``
answers every RCPT after the first accepted one of a ``MAIL FROM:<>`` transaction with
``550 5.5.3 ... Multi-recipient bounce``. Such a reply on a later RCPT is never judged:
the RCPT is asked again in a transaction of its own (RSET, MAIL FROM), and the
primary's ``TransactionShape`` switches to one recipient per transaction for every
session after (the engine may switch to the fallback sender instead).

**Pipelining.** With PIPELINING, a probe's RSET, MAIL FROM and RCPT TO go out in one
write, except that MAIL FROM waits for its reply until the primary has accepted the
session's sender (a primary that refuses the sender never sees a recipient). What is
sent keeps the transaction's state as the primary will see it, whatever replies are
still pending (other probes' on a shared session); the replies are read in the order
sent. Without PIPELINING each command waits for the reply before it.

Lives on the probe event loop; not thread-safe.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import aiosmtplib
from aiosmtplib.typing import SMTPStatus

from ..base.errors import CallaheadError
from .classify import refuses_multi_recipient_bounce
from .dialogue import Dialogue
from .verdict import Stage
from .wire import Wire

Reply = aiosmtplib.SMTPResponse
Pending = asyncio.Future[aiosmtplib.SMTPResponse]


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


class Transactions:
    def __init__(
        self,
        wire: Wire,
        dialogue: Dialogue,
        shape: TransactionShape,
        sender: str,
        *,
        utf8: bool,
        pipelining: bool,
        retire: Callable[[], None],
        at_stage: Callable[[Stage], None],
        sender_accepted: Callable[[], None],
    ) -> None:
        """``sender``: of MAIL FROM (with ``SMTPUTF8`` where the primary offers it:
        ``utf8``); ``retire``: the session may take no other probe; ``at_stage``: where
        the dialogue is now (for a timeout); ``sender_accepted``: called when the
        primary first accepts the sender."""
        self._wire = wire
        self._dialogue = dialogue
        self.shape = shape
        self._mail_command = b"MAIL FROM:<" + sender.encode("ascii") + b">"
        if utf8:
            self._mail_command += b" SMTPUTF8"
        self._pipelining = pipelining
        self._retire = retire
        self._at_stage = at_stage
        self._on_sender_accepted = sender_accepted
        self.sender_accepted = False
        self.refused_multi_recipient = False
        """A later RCPT of a transaction got ``5.5.3``."""
        self.rsets = 0
        self.rcpts = 0
        """RCPTs sent."""
        self._in_transaction = False
        """A MAIL FROM was sent and no RSET since (as sent: its reply may be pending)."""
        self._txn_rcpts = 0
        """RCPTs sent in the open transaction."""

    async def ask(self, path: bytes) -> tuple[Stage, Reply]:
        """One RCPT TO in a transaction shaped as the primary wants it: (RCPT, its
        reply), or (MAIL, the refusal of MAIL FROM). A ``5.5.3`` on a later RCPT of the
        transaction is never the answer: the RCPT is asked again in a new one."""
        stage, reply, later = await self._exchange(path)
        if (
            stage is Stage.RCPT
            and later
            and refuses_multi_recipient_bounce(reply.code, reply.message)
        ):
            self.refused_multi_recipient = True
            self.shape.single_rcpt = True
            self._dialogue.note(
                "a later RCPT of the transaction was refused (5.5.3: multi-recipient "
                "bounce): asked again in a transaction of its own"
            )
            stage, reply, _ = await self._exchange(path)
        return stage, reply

    async def _exchange(self, path: bytes) -> tuple[Stage, Reply, bool]:
        """RCPT TO ``path``, after the RSET and MAIL FROM the transaction needs. Returns
        the stage, its reply, and whether the RCPT was a later one of its transaction."""
        wire = self._wire
        pipelined = self._pipelining
        hold_mail = not (pipelined and self.sender_accepted)
        reset: Pending | None = None
        mail: Pending | None = None
        if self._in_transaction and self.shape.single_rcpt and self._txn_rcpts > 0:
            self.rsets += 1
            self._in_transaction = False
            reset = self._dialogue.send(wire, b"RSET")
            if not pipelined:
                await self._reset_reply(reset)
                reset = None
        if not self._in_transaction:
            self._at_stage(Stage.MAIL)
            self._in_transaction = True
            self._txn_rcpts = 0
            mail = self._dialogue.send(wire, self._mail_command)
            if hold_mail:
                if reset is not None:
                    await self._reset_reply(reset)
                    reset = None
                reply = await self._mail_reply(mail)
                mail = None
                if not 200 <= reply.code < 300:
                    return Stage.MAIL, reply, False
        later = self._txn_rcpts > 0
        self._txn_rcpts += 1
        self.rcpts += 1
        place = self._txn_rcpts
        rcpt = self._dialogue.send(wire, b"RCPT TO:<" + path + b">")
        # The replies of what was sent together, in the order it was sent.
        if reset is not None:
            await self._reset_reply(reset)
        if mail is not None:
            reply = await self._mail_reply(mail)
            if not 200 <= reply.code < 300:
                # The RCPT's reply (503: no transaction) is read and dropped.
                return Stage.MAIL, reply, False
        self._at_stage(Stage.RCPT)
        return Stage.RCPT, await self._rcpt_reply(rcpt, place), later

    async def _mail_reply(self, pending: Pending) -> Reply:
        """The reply to ``MAIL FROM``; raises SessionLost for 421. A refusal retires the
        session."""
        reply = await self._dialogue.reply(pending)
        if reply.code == SMTPStatus.domain_unavailable:
            self._retire()
            raise SessionLost(f"{reply.code} {reply.message}")
        if not 200 <= reply.code < 300:
            self._retire()
            self._in_transaction = False
        elif not self.sender_accepted:
            self.sender_accepted = True
            self._on_sender_accepted()
        return reply

    async def _reset_reply(self, pending: Pending) -> None:
        """The reply to ``RSET``: the transaction ended. Raises SessionLost unless it
        is 2xx."""
        reply = await self._dialogue.reply(pending)
        if not 200 <= reply.code < 300:
            self._retire()
            raise SessionLost(f"RSET: {reply.code} {reply.message}")

    async def _rcpt_reply(self, pending: Pending, place: int) -> Reply:
        """The reply to the ``place``-th RCPT TO of its transaction; raises SessionLost
        for 421 and for a full transaction."""
        reply = await self._dialogue.reply(pending)
        if reply.code == SMTPStatus.domain_unavailable:
            self._retire()
            raise SessionLost(f"{reply.code} {reply.message}")
        if reply.code == SMTPStatus.insufficient_storage and place > 1:
            # "too many recipients": this transaction is full, not the address.
            self._retire()
            raise SessionLost(f"{reply.code} {reply.message}")
        return reply
