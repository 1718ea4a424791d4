"""Build callahead's Debian package (debian/) the way CI does, without writing anything
outside a temporary directory and the output directory.

``dpkg-buildpackage`` writes its artefacts into the parent of the source tree and
leaves ``.pybuild`` and ``debian/callahead`` in it, so the build runs on a copy of this
checkout's files (tracked ones and new ones not ignored, as ``git ls-files`` lists them)
in a temporary directory, and only the ``.deb`` is moved out. It runs with a plain
PATH: the build must use Debian's /usr/bin/python3 and its dh-python, not whichever
python3 comes first on the caller's PATH.

``python -m tests.harness.debpkg [OUTDIR]`` (``./dev deb``) builds into ``build/deb``,
runs lintian on it and prints the path.

``built_next()`` builds the same tree one version later (a changelog entry added to the
copy), so the system tests can upgrade from this version to the next;
``built_previous()`` builds the last release before it (``PREVIOUS_RELEASE``, from git),
so they can upgrade from what operators run today.
"""

from __future__ import annotations

import datetime
import email.utils
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "build" / "deb"
OUT_NEXT = REPO / "build" / "deb-next"
OUT_PREVIOUS = REPO / "build" / "deb-previous"
PREVIOUS_RELEASE = "6da48478b877256632428dc2ee4258ea55fadb03"
"""The commit of release 0.1.0 (the tree before issue 26), whose milter listened on
inet:127.0.0.1:8895 by default and whose package stopped it on upgrade."""
NEXT_SUFFIX = "+1"
"""Appended to the changelog's version for the next one (dpkg sorts 0.1.0+1 after 0.1.0)."""
BUILD_TIMEOUT = 300.0
LINTIAN_FAIL_ON = "error,warning"
PLAIN_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "DEB_BUILD_OPTIONS": "nocheck",
}


class DebBuildError(Exception):
    """The package did not build, or lintian found errors or warnings."""


def version(commit: str = "") -> str:
    """The package version, from debian/changelog (of ``commit``, when given)."""
    if commit:
        text = subprocess.run(
            ["git", "show", f"{commit}:debian/changelog"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
        source = ["-l", "-"]
    else:
        text = None
        source = ["-l", str(REPO / "debian" / "changelog")]
    done = subprocess.run(
        ["dpkg-parsechangelog", *source, "-S", "Version"],
        input=text,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return done.stdout.strip()


def _source_files() -> list[str]:
    done = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
        timeout=30,
    )
    names = [name.decode() for name in done.stdout.split(b"\0") if name]
    return [name for name in names if (REPO / name).is_file()]


def _next_entry(next_version: str) -> str:
    """A debian/changelog entry for ``next_version``, as dch would write it."""
    when = email.utils.format_datetime(datetime.datetime.now(datetime.UTC))
    return (
        f"callahead ({next_version}) unstable; urgency=medium\n\n"
        "  * The same tree one version later, for the system tests' upgrade.\n\n"
        f" -- callahead maintainers <callahead@example.org>  {when}\n\n"
    )


def _export(commit: str, tree: Path) -> None:
    """The files of ``commit`` (from this checkout's git history) into ``tree``."""
    tree.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "archive", "--format=tar", commit],
        cwd=REPO,
        capture_output=True,
        timeout=60,
        check=False,
    )
    if archive.returncode != 0:
        raise DebBuildError(
            f"git archive {commit} failed (a shallow clone lacks the previous release): "
            f"{archive.stderr.decode(errors='replace').strip()}"
        )
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True, timeout=60)


def build(out: Path = OUT, *, suffix: str = "", commit: str = "") -> Path:
    """Build callahead_<version><suffix>_all.deb into ``out`` and return its path (with
    a ``suffix``, a changelog entry for that version is added to the copy; with a
    ``commit``, the tree of that commit is built instead of this checkout's files);
    raises ``DebBuildError`` with the build's output."""
    full_version = (version(commit) if commit else version()) + suffix
    name = f"callahead_{full_version}_all.deb"
    with tempfile.TemporaryDirectory(prefix="callahead-deb-") as tmp:
        tree = Path(tmp) / f"callahead-{full_version}"
        if commit:
            _export(commit, tree)
        for relative in [] if commit else _source_files():
            target = tree / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / relative, target)
        if suffix:
            changelog = tree / "debian" / "changelog"
            changelog.write_text(_next_entry(full_version) + changelog.read_text())
        env = {**PLAIN_ENV, "HOME": tmp}
        done = subprocess.run(
            ["dpkg-buildpackage", "-us", "-uc", "-b"],
            cwd=tree,
            env=env,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT,
            check=False,
        )
        built = Path(tmp) / name
        if done.returncode != 0 or not built.is_file():
            raise DebBuildError(f"dpkg-buildpackage failed:\n{done.stdout}\n{done.stderr}")
        out.mkdir(parents=True, exist_ok=True)
        final = out / name
        shutil.move(built, final)
    return final


@functools.cache
def built() -> Path:
    """The package, built once per test process (into ``build/deb``)."""
    return build()


@functools.cache
def built_next() -> Path:
    """The package one version later (into ``build/deb-next``), built once per test
    process."""
    return build(OUT_NEXT, suffix=NEXT_SUFFIX)


@functools.cache
def built_previous() -> Path:
    """The package of the previous release (into ``build/deb-previous``), built once per
    test process from git."""
    return build(OUT_PREVIOUS, commit=PREVIOUS_RELEASE)


def lintian(deb: Path) -> str:
    """lintian's report on ``deb``; raises ``DebBuildError`` when it has errors or
    warnings (the ``I:`` lines of -I are kept in the report, and allowed)."""
    done = subprocess.run(
        ["lintian", "--fail-on", LINTIAN_FAIL_ON, "-I", str(deb)],
        env={**PLAIN_ENV, "HOME": str(deb.parent)},
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
    )
    report = done.stdout + done.stderr
    if done.returncode != 0:
        raise DebBuildError(f"lintian:\n{report}")
    return report


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0]) if args else OUT
    try:
        deb = build(out)
        report = lintian(deb)
    except DebBuildError as exc:
        print(exc, file=sys.stderr)
        return 1
    sys.stdout.write(report)
    print(os.fspath(deb))
    return 0


if __name__ == "__main__":
    sys.exit(main())
