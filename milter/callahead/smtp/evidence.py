"""The evidence a session gathers before a rejection counts as *unknown*: the controls
of the recipient's domain asked on the same session (recently verified addresses,
then postmaster@), the address of the domain it accepted already, and a verified
control refused (drift). The rules are docs/verdicts.md's; the session asks, this
decides what its answers prove.

The rules:

* **explicit**: an enhanced code about the recipient is *unknown* on its own;
* **bare**: a bare 5xx with an unknown-user text is *unknown* only once the same session
  has accepted a **control** address of the domain: one verified valid recently (from
  the ``ControlSource``: the local cache or Redis), else ``postmaster@domain``;
* **drift**: when a recently verified control is itself rejected as unknown and no
  other verified address of the domain is accepted, the primary may have stopped
  judging recipients (a broken directory lookup, the wrong host): that session's
  rejections of the domain are undecided. postmaster@ accepted does not tell this from
  a removed user: it is often an alias (virtual_alias_maps, /etc/aliases, Debian's
  Exim ACL) that never reaches the user table, so it is not asked then and counts for
  nothing. If another verified address is accepted instead, the refused one was a user
  since removed: it is no longer offered as a control;
* **answered**: a control counts only once the primary has answered about it (2xx or
  5xx at RCPT). An ask that ends otherwise (no reply in time, 421, a lost or retired
  session, a 4xx, a refused MAIL FROM) makes that session's rejections of the domain
  undecided: the controls it was to ask are spent, so a later rejection cannot be
  judged "unknown on its own" for want of one.

Controls are asked once per session and domain (at most two verified ones and
postmaster@), right after the first rejection that needs them, in the same transaction
(no RSET; a Postfix primary counts a rejected RCPT as an error, an accepted one as
nothing). An address of the domain (not postmaster@) accepted earlier on the same
session vouches as a verified control would: no control is asked then.

Concurrent probes on one session (pipelining) judge their rejections of a domain one at
a time: a rejection is never judged while the controls another probe asked are still
unanswered, so a drift they reveal undoes every rejection judged after them.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import aiosmtplib

from ..base.address import UnsendableAddress, needs_smtputf8, wire_address
from .classify import Classification, classify, drifted, unproven
from .verdict import Basis, Stage, Verdict

VERIFIED_CONTROLS = 2
"""Recently verified addresses asked as controls per session and domain at most."""
CONTROLS_PER_DOMAIN = VERIFIED_CONTROLS + 1
"""Control RCPTs one session may ask about one domain, all of which a primary in drift
refuses: up to ``VERIFIED_CONTROLS`` recently verified addresses, then postmaster@
(``EvidenceBook._evidence_for``). They are asked once per session and domain, after the
first rejection that needs them; the pool keeps room for them in a session's error
budget (pool.py)."""


POSTMASTER = "postmaster"
"""RFC 5321 4.5.1: every domain must accept mail for postmaster@domain."""


class ControlSource(Protocol):
    """Recently verified addresses of a domain, to ask as controls (controls.Controls)."""

    async def controls(self, domain: str) -> tuple[str, ...]:
        """Newest first; may be empty."""
        ...

    def stale(self, address: str) -> None:
        """``address`` was refused as unknown while another control of its domain was
        accepted: it is a user since removed, not a control any more."""


class _NoControls:
    async def controls(self, domain: str) -> tuple[str, ...]:
        return ()

    def stale(self, address: str) -> None:
        pass


@dataclass(slots=True)
class _Evidence:
    """What a session learnt about one domain's controls."""

    vouched_by: str = ""
    """An address of the domain other than postmaster@ accepted on this session (a
    verified control, or a probe)."""
    postmaster_accepted: bool = False
    """postmaster@ was accepted on this session: evidence only while no verified control
    of the domain was refused (it is often an alias that never reaches the user table)."""
    verified_refused: bool = False
    """A recently verified control was refused (5xx) on this session: postmaster@ is no
    evidence then."""
    suspect: str = ""
    """A recently verified control refused as unknown on this session."""
    suspect_reply: str = ""
    unanswered: str = ""
    """A control whose ask ended without an answer about it (no reply, 421, a lost or
    retired session, a 4xx, a refused MAIL FROM), with what happened."""
    postmaster_tried: bool = False
    tried: set[str] = field(default_factory=set)
    """The verified controls asked."""
    replies: list[str] = field(default_factory=list)
    """What the refused controls got, for the explanation."""
    judging: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Held while a rejection of the domain is judged (and its controls asked)."""


class EvidenceBook:
    """Per session: what its controls proved, per domain."""

    def __init__(
        self,
        controls: ControlSource | None,
        ask: Callable[[bytes], Awaitable[tuple[Stage, aiosmtplib.SMTPResponse]]],
        utf8: Callable[[], bool],
        note: Callable[[str], None],
    ) -> None:
        """``ask``: RCPT TO one path on the session; ``utf8``: the session offers
        SMTPUTF8; ``note``: a line for the transcript."""
        self._controls: ControlSource = controls if controls is not None else _NoControls()
        self._ask = ask
        self._utf8 = utf8
        self._note = note
        self._by_domain: dict[str, _Evidence] = {}

    def accepted(self, address: str) -> None:
        """An address of the domain accepted on this session vouches for its rejections
        as well as any control would (the same view of the tables); postmaster@ only
        as postmaster@ does."""
        local, _, domain = address.rpartition("@")
        evidence = self._by_domain.setdefault(domain, _Evidence())
        if local.lower() == POSTMASTER:
            evidence.postmaster_accepted = True
        else:
            evidence.vouched_by = evidence.vouched_by or address

    def controls_left(self, domain: str) -> int:
        """Control RCPTs this session may still send about ``domain`` at most: all of
        them for a domain it has not judged yet, none once one vouched or one went
        unanswered. Each may be refused (an error at a Postfix primary)."""
        evidence = self._by_domain.get(domain)
        if evidence is None:
            return CONTROLS_PER_DOMAIN
        if evidence.vouched_by or evidence.unanswered:
            return 0
        postmaster = not (
            evidence.postmaster_tried or evidence.postmaster_accepted or evidence.verified_refused
        )
        return VERIFIED_CONTROLS - len(evidence.tried) + postmaster

    async def judge_unknown(self, address: str, found: Classification) -> Classification:
        """Apply the evidence rules to ``found``, a rejection of the recipient."""
        local, _, domain = address.rpartition("@")
        async with self._by_domain.setdefault(domain, _Evidence()).judging:
            return await self._judge(local, domain, address, found)

    async def _judge(
        self, local: str, domain: str, address: str, found: Classification
    ) -> Classification:
        evidence = await self._evidence_for(domain, address, need_postmaster=found.bare)
        if evidence.vouched_by:
            return dataclasses.replace(
                found,
                why=f"{found.why}; the control {evidence.vouched_by} was accepted on the "
                "same session, so the primary is judging recipients",
            )
        if evidence.suspect:
            # postmaster@ accepted proves nothing then: it may be an alias.
            return drifted(evidence.suspect, evidence.suspect_reply)
        if evidence.unanswered:
            return Classification(
                Verdict.TEMPFAIL,
                Basis.TEMPORARY,
                f"rule controls: the control {evidence.unanswered}, so whether the primary "
                "is judging recipients is not known: its rejections of the domain decide "
                "nothing on this session",
            )
        if evidence.postmaster_accepted and not evidence.verified_refused:
            return dataclasses.replace(
                found,
                why=f"{found.why}; the control {POSTMASTER}@{domain} was accepted on the "
                "same session, so the primary is judging recipients",
            )
        if found.bare:
            if local.lower() == POSTMASTER:
                return unproven("postmaster@ cannot vouch for itself")
            return unproven("; ".join(evidence.replies) or "no control address known")
        return dataclasses.replace(found, why=f"{found.why}: unknown on its own")

    async def _evidence_for(self, domain: str, address: str, *, need_postmaster: bool) -> _Evidence:
        """The controls of ``domain`` on this session, asked now if need be: recently
        verified addresses first (they can reveal drift), then postmaster@ when a bare
        rejection needs a control and no verified one was refused or went unanswered."""
        evidence = self._by_domain.setdefault(domain, _Evidence())
        if (
            not evidence.vouched_by
            and not evidence.unanswered
            and len(evidence.tried) < VERIFIED_CONTROLS
        ):
            # Addresses verified since the last look are asked too (up to the limit).
            for control in await self._controls.controls(domain):
                if len(evidence.tried) >= VERIFIED_CONTROLS or evidence.vouched_by:
                    break
                if (
                    control != address
                    and control not in evidence.tried
                    # A verified postmaster@ is still postmaster@ (an alias, often).
                    and control.rpartition("@")[0].lower() != POSTMASTER
                ):
                    evidence.tried.add(control)
                    await self._ask_control(control, evidence, verified=True)
        if (
            need_postmaster
            and not evidence.vouched_by
            and not evidence.verified_refused
            and not evidence.unanswered
            and not evidence.postmaster_accepted
            and not evidence.postmaster_tried
        ):
            evidence.postmaster_tried = True
            postmaster = f"{POSTMASTER}@{domain}"
            if address.lower() != postmaster:
                await self._ask_control(postmaster, evidence, verified=False)
        return evidence

    async def _ask_control(self, control: str, evidence: _Evidence, *, verified: bool) -> None:
        """Ask ``control`` and record what its answer proves. An ask that ends without
        an answer about the address (raised, cancelled: the probe's timeout) leaves
        ``evidence.unanswered`` set, so that no rejection judged after it on this
        session is taken for unknown for want of a control."""
        if needs_smtputf8(control) and not self._utf8():
            return
        try:
            path = wire_address(control, allow_utf8=True)
        except UnsendableAddress:
            return
        answered = False
        try:
            stage, reply = await self._ask(path)
            answered = True
        finally:
            if not answered:
                evidence.unanswered = f"{control} got no answer"
        text = f"{control}: {reply.code} {reply.message}"
        if stage is not Stage.RCPT or reply.code < 200 or 300 <= reply.code < 500:
            # A refused MAIL FROM, a 4xx: nothing said about the address.
            evidence.unanswered = f"{control} got no answer about it ({reply.code})"
            evidence.replies.append(text)
            return
        if 200 <= reply.code < 300:
            if not verified:
                evidence.postmaster_accepted = True
                return
            evidence.vouched_by = control
            if evidence.suspect:
                # Another verified control vouches: the suspect is a user removed since.
                self._note(f"control {evidence.suspect} is refused: no longer a control")
                self._controls.stale(evidence.suspect)
            return
        evidence.replies.append(text)
        evidence.verified_refused = evidence.verified_refused or verified
        if (
            verified
            and not evidence.suspect
            and classify(Stage.RCPT, reply.code, reply.message).verdict is Verdict.UNKNOWN
        ):
            evidence.suspect = control
            evidence.suspect_reply = f"{reply.code} {reply.message}"
