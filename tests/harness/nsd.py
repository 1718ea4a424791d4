"""A real authoritative DNS server (NSD, Debian's ``nsd`` package) on a loopback port,
serving zones written by the test, with its own config, state and log in a work dir.
The system's nsd service is never touched."""

from __future__ import annotations

import shutil
from pathlib import Path

import dns.exception
import dns.message
import dns.query

from tests.harness.ports import free_port
from tests.harness.process import ManagedProcess

NSD = shutil.which("nsd") or "/usr/sbin/nsd"


def nsd_available() -> bool:
    return Path(NSD).exists()


class NsdServer(ManagedProcess):
    """``nsd -d`` on 127.0.0.1:``port`` (UDP and TCP) serving ``zones`` (origin -> zone
    file text)."""

    def __init__(self, workdir: Path, zones: dict[str, str]) -> None:
        workdir.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.port = free_port()
        self._first = next(iter(zones))
        for origin, text in zones.items():
            (workdir / f"{origin}.zone").write_text(text)
        zone_blocks = "".join(
            f'zone:\n    name: "{origin}"\n    zonefile: "{origin}.zone"\n' for origin in zones
        )
        conf = workdir / "nsd.conf"
        conf.write_text(
            "server:\n"
            f"    ip-address: 127.0.0.1@{self.port}\n"
            "    do-ip6: no\n"
            f"    port: {self.port}\n"
            '    username: ""\n'
            '    chroot: ""\n'
            f'    zonesdir: "{workdir}"\n'
            f'    pidfile: "{workdir}/nsd.pid"\n'
            f'    xfrdfile: "{workdir}/xfrd.state"\n'
            f'    zonelistfile: "{workdir}/zone.list"\n'
            '    database: ""\n'
            "    server-count: 1\n"
            "    verbosity: 1\n"
            "remote-control:\n"
            "    control-enable: no\n" + zone_blocks
        )
        super().__init__(
            [NSD, "-d", "-c", str(conf)],
            workdir / "nsd.log",
            what=f"nsd on 127.0.0.1:{self.port}",
            ready=self._answers,
        )

    def _answers(self) -> bool:
        query = dns.message.make_query(f"{self._first}.", "SOA")
        try:
            response = dns.query.udp(query, "127.0.0.1", port=self.port, timeout=0.5)
        except (OSError, dns.exception.DNSException):
            return False
        return bool(response.answer)

    @property
    def resolver(self) -> str:
        """The value for ``CALLAHEAD_RESOLVER``."""
        return f"127.0.0.1:{self.port}"
