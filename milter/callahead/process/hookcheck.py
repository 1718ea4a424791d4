"""At start and on SIGHUP, whether this host's Postfix names callahead where it listens.

When main.cf names a milter or policy address where callahead does not listen (an
upgrade that moved the default listener, a typo, a chrooted smtpd looking for an
absolute path inside its chroot), Postfix applies its default action to every session
and every recipient passes unverified, while callahead looks healthy. ``serve`` reads
the Postfix configuration as doctor does (postfixview.py: postconf, master.cf's ``-o``
overrides, each smtpd service's chroot) in a thread of its own, so READY=1 never waits
for postconf, and reports the outcome in one log line and the gauge
``callahead_postfix_hooked{frontend}``: 1 when an smtpd service names the front end at
its address, 0 when none does. It never stops callahead: the line and the gauge (and
the alert on it) tell the operator, ``callahead doctor`` gives the details.

The Postfix read is ``CALLAHEAD_POSTFIX_CONFIG``, else the local one (``MAIL_CONFIG``,
else /etc/postfix, with the instances its ``multi_instance_directories`` lists) when
its main.cf exists and every front end is one only this host can reach (a unix socket,
a loopback port): a front end that other hosts reach may be named by their Postfix,
which this host cannot read. A front end other hosts reach and no local service names
gets no gauge.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from ..frontends.metrics import Metrics
from ..routing.postfixsettings import PostfixConfigError, split_list
from .config import Config
from .doctor.postfixhooks import postfix_name, same_inet, split_inet
from .doctor.postfixview import Hook, PostfixView, Service, read_postfix
from .endpoints import Listen, loopback_host, parse_listen
from .postfixconf import DEFAULT_POSTFIX_CONFIG

log = logging.getLogger("callahead.hookcheck")

Reader = Callable[[str], PostfixView]


@dataclass(frozen=True)
class FrontEnd:
    """One front end callahead runs: ``milter`` or ``policy``, where it listens."""

    kind: str
    variable: str
    listen: Listen

    @property
    def local(self) -> bool:
        """Only this host can connect: a unix socket or a loopback port."""
        return self.listen.kind == "unix" or loopback_host(self.listen.host)

    @property
    def title(self) -> str:
        return "milter" if self.kind == "milter" else "policy service"


def front_ends(config: Config) -> list[FrontEnd]:
    out = []
    if config.socket:
        listen = parse_listen("CALLAHEAD_SOCKET", config.socket)
        out.append(FrontEnd("milter", "CALLAHEAD_SOCKET", listen))
    if config.policy_listen is not None:
        out.append(FrontEnd("policy", "CALLAHEAD_POLICY_LISTEN", config.policy_listen))
    return out


def postfix_directory(config: Config, environ: Mapping[str, str]) -> tuple[str | None, str]:
    """(the Postfix configuration directory to read, "") or (None, why none is read)."""
    if config.postfix is not None:
        return config.postfix.config_dir, ""
    directory = environ.get("MAIL_CONFIG") or DEFAULT_POSTFIX_CONFIG
    if not os.path.isfile(os.path.join(directory, "main.cf")):
        return None, f"CALLAHEAD_POSTFIX_CONFIG is empty and {directory}/main.cf does not exist"
    if shutil.which("postconf") is None and not os.path.exists("/usr/sbin/postconf"):
        return None, "CALLAHEAD_POSTFIX_CONFIG is empty and postconf is not installed"
    remote = [f"{f.variable}={f.listen}" for f in front_ends(config) if not f.local]
    if remote:
        return None, (
            f"{', '.join(remote)} is not on loopback, where another host's Postfix may name "
            "it: set CALLAHEAD_POSTFIX_CONFIG to have this host's Postfix checked"
        )
    return directory, ""


def read_instances(directory: str, read: Reader = read_postfix) -> list[PostfixView]:
    """``directory``'s Postfix and the enabled instances its ``multi_instance_directories``
    lists (postmulti); raises ``PostfixConfigError`` when one cannot be read."""
    first = read(directory)
    views = [first]
    for other in split_list(first.main.get("multi_instance_directories", "")):
        view = read(other)
        if view.main.get("multi_instance_enable", "no").lower() == "yes":
            views.append(view)
    return views


def _hooks(view: PostfixView, service: Service, kind: str) -> list[Hook]:
    return view.milters(service) if kind == "milter" else view.policies(service)


def names(view: PostfixView, service: Service, hook: Hook, front: FrontEnd) -> bool:
    """Whether ``hook`` of ``service`` reaches ``front`` where it listens, as doctor's
    ``hook`` item matches them: a TCP host by its addresses, a unix path relative to
    the queue directory, or absolute (inside the queue directory when smtpd runs
    chrooted)."""
    listen = front.listen
    if hook.kind != front.kind or hook.family != listen.kind:
        return False
    if listen.kind == "inet":
        parsed = split_inet(hook.address)
        return parsed is not None and same_inet(listen, *parsed)
    host_path = view.host_path(service, hook.address)
    return os.path.realpath(host_path) == os.path.realpath(listen.path)


def _chroot_miss(view: PostfixView, service: Service, hook: Hook, front: FrontEnd) -> str | None:
    """A note when a chrooted smtpd names the socket by its host path, which it looks
    for inside its chroot."""
    listen = front.listen
    if hook.kind != front.kind or listen.kind != "unix" or not service.chroot:
        return None
    if os.path.normpath(hook.address) != os.path.normpath(listen.path):
        return None
    return (
        f"{service} runs chrooted in {view.queue_directory} and looks for "
        f"{view.host_path(service, hook.address)}"
    )


@dataclass(frozen=True)
class Verdict:
    """The gauge per front end (a front end without a value gets no series) and the
    one log line."""

    hooked: Mapping[str, bool]
    level: int
    line: str


def _wanted(view: PostfixView, front: FrontEnd) -> str:
    name = postfix_name(view, front.listen)
    if front.kind == "milter":
        return f"smtpd_milters = {name}"
    return f"check_policy_service {name} after reject_unauth_destination"


def judge(fronts: Sequence[FrontEnd], views: Sequence[PostfixView]) -> Verdict:
    """Which front ends an smtpd service of ``views`` names where they listen."""
    where = " and ".join(v.config_dir for v in views)
    by: dict[str, list[str]] = {f.kind: [] for f in fronts}
    named: dict[str, list[str]] = {"milter": [], "policy": []}
    notes: list[str] = []
    for view in views:
        for service in view.services:
            for kind in named:
                for hook in _hooks(view, service, kind):
                    if hook.endpoint not in named[kind]:
                        named[kind].append(hook.endpoint)
                    for front in fronts:
                        if names(view, service, hook, front):
                            by[front.kind].append(str(service))
                        elif (note := _chroot_miss(view, service, hook, front)) is not None:
                            notes.append(note)
    hooked = {f.kind: bool(by[f.kind]) for f in fronts if f.local or by[f.kind]}
    listens = ", ".join(f"{f.title} {f.listen}" for f in fronts)
    if any(hooked.values()):
        parts = [
            f"{f.title} {f.listen} named by {', '.join(dict.fromkeys(by[f.kind]))}"
            if by[f.kind]
            else f"{f.title} {f.listen} named by no smtpd service (unused)"
            for f in fronts
        ]
        return Verdict(hooked, logging.INFO, f"Postfix {where} hooks callahead: {'; '.join(parts)}")
    if not all(f.local for f in fronts):
        return Verdict(
            {},
            logging.INFO,
            f"Postfix {where} names no callahead front end ({listens}); other hosts' "
            "Postfix may: not checked",
        )
    shown = [
        f"milters {', '.join(named['milter'])}" if named["milter"] else "no milter",
        (
            f"policy services {', '.join(named['policy'])}"
            if named["policy"]
            else "no policy service"
        ),
    ]
    chroot = f" ({'; '.join(dict.fromkeys(notes))})" if notes else ""
    fixes = " or ".join(_wanted(views[0], f) for f in fronts)
    return Verdict(
        hooked,
        logging.ERROR,
        f"Postfix {where} does not hook callahead where it listens, so callahead verifies "
        f"no recipient: its smtpd services name {' and '.join(shown)}{chroot}; callahead "
        f"listens: {listens}; fix: {fixes} in main.cf (or master.cf's -o overrides), "
        "postfix reload, then systemctl reload callahead to check again (callahead doctor "
        "tells more)",
    )


class HookCheck:
    """Runs the check in a thread of its own, at start and on each SIGHUP; one at a
    time."""

    def __init__(
        self,
        config: Config,
        metrics: Metrics,
        environ: Mapping[str, str] = os.environ,
        read: Reader = read_postfix,
    ) -> None:
        self._config = config
        self._metrics = metrics
        self._environ = environ
        self._read = read
        self._lock = threading.Lock()

    def start(self) -> None:
        """``run`` in a daemon thread; never raises (it runs in a signal handler too)."""
        try:
            threading.Thread(target=self.run, name="callahead-hookcheck", daemon=True).start()
        except RuntimeError as exc:  # no thread can be started: the check is only a warning
            log.warning("cannot check Postfix's hooks: %s", exc)

    def run(self) -> Verdict | None:
        """Read Postfix, set the gauge, log one line; None when Postfix is not read."""
        with self._lock:
            gauge = self._metrics.postfix_hooked
            directory, because = postfix_directory(self._config, self._environ)
            if directory is None:
                gauge.clear()
                log.info("Postfix's hooks not checked: %s", because)
                return None
            try:
                views = read_instances(directory, self._read)
            except PostfixConfigError as exc:
                gauge.clear()
                log.warning("cannot read Postfix's configuration to check its hooks: %s", exc)
                return None
            except Exception:  # a thread of its own: say why and keep serving mail
                gauge.clear()
                log.exception("checking Postfix's hooks failed")
                return None
            verdict = judge(front_ends(self._config), views)
            # The gauge first: once the line is in the log, the gauge says the same.
            gauge.clear()
            for kind, value in verdict.hooked.items():
                gauge.labels(kind).set(1.0 if value else 0.0)
            log.log(verdict.level, "%s", verdict.line)
            return verdict
