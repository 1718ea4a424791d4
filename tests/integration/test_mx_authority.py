"""Only the primary's word counts on MX routes, and a recipient domain that does not
exist is rejected, through a real Postfix backup, a real NSD and a real Redis.

A three-MX site, ``mxsite.test`` in a real NSD on a loopback port:

* pref 10 ``prim.mxsite.test`` (127.0.54.10:25): a stand-in primary that knows its
  users (``tests/harness/primary.py``), stopped and started by the tests;
* pref 20 ``other.mxsite.test`` (127.0.54.20:25): another backup MX, a real Postfix
  with ``relay_domains = mxsite.test`` and no ``relay_recipient_maps``, as a plain
  backup is: it accepts every address of the domain (and relays to the primary). A
  ``check_recipient_access ... WARN`` logs every RCPT it is asked;
* pref 30 ``backup.mxsite.test``: this backup (its ``myhostname``), a real Postfix with
  ``relay_domains = mxsite.test`` and no transport entry, so the domain and (Postfix's
  default ``parent_domain_matches_subdomains``) every subdomain go by
  ``relay_transport`` (``relay``: the MX of the recipient domain). callahead reads its
  routes from that configuration (plus ``mxsite.test=relay`` in ``CALLAHEAD_ROUTES``,
  the key of its catch-all state), with the catch-all check every second, the breaker
  off (every probe tries the primary first) and a real ``redis-server`` as its shared
  cache.

``nullmx.mxsite.test`` has an RFC 7505 null MX; ``zq7x.mxsite.test`` and every other
made-up subdomain do not exist (NSD answers NXDOMAIN).
"""

from __future__ import annotations

import functools
import os
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from callahead.caching.redisstore import CONTROL_PREFIX, VALID_PREFIX, valid_key
from tests.harness.callahead_process import CallaheadProcess
from tests.harness.client import send
from tests.harness.fixtures import make_workdir
from tests.harness.lifecycle import StartStop
from tests.harness.nsd import NsdServer, nsd_available
from tests.harness.ports import free_port
from tests.harness.postfix import Listener, PostfixInstance, backup_mx_main_cf, policy_listener
from tests.harness.primary import Primary
from tests.harness.redis import RedisServer, redis_server_binary
from tests.harness.waiting import wait_for

DOMAIN = "mxsite.test"
SENDER = "sender@remote.test"
PRIMARY = "127.0.54.10"
OTHER_BACKUP = "127.0.54.20"
THIS_BACKUP = "127.0.54.30"
ZONE = f"""\
$ORIGIN {DOMAIN}.
$TTL 60
@        IN SOA ns.{DOMAIN}. hostmaster.{DOMAIN}. 1 3600 600 86400 60
@        IN NS  ns.{DOMAIN}.
ns       IN A   127.0.0.1
@        IN MX  10 prim.{DOMAIN}.
@        IN MX  20 other.{DOMAIN}.
@        IN MX  30 backup.{DOMAIN}.
prim     IN A   {PRIMARY}
other    IN A   {OTHER_BACKUP}
backup   IN A   {THIS_BACKUP}
nullmx   IN MX  0 .
"""


@dataclass
class Site:
    primary: Primary
    other: PostfixInstance
    """The other backup MX (pref 20): a plain Postfix backup that accepts all."""
    backup: PostfixInstance
    """This backup (pref 30), with callahead."""
    callahead: CallaheadProcess
    redis: RedisServer
    port: int
    """This backup's smtpd port with callahead as its milter."""
    policy_port: int
    """This backup's smtpd port that asks callahead's policy service."""

    def other_saw(self, address: str) -> bool:
        """The other backup's smtpd was asked RCPT TO ``address`` (its WARN line)."""
        return f"to=<{address}>" in self.other.maillog()

    def sample(self, name: str, **labels: str) -> float | None:
        return self.callahead.samples().get((name, tuple(sorted(labels.items()))))


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    if os.geteuid() != 0:
        pytest.skip("the integration tests run a real Postfix, whose master needs root")
    if not nsd_available():
        pytest.skip("needs nsd (./dev deps installs it)")
    if redis_server_binary() is None:
        pytest.skip("needs redis-server (./dev deps installs it)")
    with make_workdir("callahead-mx-authority-") as workdir:
        started: list[StartStop] = []
        try:
            nsd = NsdServer(workdir / "nsd", {DOMAIN: ZONE})
            redis = RedisServer(workdir)
            primary = Primary([], hostname=f"prim.{DOMAIN}", host=PRIMARY, port=25)
            first: tuple[StartStop, ...] = (nsd, redis, primary)
            for server in first:
                server.start()
                started.append(server)

            other_dir = workdir / "other"
            other_dir.mkdir(mode=0o755)
            other_cf = backup_mx_main_cf(
                workdir=other_dir,
                relay_domains=[DOMAIN],
                transports={DOMAIN: f"[{PRIMARY}]:25"},
                milter=None,
                hostname=f"other.{DOMAIN}",
            )
            # Its listener names its address (master.cf); inet_interfaces stays
            # 127.0.0.1, since Postfix finds no interface with a 127.0.54.x address.
            other_cf["smtpd_recipient_restrictions"] = (
                f"check_recipient_access inline:{{{DOMAIN}=WARN}}"
            )
            other = PostfixInstance(other_dir, other_cf, [Listener(25, host=OTHER_BACKUP)])
            other.start()
            started.append(other)
            wait_for(lambda: reachable(OTHER_BACKUP, 25), 10, what="the other backup MX")

            backup_dir = workdir / "backup"
            callahead = CallaheadProcess(
                workdir,
                {
                    "CALLAHEAD_POSTFIX_CONFIG": str(backup_dir / "etc"),
                    "CALLAHEAD_ROUTES": f"{DOMAIN}=relay",
                    "CALLAHEAD_RESOLVER": nsd.resolver,
                    # The site's MX hosts are on loopback, as everything in the lab.
                    "CALLAHEAD_MX_ALLOW_NETWORKS": "127.0.54.0/24",
                    "CALLAHEAD_PROBE_TIMEOUT": "3",
                    "CALLAHEAD_CLIENT_UNKNOWN_LIMIT": "0",
                    "CALLAHEAD_BREAKER_FAILURES": "0",
                    "CALLAHEAD_CATCHALL_CHECK": "1",
                    "CALLAHEAD_REDIS_URL": redis.url,
                },
                name="callahead-mx-authority",
            )
            main_cf = backup_mx_main_cf(
                workdir=backup_dir,
                relay_domains=[DOMAIN],
                transports={},
                milter=callahead.socket,
                hostname=f"backup.{DOMAIN}",
            )
            # No transport entry: the domain and its subdomains go by relay_transport.
            main_cf["transport_maps"] = ""
            port, policy_port = free_port(), free_port()
            policy = policy_listener(policy_port, callahead.policy_service)
            backup = PostfixInstance(backup_dir, main_cf, [Listener(port), policy])
            backup.start()
            started.append(backup)
            callahead.start()
            started.append(callahead)
            yield Site(primary, other, backup, callahead, redis, port, policy_port)
        finally:
            for server in reversed(started):
                server.stop()


def logged(site: Site, line: str) -> bool:
    return line in site.callahead.log()


def ghost() -> str:
    return f"ghost-{uuid.uuid4().hex[:10]}@{DOMAIN}"


def test_while_the_primary_is_down_the_other_backups_word_decides_nothing(site: Site) -> None:
    """The primary down: the other backup (pref 20) is probed and accepts the made-up
    address, and the recipient is accepted undecided. Nothing of that answer stays: the
    primary back, the same address gets its real 550, and it was never cached, never
    written to Redis, and the domain never marked accepts-all (a catch-all check ran
    in the window)."""
    address = ghost()
    site.primary.stop()
    try:
        tx = send(site.port, SENDER, [address])
        assert tx.code(address) == 250, tx.rcpt
        wait_for(lambda: site.other_saw(address), 10, what="the other backup's RCPT")
        wait_for(
            lambda: (
                f"rcpt=<{address}> decision=accept reason=probe_tempfail" in site.callahead.log()
            ),
            5,
            what="the decision line",
        )
        # A catch-all check of mxsite.test ran while the primary was down, and the
        # other backup's 250 to its made-up address decided nothing.
        wait_for(
            lambda: (site.sample("callahead_catchall_checks_total", outcome="tempfail") or 0) >= 1,
            10,
            what="a catch-all check in the window",
        )
        assert any("to=<callahead-check-" in line for line in site.other.maillog().splitlines()), (
            "the check's made-up address reached the other backup"
        )
        # The policy service path gives the same undecided answer.
        second = ghost()
        assert send(site.policy_port, SENDER, [second]).code(second) == 250
        wait_for(lambda: site.other_saw(second), 10, what="the other backup's RCPT")
    finally:
        site.primary.start()

    for unknown in (address, second):
        shown = site.callahead.cli("cache", "show", unknown)
        assert shown.returncode == 1, shown.stdout + shown.stderr
        assert "not cached" in shown.stdout
        assert site.redis.command("EXISTS", valid_key(unknown)) == ":0"
    assert site.redis.keys(VALID_PREFIX + "*") == 0
    assert site.redis.keys(CONTROL_PREFIX + "*") == 0
    assert site.sample("callahead_domain_accepts_all", domain=DOMAIN) != 1.0
    assert site.sample("callahead_catchall_checks_total", outcome="valid") in (None, 0.0)

    # The primary back: its word is the answer, for the same address at once.
    tx = send(site.port, SENDER, [address])
    assert tx.rcpt[address][0] == 550, tx.rcpt
    assert "5.1.1" in tx.rcpt[address][1]
    assert site.primary.probes_for(address) == 1
    assert site.sample("callahead_domain_accepts_all", domain=DOMAIN) != 1.0
    # A known user is accepted through the primary, and that one is shared.
    known = f"known-{uuid.uuid4().hex[:8]}@{DOMAIN}"
    site.primary.add_user(known)
    assert send(site.port, SENDER, [known]).code(known) == 250
    wait_for(
        lambda: site.redis.command("EXISTS", valid_key(known)) == ":1", 5, what="the shared entry"
    )


@pytest.mark.parametrize("front_end", ["milter", "policy"])
def test_a_made_up_subdomain_is_rejected_550_5_1_2_and_never_queued(
    site: Site, front_end: str
) -> None:
    """``relay_domains = mxsite.test`` relays every subdomain too; one that does not
    exist (NXDOMAIN from the real NSD) or has a null MX is refused at RCPT, so the
    backup never takes mail it would bounce later (backscatter)."""
    port = site.port if front_end == "milter" else site.policy_port
    for address in (
        f"anyone-{front_end}@zq7x.{DOMAIN}",
        f"anyone-{front_end}@nullmx.{DOMAIN}",
    ):
        tx = send(port, SENDER, [address], b"Subject: backscatter\r\n\r\nbody\r\n")
        code, text = tx.rcpt[address]
        assert (code, text.split()[0]) == (550, "5.1.2"), tx.rcpt
        assert "Domain not found" in text
        assert tx.data is None  # nothing accepted, so no DATA
        line = f"rcpt=<{address}> decision=reject reason=no_domain"
        wait_for(functools.partial(logged, site, line), 5, what="the decision line")
        assert not site.other_saw(address)
        assert site.primary.probes_for(address) == 0
    assert site.backup.queue_entries() == []
