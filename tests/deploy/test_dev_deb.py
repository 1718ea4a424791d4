"""``./dev deb`` as a mail administrator runs it: the package built in a throwaway
Debian 12 root, and the machine left as it was found (issue 26: it used to install a
compiler, a venv, redis-server, nsd, prometheus and debootstrap on the host).

The root is an overlay of the system tests' cached root file system, which
``container.rootfs()`` makes if missing (debootstrap, about 60 s once: the system tests
reuse it), so a run costs the build dependencies' install in the root and the build:
about 55 s (2 CPUs, deb.debian.org). The failing build stops at its build dependencies:
a few seconds more. Needs root (chroot, mounts), as CI runs the suite."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness import container, debpkg
from tests.harness.fixtures import make_workdir

from .tools import run, tool

DEV_DEB_TIMEOUT = 900.0
LINTIAN_REMARKS = [
    "I: callahead: package-supports-alternative-init-but-no-init.d-script "
    "[lib/systemd/system/callahead.service]"
]
"""What tests/deploy/test_debian_package.py allows: no error or warning, this one remark."""
BOGUS_DEPENDENCY = "callahead-no-such-build-dependency"


@dataclass(frozen=True)
class HostState:
    """What a build must not change on the machine it runs on."""

    packages: list[str]
    enabled: list[str]
    """Symlinks under /etc/systemd/system and /etc/rc?.d (enablement on disk), and
    ``systemctl list-unit-files`` when systemd runs here."""


def host_state() -> HostState:
    done = run([tool("dpkg-query"), "-W", "-f", "${Package}:${Architecture} ${Status}\n"])
    assert done.returncode == 0, done.stderr
    enabled = sorted(
        f"{link} -> {os.readlink(link)}"
        for top in (Path("/etc/systemd/system"), *Path("/etc").glob("rc?.d"))
        for link in top.rglob("*")
        if link.is_symlink()
    )
    if Path("/run/systemd/system").is_dir():
        units = run(["systemctl", "list-unit-files", "--no-legend", "--no-pager"])
        enabled += sorted(units.stdout.splitlines())
    return HostState(sorted(done.stdout.splitlines()), enabled)


def mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8") as info:
        points = [line.split()[4].replace("\\040", " ") for line in info]
    return [p for p in points if p == str(path) or p.startswith(f"{path}/")]


@pytest.fixture(scope="module")
def tmpdir() -> Iterator[Path]:
    """TMPDIR for ``./dev deb``: where its throwaway root goes, and must go away."""
    with make_workdir("callahead-devdeb-") as path:
        yield path


def dev_deb(checkout: Path, out: Path, tmpdir: Path) -> subprocess.CompletedProcess[str]:
    assert os.geteuid() == 0, "./dev deb needs root (chroot, mounts), as CI has"
    container.rootfs()  # the cached root it overlays (made once; the system tests reuse it)
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "TMPDIR": str(tmpdir)}
    return subprocess.run(
        [str(checkout / "dev"), "deb", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=DEV_DEB_TIMEOUT,
        check=False,
    )


@dataclass(frozen=True)
class Built:
    done: subprocess.CompletedProcess[str]
    out: Path
    before: HostState
    after: HostState


@pytest.fixture(scope="module")
def built(tmpdir: Path) -> Iterator[Built]:
    # Not build/deb: the other packaging tests build there in the same run.
    with make_workdir("callahead-devdeb-out-") as out:
        before = host_state()
        done = dev_deb(debpkg.REPO, out, tmpdir)
        print(f"\n./dev deb:\n{done.stderr}")
        yield Built(done, out, before, host_state())


def test_it_builds_the_changelogs_version(built: Built) -> None:
    assert built.done.returncode == 0, built.done.stdout + built.done.stderr
    name = f"callahead_{debpkg.version()}_all.deb"
    assert sorted(p.name for p in built.out.iterdir()) == [name]
    assert built.done.stdout.splitlines()[-1] == str(built.out / name)
    field = run([tool("dpkg-deb"), "-f", str(built.out / name), "Version"])
    assert field.stdout.strip() == debpkg.version()


def test_lintian_ran_in_the_root_and_found_no_error_or_warning(built: Built) -> None:
    remarks = [line for line in built.done.stdout.splitlines() if re.match(r"[EWIPN]: ", line)]
    assert remarks == LINTIAN_REMARKS, built.done.stdout
    assert "dev: lintian in the root" in built.done.stderr


def test_it_is_the_package_the_other_tests_test(built: Built) -> None:
    """The same files, modes and owners as the host's build (tests.harness.debpkg)."""

    def listing(deb: Path) -> list[str]:
        lines = run([tool("dpkg-deb"), "-c", str(deb)]).stdout.splitlines()
        return sorted(f"{line.split()[0]} {line.split()[1]} {line.split()[-1]}" for line in lines)

    ours = next(built.out.glob("*.deb"))
    assert listing(ours) == listing(debpkg.built())


def test_the_host_is_left_as_it_was(built: Built, tmpdir: Path) -> None:
    assert built.done.returncode == 0, built.done.stderr
    assert built.after.packages == built.before.packages
    assert built.after.enabled == built.before.enabled
    assert mounts_under(tmpdir) == []
    assert list(tmpdir.iterdir()) == []
    # Nothing reached the cached root it overlaid.
    assert not (container.ROOTFS / "build").exists()
    assert not (container.ROOTFS / "usr/bin/lintian").exists()


def test_a_failing_step_shows_its_output_and_leaves_nothing(tmpdir: Path) -> None:
    """A copy of the checkout (no .git: its files are taken as a tarball's would be)
    whose Build-Depends name a package Debian has not: the build stops there."""
    with (
        make_workdir("callahead-devdeb-broken-") as checkout,
        make_workdir("callahead-devdeb-out-") as out,
    ):
        files = run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], debpkg.REPO)
        for name in files.stdout.splitlines():
            if (debpkg.REPO / name).is_file():
                (checkout / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(debpkg.REPO / name, checkout / name)
        (checkout / ".cache/system").mkdir(parents=True)
        (checkout / ".cache/system/rootfs-base").symlink_to(container.rootfs())
        control = checkout / "debian/control"
        text = control.read_text()
        control.write_text(
            text.replace("Build-Depends: ", f"Build-Depends: {BOGUS_DEPENDENCY},\n    ", 1)
        )
        before = host_state()
        done = dev_deb(checkout, out, tmpdir)
        assert done.returncode == 1, done.stdout + done.stderr
        assert "dev: the build dependencies in the root failed" in done.stderr
        assert BOGUS_DEPENDENCY in done.stderr  # apt's own words, shown
        assert "dev: the package was not built" in done.stderr
        assert list(out.iterdir()) == []
        assert host_state() == before
        assert mounts_under(tmpdir) == []
        assert list(tmpdir.iterdir()) == []
