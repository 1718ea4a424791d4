"""The verdict vocabulary: what a probe found (``Verdict``), at which stage
(``Stage``), on what grounds (``Basis``), why none was made (``Skip``), and the
``ProbeResult`` that carries them up to the core. How a reply gets its verdict is
classify.py (and docs/verdicts.md).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..routing.routes import Nexthop


class Verdict(enum.Enum):
    VALID = "valid"
    UNKNOWN = "unknown"
    TEMPFAIL = "tempfail"


class Stage(enum.Enum):
    """How far a probe got; a reply is classified by the stage that produced it."""

    CONNECT = "connect"
    BANNER = "banner"
    EHLO = "ehlo"
    STARTTLS = "starttls"
    MAIL = "mail"
    RCPT = "rcpt"


class Basis(enum.Enum):
    """Why a reply got its verdict. The values appear in logs and metric labels."""

    ACCEPTED = "accepted"
    """2xx at RCPT TO: the recipient exists."""
    RECIPIENT = "recipient"
    """A rejection of this recipient: unknown (once postmaster@ vouches for the session)."""
    UNPROVEN = "unproven"
    """A recipient-level rejection on a session that had postmaster@domain refused too:
    the primary is refusing the prober, so the rejection proves nothing."""
    PROBER = "prober"
    """The primary refuses the prober (client address, HELO, policy, blocklist,
    protocol), not the recipient."""
    SENDER = "sender"
    """The primary refuses the probe's sender (MAIL FROM), not the recipient."""
    MAILBOX = "mailbox"
    """The mailbox exists but cannot take mail now (full, disabled): not "unknown"."""
    THROTTLE = "throttle"
    """Rate limiting or too many recipients: the session is retired."""
    TEMPORARY = "temporary"
    """Any other 4xx, or a 5xx whose meaning is not clear."""
    NO_REPLY = "no_reply"
    """No reply to classify: refused, timeout, disconnect, TLS failure, skipped."""
    SHARED = "shared"
    """Valid without a probe: a backup MX of the site found it valid (Redis)."""
    DRIFT = "drift"
    """A rejection of the recipient on a session where an address of the domain that
    was verified valid recently (the control) was rejected too: the primary may have
    stopped judging recipients (a broken directory lookup, the wrong host)."""
    SECONDARY = "secondary"
    """A valid or unknown answer from an MX host outside the most-preferred group of an
    MX-derived route (another backup MX): only the primary's word counts."""
    NO_DOMAIN = "no_domain"
    """The recipient domain of an MX-routed domain does not exist (authoritative
    NXDOMAIN) or accepts no mail (RFC 7505 null MX): unknown, 550 5.1.2."""

    @property
    def refuses_prober(self) -> bool:
        return self in (Basis.PROBER, Basis.SENDER, Basis.UNPROVEN)


class Skip(enum.Enum):
    """Why no probe was made at all."""

    OVERLOAD = "overload"
    PRIMARY_DOWN = "primary_down"
    LOOP_STALLED = "loop_stalled"
    """callahead's own probe loop is not answering (see loop.py's heartbeat)."""
    SHUTDOWN = "shutdown"
    """callahead is stopping: probes in flight were cancelled, no new ones start."""
    ROUTE_FAILED = "route_failed"
    """The route's hosts could not be found (DNS failure, no MX host but this one)."""
    PRIMARY_BUDGET = "primary_budget"
    """The primary's probe budget (``CALLAHEAD_PRIMARY_RATE``) had no token in time."""


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
    def no_reply(
        cls,
        verdict: Verdict,
        stage: Stage,
        detail: str,
        started: float,
        primary: str,
        *,
        why: str,
        basis: Basis = Basis.NO_REPLY,
        transcript: tuple[str, ...] = (),
    ) -> ProbeResult:
        """A result without a reply code of the primary, timed from ``started``
        (monotonic): a lost or timed-out session, a shared hit. ``reached`` only for a
        verdict that came from elsewhere (the shared cache)."""
        return cls(
            verdict,
            stage,
            None,
            detail,
            time.monotonic() - started,
            primary,
            reached=verdict is not Verdict.TEMPFAIL,
            basis=basis,
            why=why,
            transcript=transcript,
        )

    @classmethod
    def not_probed(cls, skip: Skip | None, hops: Sequence[Nexthop], detail: str) -> ProbeResult:
        """Undecided without a probe (``skip`` says why; None: the probe was abandoned)."""
        primary = str(hops[0]) if hops else ""
        return cls(Verdict.TEMPFAIL, Stage.CONNECT, None, detail, 0.0, primary, False, skip)
