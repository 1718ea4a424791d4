"""Throwaway real Postfix instances under a temp dir.

Each ``PostfixInstance`` has its own ``config_directory`` (``WORKDIR/etc``, passed as
``-c`` to every Postfix command), queue (``WORKDIR/queue``), data directory
(``WORKDIR/data``) and log file (``WORKDIR/maillog``), and its smtpd listens only on the
127.0.0.1 ports of its ``Listener`` objects, so several can run at once.

Traps handled here (docs/design.md has the measurements):

- master.cf is written from scratch with chroot ``n`` everywhere and a ``postlog`` line,
  and ``maillog_file_prefixes`` covers ``WORKDIR``;
- ``compatibility_level = 3.6``;
- the work dir and its parents must be traversable by the ``postfix`` user (checked),
  the queue dir is created 0755, the data dir is left for Postfix to create (it must
  be owned by ``postfix``);
- ``postfix`` reports most failures only in the maillog: every failure raises
  ``PostfixError`` carrying the tail of the maillog;
- ``postfix stop`` returns before the master exits: ``stop()`` waits until every
  process of the master's session has exited (zombies awaiting PID 1 count as exited),
  SIGKILL as a fallback;
- Postfix re-reads a just-written ("hot") main.cf or texthash map every 300 ms until
  it is a second or two old: the harness backdates the files it writes, which cut a
  start from ~2.7 s to ~0.4 s;
- instances still running at interpreter exit are stopped by an ``atexit`` hook.

``backup_mx_main_cf`` builds a backup MX from the production snippet
(``deploy/postfix-main.cf``), replacing only ``relay_domains``, ``transport_maps`` and
``smtpd_milters``; ``primary_main_cf`` builds a Postfix primary that knows its users
through ``virtual_mailbox_maps`` and delivers into maildirs under the work dir.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.harness.lifecycle import (
    StartStop,
    forget_at_exit,
    maildir_count,
    maildir_messages,
    still_running,
    stop_at_exit,
)
from tests.harness.ports import listening
from tests.harness.waiting import wait_for

__all__ = [
    "POLICY_SNIPPET",
    "SNIPPET",
    "Listener",
    "PostfixError",
    "PostfixInstance",
    "backup_mx_main_cf",
    "instance_paths",
    "maildir_for",
    "policy_listener",
    "policy_overrides",
    "postfix_available",
    "primary_main_cf",
    "smtp_nexthop",
    "snippet_settings",
    "stop_instances_under",
    "write_virtual_users",
]

SBIN = Path("/usr/sbin")
SNIPPET = Path(__file__).resolve().parents[2] / "deploy" / "postfix-main.cf"
"""The production main.cf snippet that every backup MX built here starts from."""
POLICY_SNIPPET = Path(__file__).resolve().parents[2] / "deploy" / "postfix-policy-main.cf"
"""The production main.cf snippet for callahead's policy service."""
POLICY_SERVICE = "check_policy_service unix:callahead/policy.sock"
"""The policy service as POLICY_SNIPPET names it, replaced by the test's own."""


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is not None:
        return found
    return str(SBIN / name)


POSTFIX = _tool("postfix")
POSTQUEUE = _tool("postqueue")
POSTCONF = _tool("postconf")
POSTMAP = _tool("postmap")

START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
COMMAND_TIMEOUT = 60.0

# Every service a backup MX or a virtual-mailbox primary needs, all with chroot "n".
# No tlsmgr: nothing here offers STARTTLS (smtpd_tls_security_level is empty).
MASTER_CF_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

_PARAM_NAME = re.compile(r"^[A-Za-z0-9_]+$")


class PostfixError(RuntimeError):
    """A Postfix command failed or an instance misbehaved; the message has the maillog."""


def postfix_available() -> tuple[bool, str]:
    """Whether this process can run throwaway Postfix instances, and why not."""
    if os.geteuid() != 0:
        return False, "needs root (the Postfix master must start as root)"
    if not Path(POSTFIX).exists():
        return False, f"{POSTFIX} not found (apt-get install postfix)"
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        return False, "no 'postfix' user"
    return True, ""


# --------------------------------------------------------------------------------------
# main.cf / master.cf building
# --------------------------------------------------------------------------------------


def _check_name(name: str) -> None:
    if not _PARAM_NAME.match(name):
        raise ValueError(f"not a Postfix parameter name: {name!r}")


def _check_value(name: str, value: str) -> None:
    if "\n" in value or "\r" in value:
        raise ValueError(f"{name}: value must be one line: {value!r}")


@dataclass(frozen=True)
class Listener:
    """One smtpd on ``host:port`` (127.0.0.1 unless given: another loopback address
    serves as an MX host on port 25), with per-service ``-o key=value`` overrides.

    A value with whitespace is written in the ``-o { key = value }`` form; braces in a
    value must balance (``inline:{a=b}`` is fine); commas are fine.
    """

    port: int
    overrides: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"bad port {self.port}")
        for key, value in self.overrides.items():
            _check_name(key)
            _check_value(key, value)
            depth = 0
            for ch in value:
                depth += {"{": 1, "}": -1}.get(ch, 0)
                if depth < 0:
                    break
            if depth != 0:
                raise ValueError(f"-o {key}: unbalanced braces in {value!r}")
            if value != value.strip():
                raise ValueError(f"-o {key}: leading/trailing whitespace in {value!r}")

    def master_cf_line(self) -> str:
        parts = [f"{self.host}:{self.port} inet n - n - - smtpd"]
        for key, value in self.overrides.items():
            if any(ch.isspace() for ch in value):
                parts.append(f"-o {{ {key} = {value} }}")
            else:
                parts.append(f"-o {key}={value}")
        return " ".join(parts)


def snippet_settings(path: Path) -> dict[str, str]:
    """Parse a main.cf snippet into an ordered ``{key: value}`` dict.

    Follows main.cf rules: lines whose first non-blank character is ``#`` and blank
    lines are ignored; a line starting with whitespace continues the previous logical
    line (joined with one space); ``#`` later in a line is part of the value. A key
    given twice keeps its first position and its last value, as in Postfix.
    """
    settings: dict[str, str] = {}
    current: str | None = None

    for lineno, raw in enumerate(path.read_text().splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if raw[0].isspace():
            if current is None:
                raise ValueError(f"{path}:{lineno}: continuation line without a setting")
            settings[current] = f"{settings[current]} {stripped}".strip()
            continue
        key, sep, value = raw.partition("=")
        key = key.strip()
        if not sep or not _PARAM_NAME.match(key):
            raise ValueError(f"{path}:{lineno}: not a 'key = value' line: {raw!r}")
        settings[key] = value.strip()
        current = key
    return settings


@dataclass(frozen=True)
class InstancePaths:
    workdir: Path
    config_dir: Path
    queue_dir: Path
    data_dir: Path
    maillog: Path
    syslog_name: str


def instance_paths(workdir: Path) -> InstancePaths:
    """Where an instance in ``workdir`` keeps its config, queue, data and log."""
    workdir = workdir.absolute()
    tag = re.sub(r"[^A-Za-z0-9_.-]", "_", workdir.name)
    return InstancePaths(
        workdir=workdir,
        config_dir=workdir / "etc",
        queue_dir=workdir / "queue",
        data_dir=workdir / "data",
        maillog=workdir / "maillog",
        syslog_name=f"postfix-{tag}",
    )


def _path_settings(workdir: Path) -> dict[str, str]:
    paths = instance_paths(workdir)
    return {
        "queue_directory": str(paths.queue_dir),
        "data_directory": str(paths.data_dir),
        "maillog_file": str(paths.maillog),
        "maillog_file_prefixes": str(paths.workdir),
        "syslog_name": paths.syslog_name,
    }


def _throwaway_settings(workdir: Path, *, hostname: str, in_flow_delay: str) -> dict[str, str]:
    """Settings every throwaway instance gets: its own dirs, loopback only, nothing
    delivered locally, nothing sent outside, quick retries."""
    return {
        "compatibility_level": "3.6",
        "myhostname": hostname,
        "mydestination": "",
        "local_recipient_maps": "",
        "alias_maps": "",
        "alias_database": "",
        # The 127.0.0.1 test client must not be in mynetworks, or permit_mynetworks
        # would let it relay anywhere.
        "mynetworks": "192.0.2.0/24",
        "inet_interfaces": "127.0.0.1",
        "inet_protocols": "ipv4",
        "in_flow_delay": in_flow_delay,
        # No reverse DNS lookups of 127.0.0.1 (the client shows up as "unknown").
        "smtpd_peername_lookup": "no",
        # Mail for anything without a transport_maps entry (bounces to test senders,
        # say) fails at once instead of going out to the DNS.
        "default_transport": "error:5.3.0 no delivery outside the test domains",
        "minimal_backoff_time": "1s",
        "maximal_backoff_time": "5s",
        "queue_run_delay": "1s",
        "smtp_connect_timeout": "2s",
        "smtp_helo_timeout": "5s",
        "delay_warning_time": "0h",
        "biff": "no",
        **_path_settings(workdir),
    }


def smtp_nexthop(port: int, host: str = "127.0.0.1") -> str:
    """``smtp:[host]:port``: a transport(5) entry for an SMTP server, no MX lookup."""
    return f"smtp:[{host}]:{port}"


def _inline_table(entries: Mapping[str, str]) -> str:
    """``inline:{k1=v1, k2=v2}``. Postfix 3.7 rejects spaces around ``=`` here
    ("missing '=' after attribute name"); a comma plus space between pairs is fine."""
    if not entries:
        return ""
    for key, value in entries.items():
        for text in (key, value):
            if not text or re.search(r"[\s,={}]", text):
                raise ValueError(f"bad inline: table entry {key!r}={value!r}")
    return "inline:{" + ", ".join(f"{k}={v}" for k, v in entries.items()) + "}"


def backup_mx_main_cf(
    snippet: Path = SNIPPET,
    *,
    workdir: Path,
    relay_domains: list[str],
    transports: dict[str, str],
    milter: str | None,
    hostname: str = "backup.test",
    in_flow_delay: str = "0s",
) -> dict[str, str]:
    """main.cf for a throwaway backup MX built from the production ``snippet``
    (deploy/postfix-main.cf unless another is given).

    Exactly three snippet settings are replaced: ``relay_domains`` (``relay_domains``
    joined with commas), ``transport_maps`` (an ``inline:`` table built from
    ``transports``: domain -> transport, where a bare ``[host]:port`` gets ``smtp:``
    prepended; see ``smtp_nexthop``) and ``smtpd_milters`` (``milter``, e.g.
    ``inet:127.0.0.1:PORT``, or empty). Everything else in the snippet is kept
    verbatim, then the throwaway-instance settings are added (own dirs, loopback,
    ``mynetworks = 192.0.2.0/24``, ``in_flow_delay``, short retry timers...); those
    win if the snippet ever sets one of them.
    """
    routes = {
        domain: (f"smtp:{target}" if target.startswith("[") else target)
        for domain, target in transports.items()
    }
    settings = snippet_settings(snippet)
    settings["relay_domains"] = ", ".join(relay_domains)
    settings["transport_maps"] = _inline_table(routes)
    settings["smtpd_milters"] = milter or ""
    settings.update(_throwaway_settings(workdir, hostname=hostname, in_flow_delay=in_flow_delay))
    return settings


def policy_overrides(snippet: Path, service: str) -> dict[str, str]:
    """smtpd ``-o`` overrides that attach one listener of a backup MX to a policy
    service, from the production policy ``snippet``: every setting of it except
    ``relay_domains`` and ``transport_maps`` (those of the instance stay), verbatim but
    for the service address (``service``, e.g. ``inet:127.0.0.1:PORT``); and no milter."""
    settings = snippet_settings(snippet)
    for key in ("relay_domains", "transport_maps"):
        settings.pop(key, None)
    restrictions = settings["smtpd_recipient_restrictions"]
    if POLICY_SERVICE not in restrictions:
        raise ValueError(f"{snippet} does not say {POLICY_SERVICE!r}")
    settings["smtpd_recipient_restrictions"] = restrictions.replace(
        POLICY_SERVICE, f"check_policy_service {service}"
    )
    settings["smtpd_milters"] = ""
    return settings


def policy_listener(
    port: int, service: str, overrides: Mapping[str, str] | None = None
) -> Listener:
    """One smtpd of a backup MX on ``port`` attached to the policy service ``service``
    as the production policy snippet (``POLICY_SNIPPET``) attaches it, no milter:
    ``overrides`` of its own first, then ``policy_overrides``, which win."""
    return Listener(port, {**(overrides or {}), **policy_overrides(POLICY_SNIPPET, service)})


def maildir_for(mailbox_base: Path, addr: str) -> Path:
    """The maildir ``primary_main_cf`` assigns to ``addr``: ``BASE/domain/localpart/``."""
    local, _, domain = addr.lower().rpartition("@")
    if not local or not domain or "/" in addr:
        raise ValueError(f"not an address: {addr!r}")
    return mailbox_base / domain / local


def _backdate(path: Path) -> None:
    """Postfix treats a config or table file modified within the last second or so as
    "hot" and re-reads it every 300 ms until it has cooled down: a freshly written
    main.cf made the first command after it take about 2.4 s, a fresh texthash map the
    first smtpd 1.2 s. Backdating the mtime by a few seconds avoids both."""
    past = time.time() - 10
    os.utime(path, (past, past))


def _virtual_map_path(workdir: Path) -> Path:
    return workdir.absolute() / "virtual_mailboxes"


def write_virtual_users(workdir: Path, users: Iterable[str]) -> Path:
    """(Re)write the source of the primary's mailbox map (a ``texthash:`` map, or the
    source of a ``hash:`` one: ``PostfixInstance.set_virtual_users`` runs postmap and
    reloads)."""
    lines = []
    for user in users:
        local, _, domain = user.lower().rpartition("@")
        maildir_for(Path("/"), user)  # validates
        lines.append(f"{user.lower()} {domain}/{local}/\n")
    path = _virtual_map_path(workdir)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(lines))
    tmp.chmod(0o644)
    _backdate(tmp)
    tmp.replace(path)
    return path


def primary_main_cf(
    *,
    workdir: Path,
    users: Iterable[str],
    domains: Iterable[str] | None = None,
    hostname: str = "primary.test",
    in_flow_delay: str = "0s",
    mailbox_owner: str = "nobody",
    map_type: str = "texthash",
    postmaster: bool = False,
) -> dict[str, str]:
    """main.cf for a throwaway Postfix *primary* that knows ``users``.

    ``virtual_mailbox_domains`` is ``domains`` (default: the users' domains),
    ``virtual_mailbox_maps`` a ``texthash:`` file in ``workdir`` (see
    ``write_virtual_users``) or, with ``map_type="hash"``, a ``hash:`` map built by
    postmap at start, as most sites keep it; mail goes to maildirs under
    ``WORKDIR/vmail`` owned by ``mailbox_owner``. Unknown users get Postfix's own
    ``550 5.1.1 ... User unknown in virtual mailbox table``. ``postmaster@`` is one of
    them only with ``postmaster``: by default it gets that 550 too, as at the many real
    sites whose database-backed virtual domains have no postmaster alias. Error
    limits (``smtpd_soft_error_limit`` ...) and junk command limits keep their Postfix
    defaults.
    """
    if map_type not in ("texthash", "hash"):
        raise ValueError(f"map_type must be texthash or hash, not {map_type!r}")
    workdir = workdir.absolute()
    user_list = [u.lower() for u in users]
    domain_list = (
        sorted({u.rpartition("@")[2] for u in user_list})
        if domains is None
        else [d.lower() for d in domains]
    )
    if postmaster:
        user_list += [f"postmaster@{d}" for d in domain_list if f"postmaster@{d}" not in user_list]
    if not domain_list:
        raise ValueError("a primary needs at least one domain")
    owner = pwd.getpwnam(mailbox_owner)
    base = workdir / "vmail"
    base.mkdir(mode=0o755, exist_ok=True)
    os.chown(base, owner.pw_uid, owner.pw_gid)
    map_path = write_virtual_users(workdir, user_list)
    settings = _throwaway_settings(workdir, hostname=hostname, in_flow_delay=in_flow_delay)
    settings.update(
        {
            "relay_domains": "",
            "transport_maps": "",
            "smtpd_milters": "",
            "virtual_mailbox_domains": ", ".join(domain_list),
            "virtual_mailbox_maps": f"{map_type}:{map_path}",
            "virtual_mailbox_base": str(base),
            "virtual_uid_maps": f"static:{owner.pw_uid}",
            "virtual_gid_maps": f"static:{owner.pw_gid}",
        }
    )
    return settings


# --------------------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------------------


def _proc_stat(pid: int) -> tuple[str, str, int] | None:
    """``(comm, state, session)`` of a live process, None if gone or a zombie."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    comm = stat_line[stat_line.index("(") + 1 : stat_line.rindex(")")]
    fields = stat_line[stat_line.rindex(")") + 2 :].split()
    # fields[0] is the state, [1] ppid, [2] pgrp, [3] session
    if fields[0] in ("Z", "X"):
        return None  # exited; only waiting to be reaped
    return comm, fields[0], int(fields[3])


def _session_pids(sid: int) -> list[int]:
    """Pids of every live process in session ``sid`` (the master calls setsid(), so
    that is the master and all its children)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = _proc_stat(int(entry))
            if info is not None and info[2] == sid:
                pids.append(int(entry))
    return pids


def _is_master(pid: int) -> bool:
    info = _proc_stat(pid)
    return info is not None and info[0] == "master" and info[2] == pid


def stop_instances_under(path: Path) -> None:
    """Stop every instance of this process whose work dir is ``path`` or below it."""
    path = path.absolute()
    for instance in still_running(PostfixInstance):
        if instance.workdir == path or path in instance.workdir.parents:
            instance.stop()


class PostfixInstance(StartStop):
    """A real Postfix living in ``workdir``, with smtpd on ``smtpd_listeners``.

    ``main_cf`` is written as the instance's main.cf, except that the dirs, log and
    ``syslog_name`` always come from ``workdir`` (see ``instance_paths``).
    """

    def __init__(
        self,
        workdir: Path,
        main_cf: Mapping[str, str],
        smtpd_listeners: Sequence[Listener],
    ) -> None:
        if not smtpd_listeners:
            raise ValueError("at least one smtpd listener is needed")
        ports = [listener.port for listener in smtpd_listeners]
        if len(set(ports)) != len(ports):
            raise ValueError(f"duplicate listener ports: {ports}")
        self._paths = instance_paths(workdir)
        self._main_cf: dict[str, str] = dict(main_cf)
        self._main_cf.update(_path_settings(self._paths.workdir))
        for key, value in self._main_cf.items():
            _check_name(key)
            _check_value(key, value)
        self._listeners = list(smtpd_listeners)
        self._master_pid: int | None = None

    # -- properties ------------------------------------------------------------------

    @property
    def workdir(self) -> Path:
        return self._paths.workdir

    @property
    def config_dir(self) -> Path:
        return self._paths.config_dir

    @property
    def queue_dir(self) -> Path:
        return self._paths.queue_dir

    @property
    def maillog_path(self) -> Path:
        return self._paths.maillog

    @property
    def listeners(self) -> list[Listener]:
        return list(self._listeners)

    @property
    def port(self) -> int:
        """The first listener's port."""
        return self._listeners[0].port

    @property
    def main_cf(self) -> dict[str, str]:
        return dict(self._main_cf)

    @property
    def master_pid(self) -> int | None:
        """The running master's pid, or None."""
        try:
            text = (self.queue_dir / "pid" / "master.pid").read_text().strip()
            pid = int(text)
        except (OSError, ValueError):
            return None
        return pid if _is_master(pid) else None

    @property
    def running(self) -> bool:
        return self.master_pid is not None

    # -- files -----------------------------------------------------------------------

    def _check_traversable(self) -> None:
        for directory in (self.workdir, *self.workdir.parents):
            mode = directory.stat().st_mode
            if not mode & stat.S_IXOTH:
                raise PostfixError(
                    f"{directory} (mode {stat.filemode(mode)}) is not traversable by the "
                    "postfix user; use a 0755 dir outside pytest's 0700 tmp_path "
                    "(tests.harness.fixtures.tmp_workdir)"
                )

    def write_config(self) -> None:
        """Write main.cf and master.cf and create the queue dir."""
        self.workdir.mkdir(mode=0o755, parents=True, exist_ok=True)
        self._check_traversable()
        self.config_dir.mkdir(mode=0o755, exist_ok=True)
        self.queue_dir.mkdir(mode=0o755, exist_ok=True)
        self.queue_dir.chmod(0o755)
        main = "".join(f"{key} = {value}\n" for key, value in self._main_cf.items())
        (self.config_dir / "main.cf").write_text("# written by tests.harness.postfix\n" + main)
        master = "".join(f"{listener.master_cf_line()}\n" for listener in self._listeners)
        (self.config_dir / "master.cf").write_text(
            "# written by tests.harness.postfix\n" + master + MASTER_CF_SERVICES
        )
        self._cool_config()

    def _cool_config(self) -> None:
        for name in ("main.cf", "master.cf"):
            _backdate(self.config_dir / name)

    def maillog(self) -> str:
        try:
            return self.maillog_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _maillog_tail(self, lines: int = 60) -> str:
        text = self.maillog()
        if not text:
            return f"(no maillog at {self.maillog_path})"
        return "\n".join(text.splitlines()[-lines:])

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """Wait until ``pattern`` (a regex) appears in the maillog; return the match."""
        regex = re.compile(pattern)
        try:
            match = wait_for(
                lambda: regex.search(self.maillog()),
                timeout,
                interval=0.05,
                what=f"{pattern!r} in {self.maillog_path}",
            )
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n--- maillog tail ---\n{self._maillog_tail()}") from None
        assert match is not None
        return match

    # -- commands --------------------------------------------------------------------

    def _run(self, argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        if check and proc.returncode != 0:
            raise PostfixError(
                f"{' '.join(argv)} exited {proc.returncode}\n"
                f"stdout: {proc.stdout.strip()}\nstderr: {proc.stderr.strip()}\n"
                f"--- maillog tail ({self.maillog_path}) ---\n{self._maillog_tail()}"
            )
        return proc

    def postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``postfix -c CONFIG_DIR ARGS...``."""
        return self._run([POSTFIX, "-c", str(self.config_dir), *args], check=check)

    def postqueue(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``postqueue -c CONFIG_DIR ARGS...``."""
        return self._run([POSTQUEUE, "-c", str(self.config_dir), *args])

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Write the config, ``postfix check``, ``postfix start``, and wait until the
        master runs and every listener accepts TCP. Stops again if any step fails."""
        if self.running:
            raise PostfixError(f"Postfix in {self.workdir} is already running")
        self.write_config()
        stop_at_exit(self)
        try:
            self._postmap_hash_maps()
            self.postfix("check")
            self.postfix("start")
            self._master_pid = wait_for(
                lambda: self.master_pid, START_TIMEOUT, interval=0.02, what="the master pid"
            )
            for listener in self._listeners:
                wait_for(
                    functools.partial(listening, listener.port, listener.host),
                    START_TIMEOUT,
                    interval=0.02,
                    what=f"smtpd listening on {listener.host}:{listener.port}",
                )
        except BaseException as exc:
            with contextlib.suppress(Exception):
                self.stop()
            if isinstance(exc, TimeoutError):
                raise PostfixError(f"{exc}\n--- maillog tail ---\n{self._maillog_tail()}") from exc
            raise

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """``postfix stop`` and wait until the master and all its children have exited
        (SIGKILL after ``timeout``). Does nothing if the instance is not running.

        Measured here: they exit within ~30 ms, but stay zombies for ~1.5 s until PID 1
        reaps them (that is the "master exits 1.5 s later" a ``kill -0`` loop sees). A
        zombie holds no sockets or files, so zombies count as gone."""
        pid = self.master_pid or self._master_pid
        try:
            if pid is None or not _session_pids(pid):
                return
            if self.running:
                try:
                    stopped = self.postfix("stop", check=False).returncode == 0
                except (OSError, subprocess.SubprocessError):
                    stopped = False
                if not stopped:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)
            try:
                wait_for(
                    lambda: not _session_pids(pid),
                    timeout,
                    interval=0.02,
                    what=f"Postfix master {pid} and its children to exit",
                )
            except TimeoutError:
                for victim in _session_pids(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(victim, signal.SIGKILL)
                wait_for(
                    lambda: not _session_pids(pid),
                    5.0,
                    what=f"killed Postfix session {pid} to vanish",
                )
        finally:
            self._master_pid = None
            forget_at_exit(self)

    def reload(self) -> None:
        """``postfix reload``; returns once the master has re-read its config and (as far
        as they do so within 3 s) the old idle children have exited."""
        if not self.running:
            raise PostfixError(f"Postfix in {self.workdir} is not running")
        master = self.master_pid
        assert master is not None
        before = self.maillog().count("reload -- version")
        old_children = set(_session_pids(master)) - {master}
        self.postfix("reload")
        wait_for(
            lambda: self.maillog().count("reload -- version") > before,
            10.0,
            interval=0.02,
            what="the master to log its reload",
        )
        # Busy children (an smtpd in a session) finish their session first; that is
        # Postfix's behaviour and not an error.
        with contextlib.suppress(TimeoutError):
            wait_for(
                lambda: not (old_children & set(_session_pids(master))),
                3.0,
                what="old children to exit after reload",
            )

    def _postmap_hash_maps(self) -> None:
        """``postmap`` every ``hash:`` map main.cf names, as an administrator does after
        editing its source."""
        for value in self._main_cf.values():
            for path in re.findall(r"\bhash:(/\S+?)(?=[\s,]|$)", value):
                self._run([POSTMAP, "-c", str(self.config_dir), f"hash:{path}"])
                _backdate(Path(path + ".db"))

    def set_virtual_users(self, users: Iterable[str]) -> None:
        """Replace the mailbox map's users (a primary built with ``primary_main_cf``):
        rewrite its source, ``postmap`` it if it is a ``hash:`` map, and reload, as an
        administrator adding or removing a user does."""
        write_virtual_users(self.workdir, users)
        self._postmap_hash_maps()
        if self.running:
            self.reload()

    def postconf(self, **settings: str) -> None:
        """Set main.cf parameters with ``postconf -c DIR -e`` and reload if running."""
        if not settings:
            return
        for key, value in settings.items():
            _check_name(key)
            _check_value(key, value)
        self._run(
            [POSTCONF, "-c", str(self.config_dir), "-e"]
            + [f"{key}={value}" for key, value in settings.items()]
        )
        self._cool_config()
        self._main_cf.update(settings)
        if self.running:
            self.reload()

    # -- queue -----------------------------------------------------------------------

    def flush(self) -> None:
        """``postqueue -f``: attempt delivery of all queued mail now."""
        self.postqueue("-f")

    def queue_entries(self) -> list[dict[str, Any]]:
        """``postqueue -j``: one dict per queued message (queue_name, queue_id, sender,
        recipients with delay_reason...)."""
        out = self.postqueue("-j").stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def queue_ids(self) -> list[str]:
        return [str(entry["queue_id"]) for entry in self.queue_entries()]

    # -- virtual mailboxes (instances built with primary_main_cf) --------------------

    def _mailbox_base(self) -> Path:
        base = self._main_cf.get("virtual_mailbox_base")
        if not base:
            raise PostfixError("not a virtual-mailbox primary (no virtual_mailbox_base)")
        return Path(base)

    def mailbox(self, addr: str) -> list[bytes]:
        """The messages delivered to ``addr``'s maildir, oldest first."""
        return maildir_messages(maildir_for(self._mailbox_base(), addr))

    def mailbox_count(self, addr: str) -> int:
        return maildir_count(maildir_for(self._mailbox_base(), addr))

    def __repr__(self) -> str:
        ports = ",".join(str(listener.port) for listener in self._listeners)
        state = "running" if self.running else "stopped"
        return f"<PostfixInstance {self.workdir} ports={ports} {state}>"
