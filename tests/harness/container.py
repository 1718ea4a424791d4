"""A Debian 12 container booted with systemd as PID 1, for the system tests
(``tests/system``): the unit, Debian's Postfix and the package as an operator has them.

* The root file system is made once with ``debootstrap --variant=minbase`` (systemd,
  dbus, python3 and postfix included) into ``.cache/system/rootfs-base`` and reused:
  each container runs on an overlay of it (a fresh upper directory in a temp dir), so
  nothing a test does reaches the cache, and a rerun starts in a second.
* ``systemd-nspawn --boot`` shares the host's network (no veth: the primary on the host
  is reached at a 127.0.70.x address, and nothing has to be routed). Everything inside
  that listens on TCP is therefore told to use a 127.0.70.x address this harness adds
  to ``lo`` (never 0.0.0.0, never another worktree's 127.0.53-55.x): Postfix's
  ``inet_interfaces`` is set *before* the boot, since its unit starts at boot.
* Commands run inside through ``nsenter -t <the container's systemd> -a``.
* Measured (4-CPU VM, deb.debian.org): debootstrap 58 s the first time (344 MB),
  then 0; the overlay mount and boot to ``running`` 3 s; apt-get install of the .deb
  (the seven Python libraries and procps from the mirror) 7 to 9 s; shutdown 1 s.
* ``close`` (also on failure, and from ``__exit__``) powers the container off
  (SIGTERM to nspawn: systemd's clean shutdown; SIGKILL after a timeout), unmounts the
  overlay, removes the temp dir and the loopback addresses it added.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType

from tests.harness.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "system"
ROOTFS = CACHE / "rootfs-base"
SUITE = "bookworm"
INCLUDE = ("systemd", "systemd-sysv", "dbus", "python3", "postfix")
DEBOOTSTRAP_TIMEOUT = 900.0
BOOT_TIMEOUT = 90.0
STOP_TIMEOUT = 30.0
PLAIN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


class ContainerError(Exception):
    """The container could not be made, booted or run a command."""


def _mirror(suite: str = "bookworm") -> str:
    """The Debian mirror of this machine's apt sources (deb822 or one-line form): the
    first entry apt reads (``*.list``, ``*.sources``; not a file disabled by renaming)
    that carries ``suite`` with its ``main`` component, so a third party's repository
    (nodesource, a cloud SDK) listed first is never taken for Debian's."""
    sources = [
        Path("/etc/apt/sources.list"),
        *sorted(Path("/etc/apt/sources.list.d").glob("*.list")),
        *sorted(Path("/etc/apt/sources.list.d").glob("*.sources")),
    ]
    for source in sources:
        with contextlib.suppress(OSError):
            for uri, suites, components in _entries(source.read_text()):
                if suite in suites and "main" in components:
                    return uri
    return "http://deb.debian.org/debian"


def _entries(text: str) -> list[tuple[str, list[str], list[str]]]:
    """(URI, suites, components) of each ``deb`` entry of a sources file."""
    entries: list[tuple[str, list[str], list[str]]] = []
    for stanza in text.split("\n\n"):
        fields: dict[str, list[str]] = {}
        for line in stanza.splitlines():
            words = line.split()
            if not words or line.lstrip().startswith("#"):
                continue
            if words[0] == "deb":
                rest = [w for w in words[1:] if not (w.startswith("[") or w.endswith("]"))]
                rest = [w for w in rest if "=" not in w]
                if len(rest) >= 3:
                    entries.append((rest[0], [rest[1]], rest[2:]))
            elif words[0].endswith(":"):
                fields[words[0][:-1].lower()] = words[1:]
        if "deb" in fields.get("types", []) and fields.get("uris"):
            for uri in fields["uris"]:
                entries.append((uri, fields.get("suites", []), fields.get("components", [])))
    return entries


def rootfs(*, rebuild: bool = False) -> Path:
    """The cached root file system, made by debootstrap if missing (into a temp name,
    renamed when complete, so an interrupted run never leaves a half-made cache)."""
    if ROOTFS.is_dir() and not rebuild:
        return ROOTFS
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix="rootfs-", dir=CACHE))
    try:
        done = subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(INCLUDE)}",
                SUITE,
                str(partial),
                _mirror(),
            ],
            env={"PATH": PLAIN_PATH, "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"},
            capture_output=True,
            text=True,
            timeout=DEBOOTSTRAP_TIMEOUT,
            check=False,
        )
        if done.returncode != 0:
            raise ContainerError(f"debootstrap failed:\n{done.stdout[-3000:]}{done.stderr}")
        if ROOTFS.exists():
            shutil.rmtree(ROOTFS)
        partial.rename(ROOTFS)
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    return ROOTFS


def _lo_has(address: str) -> bool:
    done = subprocess.run(
        ["ip", "-4", "-o", "addr", "show", "dev", "lo"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    )
    return f" {address}/" in done.stdout


@contextlib.contextmanager
def loopback_addresses(addresses: Sequence[str]) -> Iterator[None]:
    """Add ``addresses`` (each in 127.0.70.0/24) to ``lo``; on exit remove those this
    added (one that was there already is left)."""
    added: list[str] = []
    try:
        for address in addresses:
            if not address.startswith("127.0.70."):
                raise ContainerError(f"{address}: the system tests use 127.0.70.0/24 only")
            if not _lo_has(address):
                subprocess.run(
                    ["ip", "addr", "add", f"{address}/32", "dev", "lo"], check=True, timeout=10
                )
                added.append(address)
        yield
    finally:
        for address in added:
            subprocess.run(
                ["ip", "addr", "del", f"{address}/32", "dev", "lo"], check=False, timeout=10
            )


class Container:
    """A booted container on an overlay of the cached root file system.

    Prepare files with ``root`` (the merged tree, writable) before ``boot``; then
    ``run`` commands inside."""

    def __init__(self, name: str = "callahead-system") -> None:
        self.name = name
        self._tmp = Path(tempfile.mkdtemp(prefix="callahead-container-"))
        self.root = self._tmp / "merged"
        self._mounted = False
        self._nspawn: subprocess.Popen[bytes] | None = None
        self._console = self._tmp / "console.log"
        self.leader: int | None = None
        """The pid (on the host) of the container's systemd."""
        self.timings: dict[str, float] = {}
        try:
            started = time.monotonic()
            lower = rootfs()
            self.timings["rootfs"] = time.monotonic() - started
            for part in ("upper", "work", "merged"):
                (self._tmp / part).mkdir()
            options = (
                f"lowerdir={lower},upperdir={self._tmp / 'upper'},workdir={self._tmp / 'work'}"
            )
            subprocess.run(
                ["mount", "-t", "overlay", "overlay", "-o", options, str(self.root)],
                check=True,
                timeout=30,
            )
            self._mounted = True
        except BaseException:
            self.close()
            raise

    # -- lifecycle ----------------------------------------------------------------------

    def boot(self) -> None:
        """Boot with systemd-nspawn and wait until systemd says the system is running
        (``degraded`` is a failure: some unit failed)."""
        self._refuse_wide_listeners()
        started = time.monotonic()
        console = self._console.open("wb")
        self._nspawn = subprocess.Popen(
            [
                "systemd-nspawn",
                "--quiet",
                f"--directory={self.root}",
                f"--machine={self.name}",
                "--boot",
                "--register=no",
                "--keep-unit",
                "--resolv-conf=copy-host",
                "--timezone=off",
            ],
            stdin=subprocess.DEVNULL,
            stdout=console,
            stderr=subprocess.STDOUT,
            env={"PATH": PLAIN_PATH, "LANG": "C.UTF-8"},
            start_new_session=True,
        )
        console.close()
        self.leader = wait_for(self._find_leader, BOOT_TIMEOUT, interval=0.1, what="systemd")
        state = wait_for(self._settled, BOOT_TIMEOUT, interval=0.2, what="boot")
        self.timings["boot"] = time.monotonic() - started
        if state != "running":
            failed = self.run(["systemctl", "--failed", "--no-legend"], check=False).stdout
            raise ContainerError(f"the container booted {state}: {failed}")

    def _refuse_wide_listeners(self) -> None:
        """The container shares the host's network: its Postfix (started at boot) must
        listen on a 127.0.70.x address only, or it would take port 25 everywhere."""
        main_cf = self.root / "etc/postfix/main.cf"
        if not main_cf.exists():
            return
        settings = [
            line.split("=", 1)[1].strip()
            for line in main_cf.read_text().splitlines()
            if line.replace(" ", "").startswith("inet_interfaces=")
        ]
        if not settings or not all(
            part.startswith("127.0.70.") for part in settings[-1].replace(",", " ").split()
        ):
            raise ContainerError(f"{main_cf}: set inet_interfaces to 127.0.70.x before boot")

    def _find_leader(self) -> int | None:
        if self._nspawn is None or self._nspawn.poll() is not None:
            raise ContainerError(f"systemd-nspawn exited:\n{self.console()}")
        for child in _children(self._nspawn.pid):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                    return child
        return None

    def _settled(self) -> str | None:
        done = self.run(["systemctl", "is-system-running"], check=False)
        state = done.stdout.strip()
        return state if state in ("running", "degraded", "maintenance", "stopping") else None

    def console(self) -> str:
        with contextlib.suppress(OSError):
            return self._console.read_text(errors="replace")[-5000:]
        return ""

    def close(self) -> None:
        """Power off (SIGKILL after STOP_TIMEOUT), unmount, remove the temp dir."""
        try:
            if self._nspawn is not None and self._nspawn.poll() is None:
                self._nspawn.send_signal(signal.SIGTERM)
                try:
                    self._nspawn.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self._nspawn.pid, signal.SIGKILL)
                    self._nspawn.wait(STOP_TIMEOUT)
        finally:
            try:
                if self._mounted:
                    _unmount_under(self.root)
                    self._mounted = False
            finally:
                if not self._mounted:
                    shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> Container:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- inside -------------------------------------------------------------------------

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 60.0,
        input_text: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """``argv`` inside the container (all its namespaces), as root."""
        if self.leader is None:
            raise ContainerError("not booted")
        done = subprocess.run(
            [
                "nsenter",
                "-t",
                str(self.leader),
                "-a",
                "--",
                "env",
                "-i",
                f"PATH={PLAIN_PATH}",
                "LANG=C.UTF-8",
                *argv,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            input=input_text,
        )
        if check and done.returncode != 0:
            raise ContainerError(
                f"{shlex.join(argv)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
            )
        return done

    def sh(self, script: str, *, check: bool = True, timeout: float = 60.0) -> str:
        """A shell script inside; its stdout."""
        return self.run(["sh", "-ec", script], check=check, timeout=timeout).stdout


def _children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _unmount_under(root: Path) -> None:
    """Unmount ``root`` and anything still mounted below it, deepest first."""
    mounts = []
    with open("/proc/self/mountinfo", encoding="utf-8") as info:
        for line in info:
            point = line.split()[4].replace("\\040", " ")
            if point == str(root) or point.startswith(f"{root}/"):
                mounts.append(point)
    for point in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, timeout=30)
