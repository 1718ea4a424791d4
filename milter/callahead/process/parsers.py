"""Value parsers: how each kind of ``CALLAHEAD_*`` value is read from its text (raising
``ConfigError`` naming the variable, the value and what is allowed) and written back
(``callahead config``): numbers, durations, choices, yes/no, paths, addresses, log
levels and Redis URLs. Each ``Kind`` holds the two directions together.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import math
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ..base.address import UnsendableAddress, normalize_recipient, wire_address
from ..base.errors import CallaheadError
from ..base.logfmt import redact_url


class ConfigError(CallaheadError, ValueError):
    """A bad value: names the variable, the value and what is allowed."""

    def __init__(self, variable: str, value: str, allowed: str) -> None:
        super().__init__(f"{variable}={value!r} is invalid: {allowed}")
        self.variable = variable
        self.value = value
        self.allowed = allowed


T = TypeVar("T")
E = TypeVar("E", bound=enum.Enum)
N = TypeVar("N", bound=float)


@dataclass(frozen=True, slots=True)
class Kind(Generic[T]):
    """A kind of value: how its text is parsed and how the effective value is shown."""

    parse: Callable[[str, str], T]
    """(variable name, text) -> the value, or ``ConfigError``."""
    render: Callable[[T], str]
    """The value as ``callahead config`` writes it (text that parses to it again)."""


def fmt_number(x: float) -> str:
    """``30.0`` as ``30``, ``0.5`` as ``0.5``."""
    return str(int(x)) if x == int(x) else str(x)


def as_is(value: str) -> str:
    return value


def number(
    convert: Callable[[str], N],
    *,
    what: str,
    minimum: float = 0,
    maximum: float = math.inf,
    exclusive_minimum: bool = False,
) -> Kind[N]:
    """A finite number from ``minimum`` to ``maximum``; ``what`` says so."""

    def parse(name: str, value: str) -> N:
        try:
            result = convert(value.strip())
        except ValueError:
            raise ConfigError(name, value, what) from None
        if (
            not isinstance(result, int | float)
            or not math.isfinite(result)
            or result < minimum
            or (exclusive_minimum and result == minimum)
            or result > maximum
        ):
            raise ConfigError(name, value, what)
        return result

    return Kind(parse, fmt_number)


def whole(low: int, high: int) -> Kind[int]:
    return number(
        int, minimum=low, maximum=high, what=f"expected a whole number from {low} to {high}"
    )


def seconds(*, positive: bool = False, high: float = 86400) -> Kind[float]:
    low = "> 0" if positive else ">= 0"
    return number(
        float,
        exclusive_minimum=positive,
        maximum=high,
        what=f"expected a number of seconds {low} and at most {high:g}",
    )


def _enum_value(value: enum.Enum) -> str:
    return str(value.value)


def choice(kind: type[E], allowed: str) -> Kind[E]:
    """One of an enum's values, in any case."""

    def parse(name: str, value: str) -> E:
        try:
            chosen: E = kind(value.strip().lower())
        except ValueError:
            raise ConfigError(name, value, allowed) from None
        return chosen

    return Kind(parse, _enum_value)


_YES = ("yes", "true", "on", "1")
_NO = ("no", "false", "off", "0")


def _parse_yes_no(name: str, value: str) -> bool:
    word = value.strip().lower()
    if word in _YES:
        return True
    if word in _NO:
        return False
    raise ConfigError(name, value, "expected yes or no")


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


YES_NO = Kind(_parse_yes_no, _yes_no)


def _parse_path(name: str, value: str) -> str:
    path = value.strip()
    if path and not path.startswith("/"):
        raise ConfigError(name, value, "expected an absolute path, or empty to turn it off")
    if "\0" in path:
        raise ConfigError(name, value, "a path cannot contain a NUL character")
    return path


PATH = Kind(_parse_path, as_is)
"""An absolute path, or empty to turn it off."""


def _parse_maillog(name: str, value: str) -> str:
    text = value.strip()
    if text == "journal":
        return text
    try:
        return _parse_path(name, text)
    except ConfigError:
        raise ConfigError(
            name, value, "expected journal, an absolute path (/var/log/mail.log) or empty"
        ) from None


MAILLOG = Kind(_parse_maillog, as_is)
"""``journal``, a log file's absolute path, or empty (off): ``CALLAHEAD_MAILLOG``."""


def _parse_address(name: str, value: str) -> str:
    sender = value.strip()
    if sender.startswith("<") and sender.endswith(">"):
        sender = sender[1:-1]
    if sender:
        try:
            wire_address(sender)
        except UnsendableAddress:
            raise ConfigError(
                name, value, "expected an ASCII email address (user@domain), or empty for <>"
            ) from None
    return sender


ADDRESS = Kind(_parse_address, as_is)
"""An email address for MAIL FROM, ``<>`` or empty for the null sender."""


def _parse_controls(name: str, value: str) -> tuple[str, ...]:
    """Addresses separated by spaces or commas, each a user known to exist at its
    domain; the domain normalized as a recipient's is (lower case, IDNA A-label)."""
    found: dict[str, None] = {}
    for item in value.replace(",", " ").split():
        recipient = normalize_recipient(item)
        if recipient is None:
            raise ConfigError(name, value, f"{item!r} is not an address (expected user@domain)")
        try:
            wire_address(recipient.address, allow_utf8=True)
        except UnsendableAddress:
            raise ConfigError(name, value, f"{item!r} cannot be sent in an SMTP command") from None
        if recipient.address.rpartition("@")[0].lower() == "postmaster":
            raise ConfigError(
                name,
                value,
                f"{item!r}: postmaster@ is asked anyway, and is often an alias that never "
                "reaches the user table; name a user known to exist",
            )
        found[recipient.address] = None
    return tuple(found)


def _controls_text(addresses: tuple[str, ...]) -> str:
    return " ".join(addresses)


CONTROLS = Kind(_parse_controls, _controls_text)
"""Addresses known to exist, the controls of their domains (evidence.py)."""

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _parse_log_level(name: str, value: str) -> int:
    level = value.strip().upper()
    if level not in _LOG_LEVELS:
        raise ConfigError(name, value, "expected " + ", ".join(_LOG_LEVELS))
    return logging.getLevelNamesMapping()[level]


LOG_LEVEL = Kind(_parse_log_level, logging.getLevelName)

REDIS_SCHEMES = ("redis", "rediss", "unix")


def _parse_redis_url(name: str, value: str) -> str:
    url = value.strip()
    if not url:
        return ""
    allowed = "expected redis://[USER:PASSWORD@]HOST[:PORT][/DB], rediss://... or unix:///path"
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        raise ConfigError(name, value, allowed) from None
    if parts.scheme not in REDIS_SCHEMES:
        raise ConfigError(name, value, allowed)
    if parts.scheme == "unix":
        if not parts.path.startswith("/"):
            raise ConfigError(name, value, allowed)
    elif not parts.hostname or (port is not None and not 0 < port < 65536):
        raise ConfigError(name, value, allowed)
    import redis.connection  # only with a URL: redis-py takes a while to import

    try:
        # What redis-py itself refuses at connect (?db=abc, ?socket_timeout=soon).
        redis.connection.parse_url(url)  # type: ignore[no-untyped-call]
    except ValueError as exc:
        raise ConfigError(name, value, f"{allowed} ({exc})") from None
    return url


def redis_url_refusal(url: str) -> str:
    """Why callahead does not use ``url`` (a URL ``REDIS_URL`` parsed), or empty.

    A URL that reads as a Redis URL but lets anyone who reaches that Redis decide what
    every backup believes (no password off loopback), or that names a user without a
    password (most often a password meant), turns the shared cache off: each backup
    verifies alone, as while Redis is down, and serve, ``config`` and ``doctor`` say
    why. Not a configuration error (exit 78): callahead 0.1 started with such a URL,
    and an upgrade must not leave mail unverified (Postfix accepts while the milter is
    down). A URL that cannot be read at all still is one (``_parse_redis_url``)."""
    if not url:
        return ""
    import redis.connection

    parts = urllib.parse.urlsplit(url)
    options = redis.connection.parse_url(url)  # type: ignore[no-untyped-call]
    if parts.username and parts.password is None and not options.get("password"):
        return (
            "a user name without a password (redis-py sends what stands before the @ as a "
            "user name): for a password alone write redis://:PASSWORD@HOST, for an ACL "
            "user redis://USER:PASSWORD@HOST"
        )
    if not (options.get("password") or options.get("ssl_certfile") or _local(parts)):
        return (
            f"Redis at {parts.hostname} is off this host's loopback and the URL gives no "
            "password: whoever can write to that Redis would decide which recipients every "
            "backup accepts; write redis://:PASSWORD@HOST (or an ACL user's "
            "USER:PASSWORD@, or with rediss:// a client certificate)"
        )
    return ""


def _local(parts: urllib.parse.SplitResult) -> bool:
    """A Redis on this host: a unix socket, ``localhost`` or a loopback address."""
    if parts.scheme == "unix" or parts.hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(parts.hostname or "").is_loopback
    except ValueError:
        return False


REDIS_URL = Kind(_parse_redis_url, redact_url)
"""A Redis URL, shown with its password hidden."""


@dataclass(frozen=True, slots=True)
class Variable:
    """One environment variable: its default, its meaning (for ``--help`` and docs/reference.md),
    the ``Config`` field it sets, and the kind of its value: how its text is parsed (raising
    ``ConfigError``) and how the effective value is written back (``callahead config``)."""

    name: str
    default: str
    """The text used when the variable is not set."""
    meaning: str
    kind: Kind[Any]
    field: str = ""
    """The ``Config`` field; empty: the name without ``CALLAHEAD_``, in lower case."""
    shown: str = ""
    """The default as ``--help`` shows it, when it is computed (else ``default``)."""
    secret: Callable[[str], str] | None = None
    """For a value that can carry a secret (a password in a URL): how its text is shown
    in a ``ConfigError``, whatever is wrong with it (its kind renders it redacted too)."""

    def __post_init__(self) -> None:
        if not self.field:
            object.__setattr__(self, "field", self.name.removeprefix("CALLAHEAD_").lower())

    @property
    def shown_default(self) -> str:
        return self.shown or self.default
