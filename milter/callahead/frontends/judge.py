"""What every front end does around the decision core: ask it, turn an error inside
callahead into the tempfail action (never a reject), count the decision and log one
line for it with the Postfix queue id and the client address.

The milter adapter (from libmilter's threads) calls ``judge``; the policy service (on
the probe loop) awaits ``judge_async``. Both then only turn the ``Decision`` into their
protocol's answer.
"""

from __future__ import annotations

import logging

from ..base.address import normalize_recipient
from ..base.logfmt import escape
from ..core.policy import Action, Decision, Policy, Reason
from .maillog.ledger import Ledger
from .maillog.tally import DomainTally
from .metrics import Metrics

log = logging.getLogger("callahead.decision")

_REPLY_LOGGED = frozenset({Reason.PROBE_TEMPFAIL, Reason.PROBER_REFUSED})
"""Accepted decisions whose log line carries the primary's reply: it says why."""
MAX_LOGGED_ADDRESS = 512
"""Characters of a recipient a log line shows, at most (a probe carries at most 500
octets): a 64 KiB garbage argument is logged as its start and its length, in bounded
time and within journald's line limit."""


class Judge:
    def __init__(
        self,
        policy: Policy,
        metrics: Metrics,
        ledger: Ledger | None = None,
        tally: DomainTally | None = None,
    ) -> None:
        self.policy = policy
        self._metrics = metrics
        self._tally = tally
        """``callahead report``'s counts per domain; None: not kept."""
        self.ledger = ledger
        """The backscatter meter's join (``CALLAHEAD_MAILLOG``); None: off. The front ends
        hand it what they accepted (``maillog.ledger.Held``)."""

    def judge(self, recipient: str, client: str | None, queue_id: str) -> Decision:
        """From a thread other than the probe loop's."""
        try:
            decision = self.policy.decide(recipient, client)
        except Exception:  # noqa: BLE001 -- the last line of defence: never reject for our own fault
            decision = self._failed(recipient, client, queue_id)
        return self._done(decision, client, queue_id)

    async def judge_async(self, recipient: str, client: str | None, queue_id: str) -> Decision:
        """On the probe loop."""
        try:
            decision = await self.policy.decide_async(recipient, client)
        except Exception:  # noqa: BLE001 -- the last line of defence: never reject for our own fault
            decision = self._failed(recipient, client, queue_id)
        return self._done(decision, client, queue_id)

    def _failed(self, recipient: str, client: str | None, queue_id: str) -> Decision:
        log.exception(
            "%s: client=%s rcpt=<%s>: internal error",
            escape(queue_id),
            escape(client or "unknown"),
            escape(recipient[:MAX_LOGGED_ADDRESS]),
        )
        self._metrics.errors.inc()
        normalized = normalize_recipient(recipient)
        address = normalized.address if normalized else recipient
        return self.policy.tempfail_decision(address, Reason.ERROR)

    def _done(self, decision: Decision, client: str | None, queue_id: str) -> Decision:
        self._metrics.observe(decision)
        if self._tally is not None:
            self._tally.decided(decision)
        log.info(
            "%s: client=%s %s",
            escape(queue_id),
            escape(client or "unknown"),
            decision_line(decision),
        )
        return decision


def decision_line(decision: Decision) -> str:
    """The log line body for one decision; the recipient and the primary's reply are
    escaped (logfmt.py), so neither can add or end a field."""
    address = decision.address
    shown = escape(address[:MAX_LOGGED_ADDRESS])
    if len(address) > MAX_LOGGED_ADDRESS:
        shown += f"...> rcpt_chars={len(address)}"
    else:
        shown += ">"
    text = f"rcpt=<{shown} decision={decision.action.value} reason={decision.reason.value}"
    if decision.dry_run:
        text += " dry_run=yes"
    probe = decision.probe
    if probe is not None:
        code = "-" if probe.code is None else str(probe.code)
        text += (
            f" primary={probe.primary} stage={probe.stage.value} code={code}"
            f" probe_time={probe.duration:.3f}s"
        )
        if decision.action is not Action.ACCEPT or decision.reason in _REPLY_LOGGED:
            text += f' reply="{escape(probe.detail, spaces=True)}"'
    return text
