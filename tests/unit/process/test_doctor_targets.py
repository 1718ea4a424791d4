"""``callahead doctor``'s ``mx-targets`` item: an MX route's addresses that are never
probed (routing/targets.py) are named, a warning while another target is left and a
failure when none is; this host's own MX entry is not news. Scripted primaries, a
scripted DNS."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from callahead.process.config import Config, load_config
from callahead.process.doctor import probes
from callahead.process.doctor.postfixhooks import Finding
from callahead.routing.resolve import MxResolver
from callahead.routing.routes import Nexthop
from tests.harness.fixtures import StartScripted
from tests.harness.scripted import Script
from tests.unit.routing.test_resolve import SELF, FakeDns

OK = "250 2.1.5 Ok"
UNKNOWN = "550 5.1.1 <x@example.test>: Recipient address rejected: User unknown"


def doctor_primaries(monkeypatch: pytest.MonkeyPatch, dns: FakeDns, port: int) -> list[Finding]:
    """doctor's primary side for example.test, an MX route on ``port`` through ``dns``
    (127.0.0.1, the scripted primaries, let in as CALLAHEAD_MX_ALLOW_NETWORKS would)."""

    def build(config: Config) -> tuple[MxResolver, None]:
        allowed = (ipaddress.ip_network("127.0.0.1/32"),)
        return MxResolver(dns, SELF, shuffle=False, allowed=allowed), None

    monkeypatch.setattr(probes, "build_resolver", build)
    config = load_config(
        {
            "CALLAHEAD_ROUTES": f"example.test=example.test:{port}",
            "CALLAHEAD_HELO_NAME": "backup.example.net",
            "CALLAHEAD_PROBE_TIMEOUT": "3",
            "CALLAHEAD_ADMIN_SOCKET": "",
        }
    )
    routed = {"example.test": (Nexthop("example.test", port, mx=True),)}
    known = {"example.test": "user@example.test"}
    return asyncio.run(probes.check_primaries(config, routed, known))


def items(findings: list[Finding], item: str) -> list[Finding]:
    return [f for f in findings if f.item == item]


def test_a_skipped_target_beside_a_probed_one_is_a_warning(
    monkeypatch: pytest.MonkeyPatch, scripted: StartScripted
) -> None:
    primary = scripted(Script(rcpt_default=UNKNOWN, rcpt_overrides={"user@example.test": OK}))
    dns = FakeDns(
        {"example.test": [(10, "mx1.example.test"), (20, "backup.example.net")]},
        {"mx1.example.test": ["127.0.0.1", "169.254.7.7"], "backup.example.net": ["192.0.2.9"]},
    )
    findings = doctor_primaries(monkeypatch, dns, primary.port)
    [target] = items(findings, "mx-targets")
    assert (target.ok, target.warn) == (True, True)
    assert target.what == (
        "example.test: never probed: mx1.example.test 169.254.7.7 (link-local); "
        "the other MX targets are"
    )
    assert "backup.example.net" not in target.what  # this host's own entry: not news
    assert "CALLAHEAD_MX_ALLOW_NETWORKS" in target.fix
    assert all(f.ok for f in items(findings, "probe")), findings


def test_every_target_skipped_is_a_failure_and_nothing_is_connected_to(
    monkeypatch: pytest.MonkeyPatch, scripted: StartScripted
) -> None:
    decoy = scripted(Script(rcpt_default=UNKNOWN))
    dns = FakeDns(
        {"example.test": [(10, "mx.example.test")]},
        {"mx.example.test": ["127.0.0.2", "0.0.0.0"]},
    )
    findings = doctor_primaries(monkeypatch, dns, decoy.port)
    [target] = items(findings, "mx-targets")
    assert target.ok is False
    assert target.what.startswith(
        "example.test: every MX target left is skipped, never probed: "
        "mx.example.test 127.0.0.2 (loopback), mx.example.test 0.0.0.0 (unspecified)"
    )
    assert decoy.connections == 0
    [primary] = items(findings, "primary")
    assert primary.ok is False


def test_nothing_skipped_says_nothing(
    monkeypatch: pytest.MonkeyPatch, scripted: StartScripted
) -> None:
    primary = scripted(Script(rcpt_default=UNKNOWN, rcpt_overrides={"user@example.test": OK}))
    dns = FakeDns({"example.test": [(10, "mx.example.test")]}, {"mx.example.test": ["127.0.0.1"]})
    findings = doctor_primaries(monkeypatch, dns, primary.port)
    assert items(findings, "mx-targets") == []
    assert items(findings, "primary")[0].ok is True
