"""``callahead doctor``'s ``controls`` item: what lets callahead refuse a domain's unknown
recipients before it has verified any user of the domain.

A primary that refuses unknown users with an enhanced code (``550 5.1.1``) is judged on
its own word. One that answers with a bare 5xx (Exim, and others that send no enhanced
status codes) is judged only once a control of the domain was accepted on the same
session: a user verified recently, else ``CALLAHEAD_CONTROLS``, else postmaster@. Where
the primary refuses postmaster@ too and no control is configured, the domain's unknown
recipients are accepted until one of its users has been verified: doctor says so and
asks for one. A configured control is probed: one the primary refuses would make every
rejection of its domain read as drift (accepted).
"""

from __future__ import annotations

from collections.abc import Mapping

from ...probing.engine import ProbeEngine
from ...routing.routes import Nexthop
from ...smtp.classify import classify
from ...smtp.verdict import ProbeResult, Stage, Verdict
from ..config import Config
from .postfixhooks import Finding


def configured_controls(config: Config) -> dict[str, str]:
    """The first ``CALLAHEAD_CONTROLS`` address of each domain."""
    found: dict[str, str] = {}
    for address in config.controls:
        found.setdefault(address.rpartition("@")[2], address)
    return found


def _reply(result: ProbeResult) -> str:
    code = "no reply" if result.code is None else str(result.code)
    return f"{code} {result.detail.splitlines()[0] if result.detail else ''}".rstrip()


def _bare_rejection(result: ProbeResult) -> bool:
    """``result`` is a 5xx at RCPT without an enhanced status code that says the user is
    unknown: a reply that needs a control to count."""
    if result.stage is not Stage.RCPT or result.code is None or result.code < 500:
        return False
    return classify(Stage.RCPT, result.code, result.detail).bare


async def configured_finding(
    engine: ProbeEngine, hops: tuple[Nexthop, ...], control: str, probed: ProbeResult | None
) -> Finding:
    """A ``CALLAHEAD_CONTROLS`` address: is it accepted? (``probed``: its probe, if
    doctor ran it already.)"""
    result = probed if probed is not None else await engine.probe(control, hops)
    if result.verdict is Verdict.VALID:
        return Finding("controls", True, f"{control} (CALLAHEAD_CONTROLS) is accepted")
    domain = control.rpartition("@")[2]
    return Finding(
        "controls",
        False,
        f"CALLAHEAD_CONTROLS names {control}, which the primary does not accept "
        f"({result.verdict.value}: {_reply(result)}): until a user of {domain} is verified, "
        "its rejections there read as drift and its unknown recipients are accepted",
        f"name a user of {domain} that exists in CALLAHEAD_CONTROLS",
    )


async def postmaster_finding(
    engine: ProbeEngine,
    domain: str,
    hops: tuple[Nexthop, ...],
    made_up: ProbeResult,
    probed: Mapping[str, ProbeResult],
) -> Finding | None:
    """For a domain without a configured control: None when the primary's rejection of
    a made-up address needs no control (an enhanced code, or no rejection); else whether
    postmaster@ stands in until a user is verified. ``probed``: addresses doctor
    probed already, with their results."""
    if not _bare_rejection(made_up):
        return None
    postmaster = f"postmaster@{domain}"
    result = probed.get(postmaster) or await engine.probe(postmaster, hops)
    if result.verdict is Verdict.VALID:
        return Finding(
            "controls",
            True,
            f"{domain}: the primary's rejections carry no enhanced status code, and its "
            f"postmaster@ is accepted: the control until a user of {domain} is verified",
        )
    return Finding(
        "controls",
        True,
        f"{domain}: the primary's rejections carry no enhanced status code (a bare "
        f"{made_up.code}) and it refuses postmaster@ ({_reply(result)}): until callahead has "
        f"verified a user of {domain}, its unknown recipients are accepted",
        f"name a user known to exist: CALLAHEAD_CONTROLS=user@{domain}",
        warn=True,
    )
