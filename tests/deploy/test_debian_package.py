"""The Debian package as CI builds it (``tests.harness.debpkg``): lintian-clean, depending
on Debian 12's own Python libraries and nothing from pip, and shipping the unit,
/etc/default/callahead as a conffile, the tmpfiles.d entry and the deploy/ snippets."""

from __future__ import annotations

import gzip
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import debpkg
from tests.harness.fixtures import make_workdir

from .promql import DEPLOY
from .tools import run, tool

DEBIAN_DEPENDS = {
    "postfix",
    "procps",
    "python3-aiosmtplib",
    "python3-cachetools",
    "python3-dnspython",
    "python3-idna",
    "python3-milter",
    "python3-prometheus-client",
    "python3-redis",
    "python3:any",
}
"""Every package callahead depends on: Debian's postfix, procps (the unit's ExecReload runs
/bin/kill) and Python libraries."""
EXAMPLES = (
    "alerts.test.yml",
    "alerts.yml",
    "callahead.env.example",
    "grafana-dashboard.json",
    "postfix-main.cf",
    "postfix-policy-main.cf",
)


@pytest.fixture(scope="module")
def deb() -> Path:
    return debpkg.built()


@pytest.fixture(scope="module")
def unpacked(deb: Path) -> Iterator[Path]:
    with make_workdir() as workdir:
        subprocess.run([tool("dpkg-deb"), "-R", str(deb), str(workdir)], check=True, timeout=60)
        yield workdir


def field(deb: Path, name: str) -> str:
    done = run([tool("dpkg-deb"), "-f", str(deb), name])
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_package_is_named_as_debian_names_it(deb: Path) -> None:
    assert re.fullmatch(r"callahead_[0-9][0-9.]*_all\.deb", deb.name), deb.name
    assert field(deb, "Architecture") == "all"


def test_it_depends_only_on_debians_packages(deb: Path) -> None:
    depends = {part.split()[0] for part in field(deb, "Depends").split(", ")}
    assert depends == DEBIAN_DEPENDS
    assert "pip" not in field(deb, "Depends") + field(deb, "Recommends")


def test_lintian_finds_no_error_or_warning(deb: Path) -> None:
    report = debpkg.lintian(deb)
    # The one remark left: the package ships a systemd unit and no init.d script (on
    # purpose: the unit's sandbox, dynamic user and watchdog have no sysvinit form).
    remarks = [line for line in report.splitlines() if re.match(r"[EWIP]: ", line)]
    assert remarks == [
        "I: callahead: package-supports-alternative-init-but-no-init.d-script "
        "[lib/systemd/system/callahead.service]"
    ], report


def test_it_ships_the_program_and_its_modules(unpacked: Path) -> None:
    script = unpacked / "usr/bin/callahead"
    assert script.read_text().startswith("#! /usr/bin/python3") or script.read_text().startswith(
        "#!/usr/bin/python3"
    )
    package = unpacked / "usr/lib/python3/dist-packages/callahead"
    shipped = {p.name for p in package.glob("*.py")}
    source = {p.name for p in (debpkg.REPO / "milter/callahead").glob("*.py")}
    assert shipped == source


def test_the_unit_is_deploys_with_the_packaged_program(unpacked: Path) -> None:
    unit = (unpacked / "lib/systemd/system/callahead.service").read_text()
    assert "ExecStart=/usr/bin/callahead serve" in unit and "/opt/callahead" not in unit
    assert "Documentation=man:callahead(1)" in unit
    ours = [line for line in (DEPLOY / "callahead.service").read_text().splitlines()]
    body = ours[ours.index("[Unit]") :]
    expected = [line.replace("/opt/callahead/bin/callahead", "/usr/bin/callahead") for line in body]
    expected.insert(
        expected.index(next(x for x in expected if x.startswith("Description="))) + 1,
        "Documentation=man:callahead(1)",
    )
    assert unit.splitlines() == expected


def test_the_defaults_file_is_a_conffile_for_root_alone(deb: Path, unpacked: Path) -> None:
    # It may hold the Redis password; systemd reads it as root.
    listing = run([tool("dpkg-deb"), "-c", str(deb)]).stdout
    assert re.search(r"^-rw-r----- root/root .* \./etc/default/callahead$", listing, re.M), listing
    conffiles = (unpacked / "DEBIAN/conffiles").read_text().split()
    assert "/etc/default/callahead" in conffiles
    assert (unpacked / "etc/default/callahead").read_text() == (
        DEPLOY / "callahead.env.example"
    ).read_text()


def test_the_socket_directory_is_made_by_tmpfiles(unpacked: Path) -> None:
    tmpfiles = (unpacked / "usr/lib/tmpfiles.d/callahead.conf").read_text()
    assert tmpfiles == (DEPLOY / "callahead.tmpfiles").read_text()
    assert "d /var/spool/postfix/callahead 0770 root postfix -" in tmpfiles


def test_the_deploy_snippets_are_examples(unpacked: Path) -> None:
    examples = unpacked / "usr/share/doc/callahead/examples"
    for name in EXAMPLES:
        shipped = examples / name
        text = (
            gzip.decompress((examples / f"{name}.gz").read_bytes()).decode()
            if not shipped.exists()
            else shipped.read_text()
        )
        assert text == (DEPLOY / name).read_text(), name


def test_it_has_a_manual_page(unpacked: Path) -> None:
    assert (unpacked / "usr/share/man/man1/callahead.1.gz").is_file()


@pytest.fixture(scope="module")
def scripts(deb: Path) -> Iterator[dict[str, str]]:
    """The maintainer scripts dh generated, by name (preinst, postinst, prerm, postrm)."""
    with make_workdir() as workdir:
        subprocess.run([tool("dpkg-deb"), "-e", str(deb), str(workdir)], check=True, timeout=60)
        yield {
            name: (workdir / name).read_text()
            for name in ("preinst", "postinst", "prerm", "postrm")
            if (workdir / name).exists()
        }


def test_an_upgrade_restarts_the_service_instead_of_stopping_it(scripts: dict[str, str]) -> None:
    """Issue 26: ``--no-start`` made a preinst that stopped callahead on upgrade and
    nothing that started it again. Now no stop before the upgrade, and the postinst's
    deb-systemd-invoke restarts it after (it does so only for a unit that is enabled
    or running, and "start" on a first install starts only an enabled one: none)."""
    assert "stop" not in scripts.get("preinst", "")
    postinst = scripts["postinst"]
    assert "_dh_action=restart" in postinst and "_dh_action=start" in postinst
    assert "deb-systemd-invoke $_dh_action 'callahead.service'" in postinst
    # Never enabled by the package (/etc/default/callahead names example primaries):
    # the one enable is for a unit the operator had enabled (was-enabled).
    assert postinst.count("deb-systemd-helper enable") == 1
    assert "deb-systemd-helper --quiet was-enabled 'callahead.service'" in postinst


def test_remove_stops_it_and_purge_removes_its_state(scripts: dict[str, str]) -> None:
    prerm = scripts["prerm"]
    assert re.search(
        r'\[ "\$1" = remove \].*\n\s*deb-systemd-invoke stop \'callahead.service\'', prerm
    ), prerm
    postrm = scripts["postrm"]
    purge = postrm[postrm.index('if [ "$1" = "purge" ]') :]
    for path in (
        "/var/lib/private/callahead",
        "/var/lib/callahead",
        "/var/spool/postfix/callahead",
    ):
        assert path in purge, path
    assert "/etc/systemd/system/callahead.service.d/0.1-tcp-listener.conf" in purge


def test_the_0_1_listener_is_kept_before_the_restart(scripts: dict[str, str]) -> None:
    """The upgrade from 0.1 keeps its TCP listener (a drop-in) where the operator never
    set CALLAHEAD_SOCKET; the drop-in must be written before the daemon-reload and the
    restart that debhelper adds, or the first process after the upgrade listens where
    Postfix does not look (a debhelper token in a comment once put them first)."""
    postinst = scripts["postinst"]
    reload = "systemctl --system daemon-reload"
    assert postinst.count(reload) == 1, postinst
    written = postinst.index('cat >"$DROPIN"')
    assert written < postinst.index(reload) < postinst.index("deb-systemd-invoke")
    assert "Environment=CALLAHEAD_SOCKET=inet:127.0.0.1:8895" in postinst
    assert 'dpkg --compare-versions "$2" lt 0.2.0~' in postinst
