"""``callahead probe ADDRESS [--explain]``: one probe with the configuration of ``serve``
and no cache (as ``serve`` before it has verified a user of the domain: its controls are
``CALLAHEAD_CONTROLS`` and postmaster@); with ``--explain``, the MX targets never
probed, the SMTP transcript, the line that decided and why it was classified so."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from ..base.address import UnsendableAddress, normalize_recipient, wire_address
from ..caching.cache import PositiveCache
from ..caching.controls import Controls
from ..probing.engine import ProbeEngine
from ..routing.postfixmaps import PostfixRoutes
from ..routing.router import describe_routes
from ..routing.routes import Nexthop, RouteUnavailable
from ..routing.targets import SkippedTarget
from ..smtp.verdict import ProbeResult, Verdict
from .assembly import build_resolver, engine_settings
from .config import EX_CONFIG, Config
from .startchecks import helo_warning

EX_USAGE = 64
PROBE_EXIT = {Verdict.VALID: 0, Verdict.UNKNOWN: 1, Verdict.TEMPFAIL: 2}


def routes_source(config: Config) -> str:
    postfix = None if config.postfix is None else PostfixRoutes(config.postfix)
    return describe_routes(config.routes, postfix)


def no_routes(config: Config) -> bool:
    return not config.routes and config.postfix is None


def run_probe(config: Config, address_arg: str, *, explain: bool = False) -> int:
    if no_routes(config):
        print(
            "callahead: CALLAHEAD_ROUTES and CALLAHEAD_POSTFIX_CONFIG are empty: "
            "no primary to probe",
            file=sys.stderr,
        )
        return EX_CONFIG
    normalized = normalize_recipient(address_arg)
    if normalized is None:
        print(
            f"callahead: {address_arg!r} is not an address (expected user@domain)", file=sys.stderr
        )
        return EX_USAGE
    address = normalized.address
    try:
        wire_address(address, allow_utf8=True)
    except UnsendableAddress as exc:
        print(f"callahead: {address_arg!r} cannot be probed: {exc}", file=sys.stderr)
        return EX_USAGE
    warning = helo_warning(config.helo_name)
    if warning:
        print(f"callahead: warning: {warning}", file=sys.stderr)

    async def routes() -> tuple[Nexthop, ...]:
        hops = config.routes.lookup(normalized.domain)
        if hops or config.postfix is None:
            return hops
        return await PostfixRoutes(config.postfix).lookup(normalized.domain, address)

    async def once() -> int:
        try:
            hops = await routes()
        except RouteUnavailable as exc:
            print(f"callahead: the route of {normalized.domain!r} is unknown: {exc}")
            return PROBE_EXIT[Verdict.TEMPFAIL]
        if not hops:
            print(
                f"callahead: no route for {normalized.domain!r} in {routes_source(config)}",
                file=sys.stderr,
            )
            return EX_USAGE
        resolver, _ = build_resolver(config)
        skipped: tuple[SkippedTarget, ...] = ()
        if explain and any(hop.mx for hop in hops):
            skipped, _ = await resolver.left_out(hops, normalized.domain)
        engine = ProbeEngine(
            engine_settings(config, transcript=explain),
            resolver=resolver,
            controls=Controls(PositiveCache(ttl=0, maxsize=0), None, config.controls),
        )
        result = await engine.probe(address, hops)
        code = "no reply" if result.code is None else str(result.code)
        print(
            f"{result.verdict.value}: {address} at {result.primary}: {code} at "
            f"{result.stage.value.upper()} ({result.duration * 1000:.1f} ms): {result.detail}"
        )
        if explain:
            print(explanation(result, skipped))
        await engine.aclose()
        return PROBE_EXIT[result.verdict]

    return asyncio.run(once())


def explanation(result: ProbeResult, skipped: Sequence[SkippedTarget] = ()) -> str:
    """What ``probe --explain`` prints after the verdict line: the MX targets left out
    (``skipped``), the transcript, the line that decided and why."""
    lines = []
    if skipped:
        lines.append("MX targets never probed:")
        lines += [f"  {target}" for target in skipped]
    lines.append("transcript:")
    lines += [f"  {line}" for line in result.transcript] or ["  (nothing was said)"]
    if result.code is None:
        lines.append(f"decided by: no reply at {result.stage.value.upper()} ({result.detail})")
    else:
        first, *_ = result.detail.split("\n")
        lines.append(f"decided by: {result.code} {first} (at {result.stage.value.upper()})")
    lines.append(f"classified: {result.verdict.value} ({result.basis.value}): {result.why}")
    return "\n".join(lines)
