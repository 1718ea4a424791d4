"""The system tests: callahead installed from its .deb and run by its own unit under a
real systemd, in a booted Debian 12 container (``tests.harness.container``), behind the
container's Debian Postfix (a real system service, configured from
deploy/postfix-main.cf, smtpd chrooted as Debian ships it), probing a stand-in primary
on the host. Every test here is marked ``system`` (``pytest -m system``).

Addresses: the primary listens on 127.0.70.1, the container's Postfix (port 25, the
milter; port 2525, the policy service) and callahead's metrics on 127.0.70.2, both
added to ``lo`` by the fixture and removed after.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.harness import debpkg
from tests.harness.container import Container, loopback_addresses
from tests.harness.ports import free_port
from tests.harness.primary import Primary
from tests.harness.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
PRIMARY_HOST = "127.0.70.1"
BACKUP_HOST = "127.0.70.2"
POLICY_PORT = 2525
DOMAIN = "example.test"
SOCKET_DIR = "/var/spool/postfix/callahead"
KNOWN = ("alice@example.test", "bob@example.test", "carol@example.test")
START_TIMEOUT = 30.0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.system)


@dataclass
class System:
    container: Container
    primary: Primary
    timings: dict[str, float] = field(default_factory=dict)

    def sh(self, script: str, *, check: bool = True, timeout: float = 60.0) -> str:
        return self.container.sh(script, check=check, timeout=timeout)

    def unit(self, prop: str) -> str:
        return self.sh(f"systemctl show -p {prop} --value callahead").strip()

    def wait_active(self) -> int:
        """Wait until the unit is active (READY=1 sent); its main pid."""

        def ready() -> int:  # 0 (falsy) until active with a main pid
            if self.unit("ActiveState") != "active":
                return 0
            return int(self.unit("MainPID") or 0)

        return wait_for(ready, START_TIMEOUT, interval=0.1, what="callahead active")

    def journal(self, since_cursor: str = "") -> str:
        after = f"--after-cursor={since_cursor!r}" if since_cursor else ""
        return self.sh(f"journalctl -u callahead --no-pager -o cat {after}")

    def cursor(self) -> str:
        out = self.sh("journalctl -u callahead -n 0 --show-cursor --no-pager")
        return out.strip().rsplit("cursor: ", 1)[-1]


def postfix_main_cf(primary_port: int, backup_host: str = BACKUP_HOST) -> str:
    """deploy/postfix-main.cf with the test's domain, primary and unix milter socket,
    after the few settings of a container host (its name, its 127.0.70.2 listener)."""
    snippet = (REPO / "deploy/postfix-main.cf").read_text()
    replacements = {
        "relay_domains = example.com": f"relay_domains = {DOMAIN}",
        "transport_maps = inline:{example.com=smtp:[192.0.2.10]:25}": (
            f"transport_maps = inline:{{{DOMAIN}=smtp:[{PRIMARY_HOST}]:{primary_port}}}"
        ),
    }
    for old, new in replacements.items():
        assert old in snippet, old
        snippet = snippet.replace(old, new)
    assert "smtpd_milters = unix:callahead/milter.sock" in snippet  # the snippet's own
    policy = (REPO / "deploy/postfix-policy-main.cf").read_text()
    assert "check_policy_service unix:callahead/policy.sock" in policy
    return (
        "compatibility_level = 3.6\n"
        "myhostname = backup.test\n"
        "mydestination =\n"
        "mynetworks = 127.0.0.1/32\n"
        f"inet_interfaces = {backup_host}\n"
        "inet_protocols = ipv4\n"
        "smtputf8_enable = no\n"
        # The policy listener (master.cf) checks with the policy service instead.
        "callahead_policy_restrictions = reject_unauth_destination,"
        " check_policy_service unix:callahead/policy.sock\n"
        "smtpd_policy_service_default_action = DUNNO\n"
        "smtpd_policy_service_timeout = 30s\n" + snippet
    )


POLICY_LISTENER = (
    f"{BACKUP_HOST}:{POLICY_PORT} inet n - y - - smtpd -o smtpd_milters="
    " -o smtpd_recipient_restrictions=$callahead_policy_restrictions\n"
)


def callahead_env() -> str:
    return "\n".join(
        [
            "CALLAHEAD_POSTFIX_CONFIG=/etc/postfix",
            # No CALLAHEAD_SOCKET: the package's default, unix:{SOCKET_DIR}/milter.sock.
            f"CALLAHEAD_POLICY_LISTEN=unix:{SOCKET_DIR}/policy.sock",
            f"CALLAHEAD_METRICS_LISTEN={BACKUP_HOST}:9895",
            "CALLAHEAD_CACHE_FILE=/var/lib/callahead/cache.json",
            "CALLAHEAD_HELO_NAME=backup.test",
            "CALLAHEAD_CLIENT_UNKNOWN_LIMIT=0",
            "",
        ]
    )


@contextlib.contextmanager
def prepared(
    backup_host: str = BACKUP_HOST, name: str = "callahead-system", debs: Sequence[Path] = ()
) -> Iterator[System]:
    """A stand-in primary on the host and a booted container whose Postfix, configured
    as ``system`` has it, listens on ``backup_host``; ``debs`` copied to /root, nothing
    installed. For tests that need a container of their own (an upgrade, a purge) while
    ``system``'s is up: another ``backup_host`` and ``name``."""
    with (
        loopback_addresses([PRIMARY_HOST, backup_host]),
        Primary(KNOWN, host=PRIMARY_HOST, port=free_port(PRIMARY_HOST)) as primary,
        Container(name) as container,
    ):
        root = container.root
        (root / "etc/postfix/main.cf").write_text(postfix_main_cf(primary.port, backup_host))
        master = root / "etc/postfix/master.cf"
        master.write_text(master.read_text() + POLICY_LISTENER.replace(BACKUP_HOST, backup_host))
        (root / "etc/mailname").write_text("backup.test\n")
        for deb in debs:
            (root / "root" / deb.name).write_bytes(deb.read_bytes())
        container.boot()
        yield System(container, primary, dict(container.timings))


def apt_install(system: System, deb: Path) -> None:
    """``apt install ./<deb>`` (copied to /root by ``prepared``), as the README has it."""
    system.sh(
        "apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q"
        f" --no-install-recommends -o Dpkg::Options::=--force-confold /root/{deb.name}",
        timeout=600,
    )


@pytest.fixture(scope="session")
def system() -> Iterator[System]:
    started = time.monotonic()
    deb = debpkg.built()
    built = time.monotonic() - started
    # The README's install steps, in its order but for main.cf: the container shares
    # the host's network, so its Postfix must have its 127.0.70.2 listener before it
    # starts at boot (step 3 here, before steps 1 and 2; step 5, doctor, is a test).
    with prepared(debs=[deb]) as system:
        system.timings["deb"] = built
        phase = time.monotonic()
        apt_install(system, deb)
        system.timings["install"] = time.monotonic() - phase
        (system.container.root / "etc/default/callahead").write_text(callahead_env())
        system.sh("systemctl enable --now callahead")
        system.wait_active()
        yield system
        print(f"\nsystem test container: {system.timings}")
