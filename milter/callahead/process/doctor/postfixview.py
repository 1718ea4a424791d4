"""The backup's Postfix as ``callahead doctor`` reads it: main.cf and master.cf through
``postconf`` (values with ``$name`` expanded), every smtpd service with its effective
settings (its master.cf ``-o`` overrides over main.cf), and the milters and policy
services those settings attach.

Nothing here connects anywhere; checkup.py and postfixhooks.py decide what the settings mean.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from ...routing.postfixsettings import PostfixConfigError, first_line, run, split_list, tool

RESTRICTION_LISTS = ("smtpd_relay_restrictions", "smtpd_recipient_restrictions")
"""The lists a recipient check belongs in, in the order smtpd evaluates them at RCPT."""


@dataclass(frozen=True)
class Service:
    """One master.cf entry that runs smtpd: ``inet`` (it listens) or ``pass`` (behind
    postscreen)."""

    name: str
    kind: str
    chroot: bool
    overrides: Mapping[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.name}/{self.kind}"


@dataclass(frozen=True)
class Hook:
    """A milter in ``smtpd_milters`` or a ``check_policy_service`` in a restriction
    list, with its per-entry ``{ endpoint, name=value, ... }`` options."""

    kind: str
    """``milter`` or ``policy``."""
    endpoint: str
    """As Postfix has it: ``inet:host:port``, ``unix:path`` (relative to the queue
    directory unless absolute), or a bare ``host:port`` (inet)."""
    options: Mapping[str, str]
    restrictions: str = ""
    """The list a policy hook is in."""
    position: int = 0
    """Its index in that list."""

    @property
    def family(self) -> str:
        kind, sep, _ = self.endpoint.partition(":")
        if sep and kind.lower() in ("unix", "local"):
            return "unix"
        return "inet" if sep else "unix"

    @property
    def address(self) -> str:
        """The endpoint without its ``unix:``/``inet:`` prefix."""
        kind, sep, rest = self.endpoint.partition(":")
        if sep and kind.lower() in ("unix", "local", "inet"):
            return rest
        return self.endpoint

    def __str__(self) -> str:
        return self.endpoint


@dataclass(frozen=True)
class PostfixView:
    """One Postfix configuration directory, read once."""

    config_dir: str
    main: Mapping[str, str]
    services: tuple[Service, ...]

    @property
    def queue_directory(self) -> str:
        return self.main.get("queue_directory", "/var/spool/postfix")

    def setting(self, service: Service, name: str) -> str:
        """``name`` as ``service`` sees it: its ``-o`` override, else main.cf's."""
        if name in service.overrides:
            return service.overrides[name]
        return self.main.get(name, "")

    def milters(self, service: Service) -> list[Hook]:
        return [_milter(item) for item in split_list(self.setting(service, "smtpd_milters"))]

    def policies(self, service: Service) -> list[Hook]:
        hooks: list[Hook] = []
        for name in RESTRICTION_LISTS:
            items = split_list(self.setting(service, name))
            for index, item in enumerate(items):
                if item.lower() != "check_policy_service" or index + 1 >= len(items):
                    continue
                endpoint, options = _entry(items[index + 1])
                hooks.append(Hook("policy", endpoint, options, name, index))
        return hooks

    def host_path(self, service: Service, path: str) -> str:
        """Where a ``unix:`` endpoint that ``service`` connects to is in this host's
        file system: a relative path is relative to the queue directory (where every
        Postfix daemon works), an absolute one is inside it when the service runs
        chrooted there."""
        if not path.startswith("/"):
            return os.path.normpath(os.path.join(self.queue_directory, path))
        if service.chroot:
            return os.path.normpath(self.queue_directory + path)
        return os.path.normpath(path)


def _entry(item: str) -> tuple[str, dict[str, str]]:
    """``{ endpoint, name = value, ... }`` or a bare endpoint."""
    text = item.strip()
    if not (text.startswith("{") and text.endswith("}")):
        return text, {}
    parts = [part.strip() for part in text[1:-1].split(",") if part.strip()]
    if not parts:
        return "", {}
    options: dict[str, str] = {}
    for part in parts[1:]:
        key, _, value = part.partition("=")
        options[key.strip().lower()] = value.strip()
    return parts[0], options


def _milter(item: str) -> Hook:
    endpoint, options = _entry(item)
    return Hook("milter", endpoint, options)


def _postconf(config_dir: str, *args: str) -> str:
    done = run([tool("postconf"), "-c", config_dir, *args])
    if done.returncode != 0:
        raise PostfixConfigError(
            f"postconf -c {config_dir} {' '.join(args)}: {first_line(done.stderr)}"
        )
    return done.stdout


def _parameters(text: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.partition(" = ")
        if not sep and line.endswith(" ="):
            name, sep, value = line[:-2], "=", ""
        if sep:
            values[name.strip()] = value.strip()
    return values


def read_postfix(config_dir: str) -> PostfixView:
    """Read ``config_dir``; raises ``PostfixConfigError`` when postconf cannot."""
    if not os.path.isfile(os.path.join(config_dir, "main.cf")):
        raise PostfixConfigError(f"{config_dir}/main.cf does not exist")
    main = _parameters(_postconf(config_dir, "-x"))
    overrides: dict[tuple[str, str], dict[str, str]] = {}
    for key, value in _parameters(_postconf(config_dir, "-P", "-x")).items():
        service, _, rest = key.partition("/")
        # A service name may hold a colon (127.0.0.1:2525) but never a slash.
        kind, _, name = rest.partition("/")
        overrides.setdefault((service, kind), {})[name] = value
    services = []
    for line in _postconf(config_dir, "-M").splitlines():
        fields = line.split()
        if len(fields) < 8 or fields[1] not in ("inet", "pass") or fields[7] != "smtpd":
            continue
        # "-" is the built-in default, which is "n" since Postfix 3.0.
        chroot = fields[4] == "y"
        services.append(
            Service(fields[0], fields[1], chroot, overrides.get((fields[0], fields[1]), {}))
        )
    return PostfixView(config_dir, main, tuple(services))
