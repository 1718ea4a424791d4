"""Postfix's own settings for the configuration: ``postconf -h`` of the local Postfix
(``myhostname`` as the default EHLO name, ``milter_command_timeout`` to check the
answer time against), Postfix time values, what Postfix accepts as an EHLO name, and
``CALLAHEAD_POSTFIX_CONFIG``, the Postfix directory whose maps give the routes.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import subprocess

from ..routing.postfixsettings import PostfixConfigError, PostfixSettings, load_settings
from .endpoints import valid_host
from .parsers import ConfigError, Kind, as_is

DEFAULT_POSTFIX_CONFIG = "/etc/postfix"
POSTFIX_POLICY_MAX_IDLE = 300.0
"""Postfix's default smtpd_policy_service_max_idle, in seconds."""
POSTCONF_TIMEOUT = 5.0
"""Seconds ``postconf -h myhostname`` may take at start."""


def postconf(name: str) -> str | None:
    """``postconf -h NAME`` of the local Postfix (its default config directory, or
    ``MAIL_CONFIG``); None without a configured Postfix."""
    directory = os.environ.get("MAIL_CONFIG") or DEFAULT_POSTFIX_CONFIG
    if not os.path.exists(os.path.join(directory, "main.cf")):
        # postconf would fail too, after the second msg_fatal sleeps before exiting.
        return None
    command = shutil.which("postconf") or "/usr/sbin/postconf"
    try:
        done = subprocess.run(
            [command, "-h", name],
            capture_output=True,
            text=True,
            timeout=POSTCONF_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def postfix_myhostname() -> str | None:
    """The local Postfix's ``myhostname``, the name this backup MX already gives in its
    own EHLO; None without a configured Postfix."""
    name = postconf("myhostname")
    return name if name is not None and valid_host(name) else None


_POSTFIX_TIME_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def postfix_seconds(text: str) -> float | None:
    """A Postfix time value (``30s``, ``30``, ``1m``...) in seconds; None if malformed."""
    text = text.strip().lower()
    unit = _POSTFIX_TIME_UNITS.get(text[-1:]) if text[-1:].isalpha() else 1
    number = text[:-1] if text[-1:].isalpha() else text
    if unit is None or not number.isdigit():
        return None
    return float(int(number) * unit)


def postfix_milter_command_timeout() -> float | None:
    """The local Postfix's ``milter_command_timeout`` in seconds, if it can be read."""
    value = postconf("milter_command_timeout")
    return None if value is None else postfix_seconds(value)


def default_helo_name() -> str:
    """Postfix's ``myhostname``, else the host's FQDN."""
    return postfix_myhostname() or socket.getfqdn() or "localhost"


def is_fully_qualified(helo: str) -> bool:
    """What Postfix's ``reject_non_fqdn_helo_hostname`` accepts: a name with a dot in it,
    or an address literal."""
    return helo.startswith("[") or "." in helo.strip(".")


def _is_address_literal(helo: str) -> bool:
    """RFC 5321 4.1.3: ``[IPv4]`` or ``[IPv6:address]``."""
    if not (helo.startswith("[") and helo.endswith("]")):
        return False
    inner = helo[1:-1]
    version = 4
    if inner[:5].lower() == "ipv6:":
        inner, version = inner[5:], 6
    try:
        return ipaddress.ip_address(inner).version == version
    except ValueError:
        return False


def _parse_helo(name: str, value: str) -> str:
    helo = value.strip()
    if not helo:
        return default_helo_name()
    if not (valid_host(helo) or _is_address_literal(helo)):
        raise ConfigError(
            name, value, "expected a host name or an address literal ([192.0.2.1], [IPv6:...])"
        )
    return helo


HELO = Kind(_parse_helo, as_is)
"""The EHLO name of the probes; empty: Postfix's ``myhostname``, else the host's FQDN."""


def _parse_postfix_config(name: str, value: str) -> PostfixSettings | None:
    path = value.strip()
    if not path:
        return None
    if not path.startswith("/"):
        raise ConfigError(name, value, "expected the absolute path of a Postfix config directory")
    try:
        return load_settings(path.rstrip("/") or "/")
    except PostfixConfigError as exc:
        raise ConfigError(name, value, f"cannot use this Postfix configuration: {exc}") from None


def _postfix_text(settings: PostfixSettings | None) -> str:
    return "" if settings is None else settings.config_dir


POSTFIX_CONFIG = Kind(_parse_postfix_config, _postfix_text)
