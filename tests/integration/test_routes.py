"""Routes straight from a real Postfix backup's configuration, MX routes through a real
DNS server, and SIGHUP reloads, with callahead serving behind that backup.

* The backup (a throwaway Postfix) has ``relay_domains`` and ``transport_maps`` of a
  ``hash:`` and a ``regexp:`` table; callahead runs with ``CALLAHEAD_POSTFIX_CONFIG`` set
  to its config dir and no ``CALLAHEAD_ROUTES``.
* A real NSD on a loopback port serves the ``test.`` zone: MX records for domains whose
  transport entry is ``relay`` or ``smtp:`` (the MX hosts of the recipient domain). The
  MX hosts listen on port 25 of their own loopback addresses (127.0.53.x); the backup's
  own MX entry (``backup.test``, its myhostname) is a decoy that rejects everyone, so a
  probe that reached it would show as a 550.
* MX targets a domain's DNS must not send probes to: ``loopy.test``'s MX hosts are at
  127.0.0.2 (loopback, outside ``CALLAHEAD_MX_ALLOW_NETWORKS``, a decoy listening) and
  0.0.0.0 (a connect there reaches this host); ``own.test``'s is at 127.0.0.1, the
  backup's ``inet_interfaces``. The lab's own MX hosts are on 127.0.53.0/24 and
  127.0.55.0/24, which ``CALLAHEAD_MX_ALLOW_NETWORKS`` lets in.
* SIGHUP re-reads what this host is: after the backup's ``myhostname``,
  ``inet_interfaces`` or ``proxy_interfaces`` names ``mover.test`` (the one MX host of
  ``moving.test``, on 127.0.55.40), that host is this one and is never probed; changed
  back, it is probed again.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness.callahead_process import CallaheadProcess
from tests.harness.client import send
from tests.harness.fixtures import make_workdir
from tests.harness.lifecycle import StartStop
from tests.harness.nsd import NsdServer, nsd_available
from tests.harness.ports import free_port
from tests.harness.postfix import (
    POLICY_SNIPPET,
    POSTCONF,
    POSTMAP,
    SNIPPET,
    Listener,
    PostfixInstance,
    backup_mx_main_cf,
    policy_overrides,
)
from tests.harness.primary import Primary
from tests.harness.scripted import Script, ScriptedServer
from tests.harness.waiting import wait_for

SENDER = "sender@remote.test"
MX_PRIMARY = "127.0.53.10"
MX_DEAD = "127.0.53.11"
MX_SELF = "127.0.53.20"
MX_LOW = "127.0.53.30"
MX_LOOP = "127.0.0.2"
"""A loopback address outside CALLAHEAD_MX_ALLOW_NETWORKS: never probed."""
ALLOWED_NETWORKS = "127.0.53.0/24 127.0.55.0/24"
MX_MOVER = "127.0.55.40"
"""Added to lo while inet_interfaces lists it (postmap refuses an address that is on no
interface of this host)."""
ZONE = f"""\
$ORIGIN test.
$TTL 60
@        IN SOA ns.test. hostmaster.test. 1 3600 600 86400 60
@        IN NS  ns.test.
ns       IN A   127.0.0.1
up       IN MX  10 prim.test.
up       IN MX  20 backup.test.
up       IN MX  30 low.test.
down     IN MX  10 dead.test.
down     IN MX  20 backup.test.
down     IN MX  30 low.test.
prim     IN A   {MX_PRIMARY}
dead     IN A   {MX_DEAD}
backup   IN A   {MX_SELF}
low      IN A   {MX_LOW}
moving   IN MX  10 mover.test.
mover    IN A   {MX_MOVER}
loopy    IN MX  10 lo.test.
loopy    IN MX  10 zero.test.
lo       IN A   {MX_LOOP}
zero     IN A   0.0.0.0
own      IN MX  10 ownhost.test.
ownhost  IN A   127.0.0.1
"""
DECOY = Script(rcpt_default="550 5.1.1 decoy: this MX must never be probed")


@dataclass
class Routed:
    backup: PostfixInstance
    callahead: CallaheadProcess
    port: int
    """The backup's smtpd port with callahead attached."""
    primary: Primary
    """Reached through the hash: map (literal nexthops)."""
    rx_primary: Primary
    """Reached through the regexp: map only."""
    mx_primary: Primary
    """The best MX of up.test, on 127.0.53.10:25."""
    decoys: list[ScriptedServer]
    """This host's own MX entry, the one after it, and loopy.test's MX host at
    127.0.0.2: never to be probed."""
    mover: Primary
    """The one MX host of moving.test, on 127.0.55.40:25: this host once the backup's
    myhostname, inet_interfaces or proxy_interfaces says so."""
    maps: Path
    policy_port: int
    """The backup's smtpd port that asks callahead's policy service instead."""

    def transport(self, extra: str = "") -> None:
        """Rewrite the hash: transport map (as an administrator does: edit, postmap)."""
        text = TRANSPORT.format(port=self.primary.port) + extra
        (self.maps / "transport").write_text(text)
        postmap(self.backup, self.maps / "transport")

    def sighup(self, outcome: str) -> None:
        """SIGHUP callahead and wait for its log line saying ``outcome``."""
        before = self.callahead.log().count(outcome)
        pid = self.callahead.pid
        assert pid is not None
        os.kill(pid, signal.SIGHUP)
        wait_for(lambda: self.callahead.log().count(outcome) > before, 10, what=outcome)


TRANSPORT = """\
hashed.test      smtp:[127.0.0.1]:{port}
.parent.test     smtp:[127.0.0.1]:{port}
up.test          relay
down.test        smtp:
nxdomain.test    relay
unserved.example relay
later.test       smtp:[127.0.0.1]:{port}
moving.test      relay
loopy.test       relay
own.test         relay
"""
RELAY_DOMAINS = (
    # parent.test matches its subdomains too (Postfix's default parent_domain_matches_...)
    "hashed.test parent.test rx.test up.test down.test nxdomain.test new.test later.test "
    "unserved.example moving.test loopy.test own.test"
)


def postmap(backup: PostfixInstance, source: Path) -> None:
    subprocess.run([POSTMAP, "-c", str(backup.config_dir), f"hash:{source}"], check=True)
    past = source.stat().st_mtime - 10
    os.utime(source.with_suffix(".db"), (past, past))


@pytest.fixture(scope="module")
def routed() -> Iterator[Routed]:
    if os.geteuid() != 0:
        pytest.skip("the integration tests run a real Postfix, whose master needs root")
    if not nsd_available():
        pytest.skip("needs nsd (./dev deps installs it)")
    with make_workdir("callahead-routes-") as workdir:
        servers: list[StartStop] = []
        try:
            primary = Primary([], hostname="hash-primary.test")
            rx_primary = Primary([], hostname="rx-primary.test")
            mx_primary = Primary([], hostname="prim.test", host=MX_PRIMARY, port=25)
            decoys = [ScriptedServer(DECOY, host=h, port=25) for h in (MX_SELF, MX_LOW, MX_LOOP)]
            mover = Primary([], hostname="mover.test", host=MX_MOVER, port=25)
            nsd = NsdServer(workdir / "nsd", {"test": ZONE})
            for server in (primary, rx_primary, mx_primary, *decoys, mover, nsd):
                server.start()
                servers.append(server)
            maps = workdir / "maps"
            maps.mkdir(mode=0o755)
            (maps / "transport").write_text(TRANSPORT.format(port=primary.port))
            (maps / "transport.re").write_text(
                f"/@rx\\.test$/ smtp:[127.0.0.1]:{rx_primary.port}\n"
            )
            backup_dir = workdir / "backup"
            callahead = CallaheadProcess(
                workdir,
                {
                    "CALLAHEAD_POSTFIX_CONFIG": str(backup_dir / "etc"),
                    "CALLAHEAD_RESOLVER": nsd.resolver,
                    "CALLAHEAD_MX_ALLOW_NETWORKS": ALLOWED_NETWORKS,
                    "CALLAHEAD_PROBE_TIMEOUT": "3",
                    "CALLAHEAD_CLIENT_UNKNOWN_LIMIT": "0",
                },
                name="callahead-routes",
            )
            main_cf = backup_mx_main_cf(
                SNIPPET,
                workdir=backup_dir,
                relay_domains=[],
                transports={},
                milter=callahead.socket,
            )
            main_cf["relay_domains"] = RELAY_DOMAINS
            main_cf["transport_maps"] = f"regexp:{maps}/transport.re, hash:{maps}/transport"
            port, policy_port = free_port(), free_port()
            policy = policy_overrides(POLICY_SNIPPET, callahead.policy_service)
            backup = PostfixInstance(
                backup_dir, main_cf, [Listener(port), Listener(policy_port, policy)]
            )
            backup.start()
            callahead.start()
            servers.append(callahead)
            yield Routed(
                backup,
                callahead,
                port,
                primary,
                rx_primary,
                mx_primary,
                decoys,
                mover,
                maps,
                policy_port,
            )
        finally:
            for server in reversed(servers):
                server.stop()


def rcpt(routed: Routed, address: str) -> int:
    return send(routed.port, SENDER, [address]).code(address)


def test_hash_map_domain_and_parent_domain_are_probed_at_their_primary(routed: Routed) -> None:
    known = "known@hashed.test"
    routed.primary.add_user(known)
    assert rcpt(routed, known) == 250
    assert rcpt(routed, "nobody@hashed.test") == 550
    # .parent.test in the hash: map routes a subdomain.
    assert rcpt(routed, "nobody@a.b.parent.test") == 550
    assert routed.primary.probes_for(known) == 1
    assert routed.primary.probes_for("nobody@hashed.test") == 1
    assert routed.primary.probes_for("nobody@a.b.parent.test") == 1


def test_regexp_map_routes_by_the_whole_address(routed: Routed) -> None:
    assert rcpt(routed, "nobody@rx.test") == 550
    assert routed.rx_primary.probes_for("nobody@rx.test") == 1
    assert routed.primary.probes_for("nobody@rx.test") == 0


def test_relay_route_probes_the_best_mx_found_in_dns(routed: Routed) -> None:
    known = "known@up.test"
    routed.mx_primary.add_user(known)
    assert rcpt(routed, known) == 250
    assert rcpt(routed, "nobody@up.test") == 550
    assert routed.mx_primary.probes_for(known) == 1
    assert routed.mx_primary.probes_for("nobody@up.test") == 1
    assert all(decoy.connections == 0 for decoy in routed.decoys)


def test_the_policy_service_finds_the_same_routes(routed: Routed) -> None:
    """Through check_policy_service the lookups run on the probe loop itself (awaited,
    never waited for): hash, regexp and MX routes alike."""
    for address, primary in (
        ("policy@hashed.test", routed.primary),
        ("policy@rx.test", routed.rx_primary),
        ("policy@up.test", routed.mx_primary),
    ):
        tx = send(routed.policy_port, SENDER, [address])
        assert tx.code(address) == 550, address
        assert primary.probes_for(address) == 1, address
    assert all(decoy.connections == 0 for decoy in routed.decoys)


def test_this_hosts_own_mx_entry_and_later_ones_are_never_probed(routed: Routed) -> None:
    # down.test's best MX refuses connections; the next ones are this host (backup.test,
    # the backup's myhostname) and a lower one: both decoys that would answer 550.
    assert rcpt(routed, "nobody@down.test") == 250
    assert all(decoy.connections == 0 for decoy in routed.decoys)
    wait_for(
        lambda: (
            "rcpt=<nobody@down.test> decision=accept reason=probe_tempfail"
            in routed.callahead.log()
        ),
        5,
        what="the decision line",
    )


def logged(routed: Routed, line: str) -> None:
    wait_for(lambda: line in routed.callahead.log(), 5, what=line)


def test_mx_hosts_at_loopback_unspecified_or_own_addresses_are_never_probed(
    routed: Routed,
) -> None:
    """loopy.test's MX hosts are at 127.0.0.2 (a decoy listens there) and 0.0.0.0;
    own.test's at 127.0.0.1, where this backup listens. Nothing is probed: each
    recipient is accepted undecided (route_failed), never refused; each skipped target
    is logged once, and ``probe --explain`` names them."""
    for address in ("first@loopy.test", "second@loopy.test", "nobody@own.test"):
        assert rcpt(routed, address) == 250, address
        logged(routed, f"rcpt=<{address}> decision=accept reason=route_failed")
    assert all(decoy.connections == 0 for decoy in routed.decoys)
    log = routed.callahead.log()
    for skipped in (
        "MX host lo.test of loopy.test is at 127.0.0.2, loopback: never probed",
        "MX host zero.test of loopy.test is at 0.0.0.0, unspecified: never probed",
    ):
        assert log.count(skipped) == 1, skipped  # two recipients, one line

    explained = routed.callahead.cli("probe", "--explain", "nobody@loopy.test")
    assert explained.returncode == 2, explained
    out = explained.stdout
    assert out.startswith("tempfail: nobody@loopy.test"), out
    assert "MX targets never probed:" in out
    assert "\n  lo.test 127.0.0.2 (loopback)\n" in out
    assert "\n  zero.test 0.0.0.0 (unspecified)\n" in out
    assert "  (nothing was said)" in out
    own = routed.callahead.cli("probe", "--explain", "nobody@own.test")
    assert own.returncode == 2, own
    assert "this host is the best MX host of own.test" in own.stdout
    assert "\n  ownhost.test 127.0.0.1 (this host)\n" in own.stdout
    assert all(decoy.connections == 0 for decoy in routed.decoys)


def test_a_dns_failure_is_undecided_not_rejected(routed: Routed) -> None:
    """nsd serves no zone for unserved.example: it answers REFUSED, a DNS failure that
    says nothing about the recipient domain."""
    assert rcpt(routed, "nobody@unserved.example") == 250
    wait_for(
        lambda: (
            "rcpt=<nobody@unserved.example> decision=accept reason=route_failed"
            in routed.callahead.log()
        ),
        5,
        what="the decision line",
    )


def test_nxdomain_of_the_recipient_domain_is_rejected_550_5_1_2(routed: Routed) -> None:
    tx = send(routed.port, SENDER, ["nobody@nxdomain.test"])
    code, text = tx.rcpt["nobody@nxdomain.test"]
    assert (code, text.split()[0]) == (550, "5.1.2"), tx.rcpt
    wait_for(
        lambda: (
            "rcpt=<nobody@nxdomain.test> decision=reject reason=no_domain" in routed.callahead.log()
        ),
        5,
        what="the decision line",
    )


def test_sighup_routes_a_new_domain_and_a_broken_change_keeps_the_old_routes(
    routed: Routed,
) -> None:
    # new.test is relayed but has no transport entry: its MX is looked up, and the
    # domain does not exist (NXDOMAIN), so the recipient is refused (550 5.1.2).
    assert rcpt(routed, "first@new.test") == 550
    assert routed.primary.probes_for("first@new.test") == 0

    routed.transport(f"new.test smtp:[127.0.0.1]:{routed.primary.port}\n")
    routed.sighup("SIGHUP: routes reloaded")
    assert rcpt(routed, "second@new.test") == 550
    assert routed.primary.probes_for("second@new.test") == 1

    # A broken change: main.cf names a table that does not exist (the backup's Postfix is
    # not reloaded: it would refuse mail itself). callahead says so and keeps the old
    # configuration, whose tables still route a domain not asked before.
    good = routed.backup.main_cf["transport_maps"]
    set_main_cf(routed.backup, "transport_maps", f"hash:{routed.maps}/missing")
    try:
        routed.sighup("SIGHUP: reload failed, keeping the old routes")
        assert "missing" in routed.callahead.log().rsplit("SIGHUP: reload failed", 1)[1]
        assert rcpt(routed, "nobody@later.test") == 550
        assert routed.primary.probes_for("nobody@later.test") == 1
        assert not routed.callahead.exited()
    finally:
        set_main_cf(routed.backup, "transport_maps", good)


def set_main_cf(backup: PostfixInstance, name: str, value: str) -> None:
    """Edit main.cf with ``postconf -e`` without reloading that Postfix."""
    subprocess.run([POSTCONF, "-c", str(backup.config_dir), "-e", f"{name}={value}"], check=True)
    main_cf = backup.config_dir / "main.cf"
    past = main_cf.stat().st_mtime - 10
    os.utime(main_cf, (past, past))


@contextlib.contextmanager
def loopback_address(address: str) -> Iterator[None]:
    """``address``/32 on lo while the block runs (left alone if it was there already)."""
    added = subprocess.run(
        ["ip", "addr", "add", f"{address}/32", "dev", "lo"], capture_output=True, check=False
    )
    try:
        yield
    finally:
        if added.returncode == 0:
            subprocess.run(["ip", "addr", "del", f"{address}/32", "dev", "lo"], check=False)


@pytest.mark.parametrize(
    ("setting", "now_this_host"),
    [
        ("myhostname", "mover.test"),
        ("inet_interfaces", f"127.0.0.1, {MX_MOVER}"),
        ("proxy_interfaces", MX_MOVER),
    ],
)
def test_sighup_rereads_this_host_and_skips_the_mx_host_it_now_is(
    routed: Routed, setting: str, now_this_host: str
) -> None:
    """mover.test is moving.test's only MX host: probed while it is another host; once
    the backup's main.cf says it is this one (by name or by address) and callahead has
    had SIGHUP, it is this host as the best MX: nothing to probe, the recipient is
    accepted (route_failed); changed back and SIGHUP again, it is probed again."""
    before = f"before-{setting}@moving.test"
    assert rcpt(routed, before) == 550
    assert routed.mover.probes_for(before) == 1

    old = routed.backup.main_cf.get(setting, "")
    with loopback_address(MX_MOVER) if setting == "inet_interfaces" else contextlib.nullcontext():
        set_main_cf(routed.backup, setting, now_this_host)
        try:
            routed.sighup("SIGHUP: routes reloaded")
            during = f"during-{setting}@moving.test"
            assert rcpt(routed, during) == 250
            assert routed.mover.probes_for(during) == 0
            wait_for(
                lambda: (
                    f"rcpt=<{during}> decision=accept reason=route_failed" in routed.callahead.log()
                ),
                5,
                what="the decision line",
            )
            assert "this host among MX hosts (never probed) is now:" in routed.callahead.log()
        finally:
            set_main_cf(routed.backup, setting, old)
            routed.sighup("SIGHUP: routes reloaded")
    after = f"after-{setting}@moving.test"
    assert rcpt(routed, after) == 550
    assert routed.mover.probes_for(after) == 1
    assert all(decoy.connections == 0 for decoy in routed.decoys)


def test_sighup_does_not_stop_the_milter_and_sigterm_still_does() -> None:
    """libmilter's own signal thread would take SIGHUP as a stop: callahead's main thread
    must take it instead, while SIGTERM still reaches libmilter."""
    if os.geteuid() != 0:
        pytest.skip("runs like the other integration tests, as root")
    with make_workdir("callahead-sighup-") as workdir:
        process = CallaheadProcess(workdir, {"CALLAHEAD_ROUTES": "example.test=[127.0.0.1]:9"})
        process.start()
        try:
            pid = process.pid
            assert pid is not None

            def reloaded() -> int:
                return process.log().count("SIGHUP: routes reloaded")

            def wait_reloads(want: int) -> None:
                wait_for(lambda: reloaded() >= want, 10, what=f"reload {want}")

            for reloads in range(1, 4):
                os.kill(pid, signal.SIGHUP)
                wait_reloads(reloads)
            assert process.log().count("SIGHUP: routes reloaded") == 3
            assert not process.exited()
            assert "callahead_probe_loop_up 1.0" in process.scrape()
            os.kill(pid, signal.SIGTERM)
            wait_for(process.exited, 15, what="callahead to exit after SIGTERM")
            assert process.returncode == 0, process.log()
        finally:
            process.stop()
