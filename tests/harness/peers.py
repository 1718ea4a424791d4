"""Real peers' MTAs as SMTP primaries on 127.0.0.1: Exim 4 and OpenSMTPD from Debian 12.

Both packages conflict with ``postfix`` (they provide ``mail-transport-agent``), so they
are never installed: ``fetch_peer`` runs ``apt-get download`` into
``<repo>/.cache/peer-mtas/debs`` (``apt-get update -q`` once if that fails, e.g. when the
package lists are missing) and unpacks with ``dpkg -x`` (no maintainer scripts) into
``<repo>/.cache/peer-mtas/<peer>``; setuid/setgid bits are dropped from the unpacked
tree. The daemons then run from there with a configuration written under the work dir.

Each primary serves one mail domain with a fixed set of users, configured the way a
real site would, minimally: a known user (and ``postmaster``) is accepted at RCPT TO
and delivered into ``WORKDIR/mail/<local part>/`` (a maildir); an unknown user is
rejected at RCPT TO with the MTA's own reply; ``MAIL FROM:<>`` is accepted; no TLS,
no DNS, ident or reverse lookups that could hang.

What the Debian builds impose (compiled in, not configurable):

- Exim: the ``Debian-exim`` user must exist (created here with ``useradd --system`` if
  missing). ``exim_path`` points the re-exec for delivery at the unpacked binary, and
  ``deliver_drop_privilege`` lets Exim deliver as ``Debian-exim`` without being setuid
  root (an untrusted ``-C`` file would drop root privilege anyway). Any number of Exim
  primaries can run at once.
- OpenSMTPD: the privsep users are ``opensmtpd`` and ``opensmtpq`` (Debian's names, not
  ``_smtpd``/``_smtpq``; created if missing); the queue is ``/var/spool/smtpd``, the
  control socket ``/var/run/smtpd.sock``, the privsep chroot
  ``/var/lib/opensmtpd/empty`` and the delivery helpers ``/usr/libexec/opensmtpd/``.
  So only one OpenSMTPD primary runs per machine at a time (a lock file serializes
  them, across processes too); the spool is wiped at each start and stop and
  ``/usr/libexec/opensmtpd`` is a symlink into the cache while one runs. Delivery
  happens as ``nobody`` (a ``userbase`` table maps the virtual users to uid 65534).

Every daemon runs in its own session (``setsid``); ``stop()`` ends the daemon and every
process of that session (and any process whose command line names the instance's
config file), SIGKILL as a fallback. Primaries still running at interpreter exit are
stopped by an ``atexit`` hook.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, ClassVar, Literal

from tests.harness.lifecycle import (
    StartStop,
    forget_at_exit,
    maildir_count,
    maildir_messages,
    stop_at_exit,
)
from tests.harness.ports import free_port, listening
from tests.harness.process import ManagedProcess
from tests.harness.waiting import wait_for

__all__ = [
    "CACHE_DIR",
    "EximPrimary",
    "OpenSmtpdPrimary",
    "PeerError",
    "PeerName",
    "PeerPrimary",
    "fetch_peer",
    "peer_available",
]

PeerName = Literal["exim", "opensmtpd"]

REPO = Path(__file__).resolve().parents[2]
CACHE_DIR = REPO / ".cache" / "peer-mtas"

# The Debian 12 binary packages, and the binary in each that is started.
PACKAGES: dict[PeerName, tuple[str, ...]] = {
    "exim": ("exim4-daemon-light",),
    "opensmtpd": ("opensmtpd",),
}
BINARIES: dict[PeerName, str] = {
    "exim": "usr/sbin/exim4",
    "opensmtpd": "usr/sbin/smtpd",
}
# Shared libraries of those binaries that a Postfix host may lack, with their packages
# (all installable next to postfix; ./dev deps installs them).
LIBRARY_PACKAGES = {
    "libidn.so.12": "libidn12",
    "libevent-2.1.so.7": "libevent-2.1-7",
    "libgnutls-dane.so.0": "libgnutls-dane0",
    "libgnutls.so.30": "libgnutls30",
    "libidn2.so.0": "libidn2-0",
    "libnsl.so.2": "libnsl2",
    "libpcre2-8.so.0": "libpcre2-8-0",
    "libdb-5.3.so": "libdb5.3",
    "libpam.so.0": "libpam0g",
    "libssl.so.3": "libssl3",
    "libcrypto.so.3": "libssl3",
    "libcrypt.so.1": "libcrypt1",
    "libz.so.1": "zlib1g",
}

APT_TIMEOUT = 600.0
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0

NOBODY_UID = 65534
NOBODY_GID = 65534

_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?$")
_LOCAL_PART = re.compile(r"^[a-z0-9_+=-]+(?:\.[a-z0-9_+=-]+)*$")


class PeerError(RuntimeError):
    """A peer MTA could not be fetched, set up, started or stopped."""


def peer_available(name: PeerName) -> tuple[bool, str]:
    """Whether this process can run the ``name`` peer, and why not.

    Cheap (nothing is downloaded): root, ``apt-get``/``dpkg``/``setsid`` present, and
    for OpenSMTPD no real OpenSMTPD installed (its fixed paths would collide)."""
    if name not in PACKAGES:
        return False, f"unknown peer {name!r}"
    if os.geteuid() != 0:
        return False, f"{name} needs root (it binds, setuids and creates system users)"
    for tool in ("apt-get", "dpkg", "setsid", "ldd", "useradd"):
        if shutil.which(tool) is None:
            return False, f"{tool} not found"
    if name == "opensmtpd" and Path("/usr/sbin/smtpd").exists():
        return False, "a real OpenSMTPD is installed (/usr/sbin/smtpd); its fixed paths collide"
    return True, ""


# --------------------------------------------------------------------------------------
# fetching
# --------------------------------------------------------------------------------------


def _run(argv: list[str], *, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C")
    return subprocess.run(
        argv,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=APT_TIMEOUT,
        check=False,
    )


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[IO[str]]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield handle
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _download(packages: tuple[str, ...], debs: Path) -> None:
    # As root, apt-get download otherwise warns that the _apt sandbox user cannot
    # write the target dir.
    argv = ["apt-get", "-q", "-o", "APT::Sandbox::User=root", "download", *packages]
    first = _run(argv, cwd=debs)
    if first.returncode == 0:
        return
    # Most often the package lists are missing (a fresh container): update once.
    update = _run(["apt-get", "update", "-q"])
    again = _run(argv, cwd=debs)
    if again.returncode != 0:
        raise PeerError(
            f"apt-get download {' '.join(packages)} failed:\n{first.stderr.strip()}\n"
            f"then apt-get update -q exited {update.returncode}:\n{update.stderr.strip()}\n"
            f"and the retry failed:\n{again.stderr.strip()}"
        )


def _drop_setid_bits(tree: Path) -> None:
    for path in tree.rglob("*"):
        if path.is_file() and not path.is_symlink():
            mode = path.stat().st_mode
            if mode & (stat.S_ISUID | stat.S_ISGID):
                path.chmod(stat.S_IMODE(mode) & ~(stat.S_ISUID | stat.S_ISGID))


def fetch_peer(name: PeerName) -> Path:
    """The unpacked tree of ``name``'s Debian packages, downloaded and unpacked on first
    use (under a lock, so parallel test processes fetch once)."""
    packages = PACKAGES[name]
    tree = CACHE_DIR / name
    done = tree / ".unpacked"
    with _flock(CACHE_DIR / ".lock"):
        if done.exists():
            return tree
        debs = CACHE_DIR / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        for directory in (CACHE_DIR.parent, CACHE_DIR, debs):
            directory.chmod(0o755)
        for old in debs.glob("*.deb"):
            if old.name.split("_")[0] in packages:
                old.unlink()
        _download(packages, debs)
        staging = CACHE_DIR / f"{name}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(tree, ignore_errors=True)
        staging.mkdir(mode=0o755)
        files = []
        for package in packages:
            found = sorted(debs.glob(f"{package}_*.deb"))
            if not found:
                raise PeerError(f"apt-get download left no {package}_*.deb in {debs}")
            proc = _run(["dpkg", "-x", str(found[-1]), str(staging)])
            if proc.returncode != 0:
                raise PeerError(f"dpkg -x {found[-1]} failed: {proc.stderr.strip()}")
            files.append(found[-1].name)
        _drop_setid_bits(staging)
        staging.chmod(0o755)
        (staging / ".unpacked").write_text("".join(f"{f}\n" for f in files))
        staging.rename(tree)
        return tree


def _check_libraries(binary: Path) -> None:
    proc = _run(["ldd", str(binary)])
    missing = re.findall(r"^\s*(\S+)\s+=>\s+not found", proc.stdout, re.MULTILINE)
    if missing:
        hints = ", ".join(
            f"{lib} (Debian package {LIBRARY_PACKAGES[lib]})"
            if lib in LIBRARY_PACKAGES
            else f"{lib} (install the Debian package that provides it)"
            for lib in missing
        )
        raise PeerError(
            f"{binary} needs missing shared libraries: {hints}; "
            "run ./dev deps or apt-get install them"
        )
    if proc.returncode != 0:
        raise PeerError(f"ldd {binary} failed: {proc.stderr.strip()}")


def _ensure_user(name: str) -> None:
    """Create system user ``name`` (with a group of the same name) unless it exists."""
    try:
        pwd.getpwnam(name)
        return
    except KeyError:
        pass
    argv = ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent"]
    argv += ["--shell", "/usr/sbin/nologin"]
    proc = _run([*argv, "--user-group", name])
    if proc.returncode != 0 and "group" in proc.stderr and "exists" in proc.stderr:
        proc = _run([*argv, "--gid", name, name])
    if proc.returncode != 0:
        raise PeerError(f"useradd {name} failed: {proc.stderr.strip()}")


def _check_traversable(path: Path, who: str) -> None:
    """Every dir from ``path`` up must be traversable by others (``who`` is not root)."""
    for directory in (path, *path.parents):
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            raise PeerError(
                f"{directory} (mode {stat.filemode(mode)}) is not traversable by {who}, "
                f"which must reach {path}; use 0755 dirs (tests.harness.fixtures.make_workdir)"
            )


# --------------------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------------------


def _proc_info(pid: int) -> tuple[int, str] | None:
    """``(session, cmdline)`` of a live process; None if gone or a zombie."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    fields = stat_line[stat_line.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None  # exited; only waiting to be reaped
    return int(fields[3]), cmdline.replace(b"\0", b" ").decode(errors="replace")


def _instance_pids(sid: int, marker: str) -> list[int]:
    """Live processes of session ``sid``, or whose command line contains ``marker``."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            info = _proc_info(int(entry))
            if info is not None and (info[0] == sid or marker in info[1]):
                pids.append(int(entry))
    return pids


def _kill_all(sid: int, marker: str, what: str) -> None:
    for sig, grace in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, 5.0)):
        victims = _instance_pids(sid, marker)
        if not victims:
            return
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: not _instance_pids(sid, marker), grace, what=what)
    left = _instance_pids(sid, marker)
    if left:
        raise PeerError(f"{what}: still alive after SIGKILL: {left}")


# --------------------------------------------------------------------------------------
# primaries
# --------------------------------------------------------------------------------------


class PeerPrimary(StartStop):
    """A peer MTA as the primary of ``domain``; ``users`` are local parts or addresses
    in ``domain``, its only mailboxes. Common part: paths, users, lifecycle. Subclasses
    write the config.

    ``postmaster=True`` adds a ``postmaster@domain`` mailbox (the same as listing it in
    ``users``). By default there is none, as on many real primaries: what the MTA then
    answers for postmaster@ is its own business (OpenSMTPD refuses it like any unknown
    user; Debian's Exim ACL accepts it at RCPT anyway)."""

    peer: ClassVar[PeerName]
    _ready_pattern: ClassVar[str] = ""

    def __init__(
        self,
        workdir: Path,
        *,
        domain: str,
        users: Iterable[str],
        port: int | None = None,
        postmaster: bool = False,
    ) -> None:
        domain = domain.lower().rstrip(".")
        labels = domain.split(".")
        if len(labels) < 2 or not all(_NAME.match(label) for label in labels):
            raise ValueError(f"not a domain name: {domain!r}")
        local_parts = {"postmaster"} if postmaster else set()
        for user in users:
            local, sep, at_domain = user.lower().rpartition("@")
            if not sep:
                local = at_domain
            elif at_domain != domain:
                raise ValueError(f"user {user!r} is not in {domain}")
            if not _LOCAL_PART.match(local):
                raise ValueError(f"unsupported local part in {user!r}")
            local_parts.add(local)
        self._workdir = workdir.absolute()
        self._domain = domain
        self._local_parts = frozenset(local_parts)
        self._port = free_port() if port is None else port
        self._hostname = f"{self.peer}.{domain}"
        self._process: ManagedProcess | None = None
        self._sid: int | None = None

    # -- properties ------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def domain(self) -> str:
        return self._domain

    @property
    def hostname(self) -> str:
        """The name in the banner and EHLO reply."""
        return self._hostname

    @property
    def users(self) -> frozenset[str]:
        """The addresses with a mailbox: ``users``, and ``postmaster@domain`` only if it
        was listed or ``postmaster=True`` was passed."""
        return frozenset(f"{lp}@{self._domain}" for lp in self._local_parts)

    @property
    def workdir(self) -> Path:
        return self._workdir

    @property
    def mail_dir(self) -> Path:
        return self._workdir / "mail"

    @property
    def config_path(self) -> Path:
        return self._workdir / "etc" / f"{self.peer}.conf"

    @property
    def stderr_path(self) -> Path:
        return self._workdir / "log" / "daemon.out"

    @property
    def running(self) -> bool:
        return self._process is not None and not self._process.exited()

    @property
    def pid(self) -> int | None:
        """The daemon's pid (the leader of its session), None when stopped."""
        return None if self._process is None else self._process.pid

    def pids(self) -> list[int]:
        """Every live process of this instance: the daemon's session, and any process
        whose command line names this instance's config file."""
        sid = self.pid or self._sid
        return _instance_pids(sid if sid is not None else -1, str(self.config_path))

    # -- for subclasses --------------------------------------------------------------

    def _prepare(self, tree: Path) -> list[str]:
        """Write the config and dirs; return the daemon's argv (foreground)."""
        raise NotImplementedError

    def _before_start(self) -> None:
        """Called first in start(); may take system-wide resources."""

    def _after_stop(self) -> None:
        """Called last in stop(); gives them back."""

    def log(self) -> str:
        """The MTA's main log."""
        raise NotImplementedError

    # -- lifecycle -------------------------------------------------------------------

    def _text(self, path: Path) -> str:
        try:
            return path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _diagnostics(self) -> str:
        tail = "\n".join(self.log().splitlines()[-40:])
        out = "\n".join(self._text(self.stderr_path).splitlines()[-40:])
        return f"--- log tail ---\n{tail}\n--- daemon stdout/stderr ---\n{out}"

    def start(self) -> None:
        """Fetch (first time), write the config, start the daemon, and return once it
        listens on 127.0.0.1:port. Stops everything again if any step fails."""
        if self._process is not None:
            raise PeerError(f"{self!r} is already started")
        ok, why = peer_available(self.peer)
        if not ok:
            raise PeerError(why)
        tree = fetch_peer(self.peer)
        binary = tree / BINARIES[self.peer]
        _check_libraries(binary)
        self._workdir.mkdir(mode=0o755, parents=True, exist_ok=True)
        for sub in ("etc", "log"):
            (self._workdir / sub).mkdir(mode=0o755, exist_ok=True)
        stop_at_exit(self)
        try:
            self._before_start()
            # setsid(1) execs the daemon in a new session without forking (a Popen
            # child is never a process-group leader), so the session id is its pid.
            argv = ["setsid", *self._prepare(tree)]
            self._process = ManagedProcess(
                argv,
                self.stderr_path,
                what=f"{self.peer} listening on 127.0.0.1:{self._port}",
                ready=self._ready,
                start_timeout=START_TIMEOUT,
                stop_timeout=STOP_TIMEOUT,
            )
            self._process.start()
        except BaseException as exc:
            with contextlib.suppress(Exception):
                self.stop()
            if isinstance(exc, TimeoutError | RuntimeError) and not isinstance(exc, PeerError):
                raise PeerError(f"{self.peer} did not start: {exc}\n{self._diagnostics()}") from exc
            raise

    def _ready(self) -> bool:
        # Noted here because ManagedProcess forgets the pid when a start fails.
        if self._process is not None and self._process.pid is not None:
            self._sid = self._process.pid
        return listening(self._port)

    def stop(self) -> None:
        """End the daemon and every process it started; idempotent."""
        process, self._process = self._process, None
        sid, self._sid = self._sid, None
        try:
            if process is not None:
                if process.pid is not None:
                    sid = process.pid
                process.stop()
            if sid is not None:
                _kill_all(sid, str(self.config_path), f"{self.peer} processes of {self._workdir}")
        finally:
            try:
                self._after_stop()
            finally:
                forget_at_exit(self)

    # -- mailboxes -------------------------------------------------------------------

    def _maildir(self, addr: str) -> Path:
        local, _, domain = addr.lower().rpartition("@")
        if domain != self._domain:
            raise ValueError(f"{addr!r} is not in {self._domain}")
        return self.mail_dir / local

    def mailbox(self, addr: str) -> list[bytes]:
        """The messages delivered to ``addr``, oldest first."""
        return maildir_messages(self._maildir(addr))

    def mailbox_count(self, addr: str) -> int:
        """How many messages were delivered to ``addr`` (0 for an unknown user)."""
        return maildir_count(self._maildir(addr))

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<{type(self).__name__} {self._domain} 127.0.0.1:{self._port} {state}>"


# --------------------------------------------------------------------------------------
# Exim
# --------------------------------------------------------------------------------------

EXIM_USER = "Debian-exim"  # compiled into Debian's exim4 (EXIM_USER=ref:Debian-exim)

# The rcpt ACL is Debian's default one (exim4-config's acl_check_rcpt), minus the
# parts for local submission, relaying clients and DKIM.
EXIM_CONF = """\
# written by tests.harness.peers
exim_path = {exim_path}
primary_hostname = {hostname}
qualify_domain = {domain}
domainlist local_domains = {domain}
domainlist relay_to_domains =
hostlist relay_from_hosts =
local_interfaces = 127.0.0.1
daemon_smtp_ports = {port}
spool_directory = {workdir}/spool
log_file_path = {workdir}/log/%slog
pid_file_path = {workdir}/exim.pid
log_selector = +smtp_connection +received_recipients
deliver_drop_privilege = true
never_users = root
keep_environment =
host_lookup =
rfc1413_hosts =
rfc1413_query_timeout = 0s
tls_advertise_hosts =
acl_smtp_rcpt = acl_check_rcpt
acl_smtp_data = acl_check_data

begin acl

acl_check_rcpt:
  accept hosts = :

  deny    domains = +local_domains
          local_parts = ^[.] : ^.*[@%!/|]
          message = restricted characters in address

  deny    domains = !+local_domains
          local_parts = ^[./|] : ^.*[@%!] : ^.*/\\\\.\\\\./
          message = restricted characters in address

  accept  local_parts = postmaster
          domains = +local_domains

  accept  hosts = +relay_from_hosts

  require message = relay not permitted
          domains = +local_domains : +relay_to_domains

  require verify = recipient

  accept

acl_check_data:
  accept

begin routers

known_users:
  driver = accept
  domains = +local_domains
  local_parts = lsearch;{workdir}/etc/users
  transport = maildir_delivery

begin transports

maildir_delivery:
  driver = appendfile
  directory = {workdir}/mail/${{local_part_data}}
  maildir_format
  create_directory
  delivery_date_add
  envelope_to_add
  return_path_add
  mode = 0600

begin retry

*                      *           F,2h,15m; G,16h,1h,1.5; F,4d,6h
"""


class EximPrimary(PeerPrimary):
    """A real Exim 4 (Debian 12's exim4-daemon-light) serving ``domain`` to ``users``.

    Unknown users get ``550 Unrouteable address`` at RCPT TO (``require verify =
    recipient``), other domains ``550 relay not permitted``."""

    peer: ClassVar[PeerName] = "exim"

    @property
    def mainlog_path(self) -> Path:
        return self._workdir / "log" / "mainlog"

    def log(self) -> str:
        return self._text(self.mainlog_path)

    def panic_log(self) -> str:
        return self._text(self._workdir / "log" / "paniclog")

    def _diagnostics(self) -> str:
        return f"{super()._diagnostics()}\n--- paniclog ---\n{self.panic_log()}"

    def _prepare(self, tree: Path) -> list[str]:
        _ensure_user(EXIM_USER)
        exim = tree / BINARIES["exim"]
        # Exim re-execs exim_path as Debian-exim to deliver, into dirs under workdir.
        _check_traversable(exim.parent, EXIM_USER)
        _check_traversable(self._workdir, EXIM_USER)
        owner = pwd.getpwnam(EXIM_USER)
        for sub in ("spool", "log", "mail"):
            path = self._workdir / sub
            path.mkdir(mode=0o750, exist_ok=True)
            os.chown(path, owner.pw_uid, owner.pw_gid)
        users = "".join(f"{lp}: {lp}\n" for lp in sorted(self._local_parts))
        (self._workdir / "etc" / "users").write_text(users)
        self.config_path.write_text(
            EXIM_CONF.format(
                exim_path=exim,
                hostname=self._hostname,
                domain=self._domain,
                port=self._port,
                workdir=self._workdir,
            )
        )
        check = _run([str(exim), "-C", str(self.config_path), "-bV"])
        if check.returncode != 0:
            raise PeerError(f"exim -bV rejects {self.config_path}:\n{check.stdout}{check.stderr}")
        # -bdf: daemon in the foreground; no queue runner (delivery is immediate).
        return [str(exim), "-C", str(self.config_path), "-bdf"]


# --------------------------------------------------------------------------------------
# OpenSMTPD
# --------------------------------------------------------------------------------------

OPENSMTPD_USERS = ("opensmtpd", "opensmtpq")  # Debian's SMTPD_USER / SMTPD_QUEUE_USER
OPENSMTPD_SPOOL = Path("/var/spool/smtpd")
OPENSMTPD_SOCKET = Path("/var/run/smtpd.sock")
OPENSMTPD_CHROOT = Path("/var/lib/opensmtpd/empty")
OPENSMTPD_LIBEXEC = Path("/usr/libexec/opensmtpd")
OPENSMTPD_LOCK = Path("/run/lock/callahead-peer-opensmtpd.lock")
OPENSMTPD_LOCK_TIMEOUT = 120.0

# The usual virtual-domain setup of smtpd.conf(5): a virtual table maps each address
# to a system user (here "vmail", defined by a userbase table as uid/gid 65534).
OPENSMTPD_CONF = """\
# written by tests.harness.peers
table virtuals file:{workdir}/etc/virtuals
table userinfo file:{workdir}/etc/userinfo
listen on 127.0.0.1 port {port} hostname {hostname}
action "deliver" maildir "{workdir}/mail/%{{dest.user:lowercase}}" virtual <virtuals> \\
    userbase <userinfo>
match from any for domain "{domain}" action "deliver"
"""

_opensmtpd_lock = threading.Lock()


class OpenSmtpdPrimary(PeerPrimary):
    """A real OpenSMTPD (Debian 12's opensmtpd 6.8) serving ``domain`` to ``users``.

    Unknown users of the domain get ``524 5.2.4 Mailing list expansion problem`` at RCPT
    TO (that is OpenSMTPD 6.8's reply when a ``virtual`` table has no entry), and so does
    ``postmaster@`` without ``postmaster=True``; other domains ``550 Invalid
    recipient``. Only one runs per machine at a time."""

    peer: ClassVar[PeerName] = "opensmtpd"

    def __init__(
        self,
        workdir: Path,
        *,
        domain: str,
        users: Iterable[str],
        port: int | None = None,
        postmaster: bool = False,
    ) -> None:
        super().__init__(workdir, domain=domain, users=users, port=port, postmaster=postmaster)
        self._lock_file: IO[str] | None = None
        self._linked_libexec = False

    def log(self) -> str:
        return self._text(self.stderr_path)  # smtpd -d logs to stderr

    def _diagnostics(self) -> str:
        tail = "\n".join(self.log().splitlines()[-60:])
        return f"--- smtpd log tail ({self.stderr_path}) ---\n{tail}"

    def _acquire(self) -> None:
        if not _opensmtpd_lock.acquire(blocking=False):
            raise PeerError(
                "another OpenSmtpdPrimary is running in this process; OpenSMTPD's "
                "compiled-in spool and control socket allow one per machine"
            )
        try:
            OPENSMTPD_LOCK.parent.mkdir(parents=True, exist_ok=True)
            handle = OPENSMTPD_LOCK.open("a")

            def take() -> bool:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return False
                return True

            try:
                wait_for(
                    take,
                    OPENSMTPD_LOCK_TIMEOUT,
                    interval=0.1,
                    what=f"{OPENSMTPD_LOCK} (an OpenSMTPD primary of another process)",
                )
            except TimeoutError as exc:
                handle.close()
                raise PeerError(str(exc)) from exc
            self._lock_file = handle
        except BaseException:
            _opensmtpd_lock.release()
            raise

    def _release(self) -> None:
        handle, self._lock_file = self._lock_file, None
        if handle is not None:
            handle.close()  # releases the flock
            _opensmtpd_lock.release()

    def _before_start(self) -> None:
        self._acquire()

    def _after_stop(self) -> None:
        if self._lock_file is None:
            return
        try:
            shutil.rmtree(OPENSMTPD_SPOOL, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                OPENSMTPD_SOCKET.unlink()
            if self._linked_libexec and OPENSMTPD_LIBEXEC.is_symlink():
                OPENSMTPD_LIBEXEC.unlink()
            self._linked_libexec = False
        finally:
            self._release()

    def _link_libexec(self, tree: Path) -> None:
        target = tree / "usr" / "libexec" / "opensmtpd"
        if OPENSMTPD_LIBEXEC.is_symlink():
            OPENSMTPD_LIBEXEC.unlink()  # left by an earlier run (we hold the lock)
        elif OPENSMTPD_LIBEXEC.exists():
            raise PeerError(f"{OPENSMTPD_LIBEXEC} exists and is not ours; is OpenSMTPD installed?")
        OPENSMTPD_LIBEXEC.parent.mkdir(parents=True, exist_ok=True)
        OPENSMTPD_LIBEXEC.symlink_to(target)
        self._linked_libexec = True

    def _prepare(self, tree: Path) -> list[str]:
        for user in OPENSMTPD_USERS:
            _ensure_user(user)
        smtpd = tree / BINARIES["opensmtpd"]
        # The delivery helper runs as nobody; it writes maildirs under workdir.
        _check_traversable(tree / "usr" / "libexec" / "opensmtpd", "nobody")
        _check_traversable(self._workdir, "nobody")
        # A stale queue from a killed run would be delivered to its old paths.
        shutil.rmtree(OPENSMTPD_SPOOL, ignore_errors=True)
        OPENSMTPD_CHROOT.mkdir(mode=0o755, parents=True, exist_ok=True)
        self._link_libexec(tree)
        self.mail_dir.mkdir(mode=0o755, exist_ok=True)
        os.chown(self.mail_dir, NOBODY_UID, NOBODY_GID)
        etc = self._workdir / "etc"
        virtuals = "".join(f"{lp}@{self._domain} vmail\n" for lp in sorted(self._local_parts))
        (etc / "virtuals").write_text(virtuals)
        (etc / "userinfo").write_text(f"vmail {NOBODY_UID}:{NOBODY_GID}:{self.mail_dir}\n")
        self.config_path.write_text(
            OPENSMTPD_CONF.format(
                workdir=self._workdir,
                port=self._port,
                hostname=self._hostname,
                domain=self._domain,
            )
        )
        check = _run([str(smtpd), "-n", "-f", str(self.config_path)])
        if check.returncode != 0:
            raise PeerError(f"smtpd -n rejects {self.config_path}:\n{check.stdout}{check.stderr}")
        # -d: foreground, log to stderr.
        return [str(smtpd), "-d", "-f", str(self.config_path)]


PRIMARIES: dict[PeerName, type[PeerPrimary]] = {
    "exim": EximPrimary,
    "opensmtpd": OpenSmtpdPrimary,
}
