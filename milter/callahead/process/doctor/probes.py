"""``callahead doctor``, the primary side: every relay domain of the backup has a
route, every primary answers and takes the probes' EHLO name, a real address there is
valid, a made-up one is unknown (or the domain is reported as catch-all), and the
prober is not refused. An MX route's targets that are never probed (loopback,
unspecified, link-local, multicast: routing/targets.py) are named (``mx-targets``).

One domain per distinct route is probed (domains behind one primary tell the same
thing), with the engine ``serve`` uses, without a cache. The real address is the one
given with ``--known`` for that domain, else its ``CALLAHEAD_CONTROLS`` address, else one
the running ``serve`` verified recently (asked over the admin socket), else postmaster@.
What protects a domain before any of its users is verified is the ``controls`` item
(controls.py).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

from ...base.address import normalize_domain
from ...frontends.adminclient import AdminUnavailable, ask
from ...probing.engine import ProbeEngine
from ...routing.postfixmaps import PostfixRoutes
from ...routing.postfixsettings import (
    PostfixConfigError,
    direct,
    is_table,
    load_settings,
    relay_patterns,
    run,
    split_list,
    tool,
)
from ...routing.routes import Nexthop, RouteUnavailable
from ...routing.targets import AFTER_THIS_HOST, THIS_HOST, SkippedTarget, describe
from ...smtp.verdict import Basis, ProbeResult, Stage, Verdict
from ..assembly import build_resolver, engine_settings
from ..config import Config
from .controls import configured_controls, configured_finding, postmaster_finding
from .postfixhooks import Finding
from .postfixview import PostfixView

MAX_PRIMARIES = 50
"""Distinct routes probed at most; the rest are named, not probed."""


def relay_domains(view: PostfixView) -> tuple[list[str], list[Finding]]:
    """The domains in the backup's ``relay_domains`` (tables listed with ``postmap
    -s`` where their type allows), and a note for each table that cannot be listed."""
    notes: list[Finding] = []
    try:
        patterns = relay_patterns(load_settings(view.config_dir))
    except PostfixConfigError as exc:
        return [], [
            Finding(
                "routes",
                False,
                f"cannot read relay_domains: {exc}",
                "fix the Postfix configuration (postfix check)",
            )
        ]
    domains: list[str] = []
    for pattern in patterns:
        if pattern.startswith("!"):
            continue
        if not is_table(pattern):
            domains.append(pattern.lstrip("."))
            continue
        table = direct(pattern)
        if table.startswith("inline:{"):
            domains += [item.partition("=")[0] for item in split_list(table[len("inline:{") : -1])]
            continue
        listed = run([tool("postmap"), "-c", view.config_dir, "-s", table])
        if listed.returncode != 0:
            notes.append(
                Finding(
                    "routes", None, f"{pattern} cannot be listed: its domains are not checked here"
                )
            )
            continue
        domains += [line.split()[0] for line in listed.stdout.splitlines() if line.split()]
    return list(dict.fromkeys(normalize_domain(d) for d in domains if d)), notes


async def check_routes(
    config: Config, domains: Sequence[str]
) -> tuple[list[Finding], dict[str, tuple[Nexthop, ...]]]:
    """What ``serve`` would probe for each domain: CALLAHEAD_ROUTES, else the Postfix
    maps of CALLAHEAD_POSTFIX_CONFIG (one reader for every domain)."""
    findings: list[Finding] = []
    routed: dict[str, tuple[Nexthop, ...]] = {}
    postfix = None if config.postfix is None else PostfixRoutes(config.postfix)
    for domain in domains:
        try:
            hops = config.routes.lookup(domain)
            if not hops and postfix is not None:
                hops = await postfix.lookup(domain, f"postmaster@{domain}")
        except RouteUnavailable as exc:
            findings.append(
                Finding(
                    "routes",
                    False,
                    f"{domain}: the route lookup failed: {exc}",
                    "fix the table CALLAHEAD_POSTFIX_CONFIG reads",
                )
            )
            continue
        if not hops:
            findings.append(
                Finding(
                    "routes",
                    False,
                    f"{domain} is in relay_domains but callahead has no route for it: every "
                    "recipient there is accepted unverified",
                    f"add {domain}=[primary]:25 to CALLAHEAD_ROUTES, or set "
                    "CALLAHEAD_POSTFIX_CONFIG=/etc/postfix",
                )
            )
            continue
        routed[domain] = hops
        findings.append(Finding("routes", True, f"{domain} -> {', '.join(map(str, hops))}"))
    if not domains:
        findings.append(
            Finding(
                "routes",
                False,
                "relay_domains is empty: this host is a backup MX for no domain",
                "relay_domains = example.com",
            )
        )
    return findings, routed


def verified_address(config: Config, domain: str) -> str | None:
    """A recipient of ``domain`` the running ``serve`` verified recently, if it
    answers on its admin socket and knows one."""
    if not config.admin_socket:
        return None
    try:
        answer = ask(config.admin_socket, {"op": "cache-recent", "domain": domain})
    except AdminUnavailable:
        return None
    if isinstance(answer, dict) and answer.get("ok"):
        addresses = answer.get("addresses")
        if isinstance(addresses, list) and addresses and isinstance(addresses[0], str):
            return addresses[0]
    return None


class _Known:
    """The real address as the made-up probe's control."""

    def __init__(self, known: Mapping[str, str]) -> None:
        self._known = known

    async def controls(self, domain: str) -> tuple[str, ...]:
        address = self._known.get(domain)
        return () if address is None else (address,)

    def stale(self, address: str) -> None:
        """A doctor run asks once: nothing to forget."""


def _reply(result: ProbeResult) -> str:
    code = "no reply" if result.code is None else str(result.code)
    first = result.detail.split("\n", 1)[0]
    return f"{code} {first} at {result.stage.value.upper()}"


def _reached(result: ProbeResult) -> bool:
    return result.reached and result.stage not in (Stage.CONNECT, Stage.BANNER)


def _primary_finding(domain: str, result: ProbeResult, helo: str) -> Finding:
    where = f"{result.primary or domain} ({domain})"
    if not _reached(result):
        return Finding(
            "primary",
            False,
            f"{where} cannot be reached: {_reply(result)}",
            "check the route, the primary and the firewall between them",
        )
    helo_refused = result.basis is Basis.PROBER and "helo" in result.detail.lower()
    if (result.stage is Stage.EHLO and result.verdict is Verdict.TEMPFAIL) or helo_refused:
        # smtpd_delay_reject (Postfix's default) gives a HELO reject at RCPT TO.
        return Finding(
            "primary",
            False,
            f"{where} refuses the EHLO name {helo!r}: {_reply(result)}",
            "set CALLAHEAD_HELO_NAME to this host's public name (with A and PTR)",
        )
    return Finding("primary", True, f"{where} answers and takes EHLO {helo}")


def _probe_findings(
    domain: str, known: str, real: ProbeResult, made_up: str, fake: ProbeResult
) -> list[Finding]:
    findings: list[Finding] = []
    for result in (real, fake):
        if result.basis.refuses_prober and _reached(result):
            findings.append(
                Finding(
                    "prober",
                    False,
                    f"{result.primary} refuses the prober ({result.basis.value}): {_reply(result)}",
                    "let this host's probes in on the primary (its client and HELO checks, "
                    "MAIL FROM:<>), or set CALLAHEAD_FALLBACK_SENDER",
                )
            )
            return findings
    findings.append(Finding("prober", True, f"{domain}: the primary judges recipients"))
    if real.verdict is Verdict.VALID:
        findings.append(Finding("probe", True, f"{known} is valid"))
    else:
        postmaster = known.startswith("postmaster@")
        findings.append(
            Finding(
                "probe",
                False,
                f"{known} is {real.verdict.value} ({real.basis.value}): {_reply(real)}",
                "name a real user: callahead doctor --known user@" + domain
                if postmaster
                else f"check that {known} exists at the primary",
            )
        )
    if fake.verdict is Verdict.UNKNOWN:
        findings.append(Finding("probe", True, f"a made-up {made_up} is unknown: refused with 550"))
    elif fake.verdict is Verdict.VALID:
        findings.append(
            Finding(
                "probe",
                True,
                f"{domain} accepts every address (catch-all): callahead can refuse nobody there",
            )
        )
    else:
        findings.append(
            Finding(
                "probe",
                False,
                f"a made-up {made_up} is undecided ({fake.basis.value}: {fake.why}): "
                f"{_reply(fake)}",
                "callahead cannot refuse unknown users there: see callahead probe --explain",
            )
        )
    return findings


def _target_findings(
    domain: str, skipped: Sequence[SkippedTarget], any_left: bool
) -> list[Finding]:
    """The MX targets of ``domain`` never probed (not this host's own entry, which every
    backup's MX list holds): a warning while others are left, a failure when none is."""
    unsafe = [t for t in skipped if t.why not in (THIS_HOST, AFTER_THIS_HOST)]
    if not unsafe:
        return []
    fix = (
        "point the MX records at the primary's real address (a lab whose primaries run on "
        "loopback lists their network in CALLAHEAD_MX_ALLOW_NETWORKS)"
    )
    if any_left:
        return [
            Finding(
                "mx-targets",
                True,
                f"{domain}: never probed: {describe(unsafe)}; the other MX targets are",
                fix,
                warn=True,
            )
        ]
    return [
        Finding(
            "mx-targets",
            False,
            f"{domain}: every MX target left is skipped, never probed: {describe(unsafe)}; "
            "every recipient there gets the tempfail action (route_failed)",
            fix,
        )
    ]


async def check_primaries(
    config: Config, routed: Mapping[str, tuple[Nexthop, ...]], known: Mapping[str, str]
) -> list[Finding]:
    """One domain per distinct route: its primary, its prober and its probes."""
    by_route: dict[tuple[Nexthop, ...], str] = {}
    for domain, hops in routed.items():
        by_route.setdefault(hops, domain)
    chosen = list(by_route.values())
    findings: list[Finding] = []
    if len(chosen) > MAX_PRIMARIES:
        findings.append(
            Finding("primary", None, f"{len(chosen) - MAX_PRIMARIES} more routes not probed")
        )
        chosen = chosen[:MAX_PRIMARIES]
    configured = configured_controls(config)
    reals = {
        d: known.get(d) or configured.get(d) or verified_address(config, d) or f"postmaster@{d}"
        for d in chosen
    }
    resolver, _ = build_resolver(config)
    valid: dict[str, str] = {}
    """The real addresses found valid: controls of the made-up probes (one refused is
    no control: it would read as drift)."""
    engine = ProbeEngine(engine_settings(config), resolver=resolver, controls=_Known(valid))
    try:
        for domain in chosen:
            if any(hop.mx for hop in routed[domain]):
                findings += _target_findings(
                    domain, *await resolver.left_out(routed[domain], domain)
                )
            real = await engine.probe(reals[domain], routed[domain])
            if real.verdict is Verdict.VALID:
                valid[domain] = reals[domain]
            made_up = f"callahead-doctor-{secrets.token_hex(6)}@{domain}"
            fake = await engine.probe(made_up, routed[domain])
            primary = _primary_finding(domain, real, config.helo_name)
            findings.append(primary)
            if primary.ok:
                findings += _probe_findings(domain, reals[domain], real, made_up, fake)
                control = configured.get(domain)
                if control is not None:
                    done = real if reals[domain] == control else None
                    findings.append(await configured_finding(engine, routed[domain], control, done))
                else:
                    found = await postmaster_finding(
                        engine, domain, routed[domain], fake, {reals[domain]: real}
                    )
                    findings += [] if found is None else [found]
        findings += await _other_controls(engine, configured, routed, chosen)
    finally:
        await engine.aclose()
    return findings


async def _other_controls(
    engine: ProbeEngine,
    configured: Mapping[str, str],
    routed: Mapping[str, tuple[Nexthop, ...]],
    probed: Sequence[str],
) -> list[Finding]:
    """The ``CALLAHEAD_CONTROLS`` of domains not probed above: each is probed (a wrong
    one makes its domain's rejections read as drift); one of a domain callahead does
    not route is never asked."""
    findings: list[Finding] = []
    for domain, control in list(configured.items())[:MAX_PRIMARIES]:
        if domain in probed:
            continue
        if domain not in routed:
            findings.append(
                Finding(
                    "controls",
                    True,
                    f"CALLAHEAD_CONTROLS names {control}, but {domain} is not a relay domain "
                    "with a route: it is never asked",
                    f"remove it, or add {domain} to relay_domains",
                    warn=True,
                )
            )
            continue
        findings.append(await configured_finding(engine, routed[domain], control, None))
    return findings
