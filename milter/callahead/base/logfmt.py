"""Log fields that no sender can forge.

A recipient is the sender's text, and a primary's reply often echoes it: a quoted local
part may hold spaces, ``>`` and ``=``, so a raw ``rcpt=<...>`` could end early and add
``decision=accept`` for a fail2ban-style parser. Every attacker-controlled field goes
through ``escape``: backslash, quote, angle brackets, ``=``, and every control, space
or unprintable character become ``\\xHH`` (``\\uHHHH`` beyond Latin-1), so no field can
end early and no ``key=value`` can appear inside one. A URL loses its password, in its
user info or in its query string (``redact_url``).
"""

from __future__ import annotations

import re
import urllib.parse

_UNSAFE = re.compile(r'[\\"<>=\x00-\x20\x7f-\x9f]|[^\x00-\x7f]')


def _code(char: str) -> str:
    n = ord(char)
    if n < 0x100:
        return f"\\x{n:02x}"
    if n < 0x10000:
        return f"\\u{n:04x}"
    return f"\\U{n:08x}"


def _unsafe(char: str) -> bool:
    return char in '\\"<>=' or not char.isprintable() or char.isspace()


_ASCII = {n: _code(chr(n)) for n in range(128) if _unsafe(chr(n))}
"""``str.translate`` tables for ASCII text (a primary's reply, nearly always): the same
escapes as the loop below, in C."""
_ASCII_SPACES = {n: code for n, code in _ASCII.items() if n != ord(" ")}


def escape(text: str, *, spaces: bool = False) -> str:
    """``text`` with every character that could end or forge a log field escaped; plain
    spaces are kept when ``spaces`` (for a field written inside double quotes)."""
    if _UNSAFE.search(text) is None:
        return text
    if text.isascii():
        return text.translate(_ASCII_SPACES if spaces else _ASCII)
    out = []
    for char in text:
        if char == " " and spaces:
            out.append(char)
        elif _unsafe(char):
            out.append(_code(char))
        else:
            out.append(char)  # printable non-ASCII, as in an SMTPUTF8 address
    return "".join(out)


CREDENTIAL_WORDS = ("pass", "pwd", "secret", "token", "auth", "credential")
"""Query parameters whose value is a credential: redis-py takes ``?password=`` (and any
other keyword) from a URL's query string."""
HIDDEN = "***"


def looks_like_credential(name: str) -> bool:
    """A parameter or variable name that says its value is a credential (``password``,
    ``CALLAHEAD_REDIS_PASSWORD``, ``auth_token``...); percent-encoding is undone."""
    key = urllib.parse.unquote_plus(name).strip().lower()
    return any(word in key for word in CREDENTIAL_WORDS)


def _redact_query(query: str) -> str:
    """``query`` with the value of every credential-looking parameter replaced."""
    fields = []
    for field in query.split("&"):
        name, sep, _ = field.partition("=")
        fields.append(f"{name}={HIDDEN}" if sep and looks_like_credential(name) else field)
    return "&".join(fields)


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (a Redis URL in a log line, in
    ``callahead config`` or in a configuration error): the password of the user info,
    a user info without a colon whole (``redis://secret@host``: people write a password
    there), the value of a credential-looking query parameter (``?password=``), and, in
    text that has no ``//host`` part, everything before an ``@`` (``:secret@host:6379``,
    a URL whose scheme was forgotten)."""
    try:
        parts = urllib.parse.urlsplit(url)
        password = parts.password
    except ValueError:
        return "(unparsable URL)"
    if not url.partition(":")[2].startswith("//") and "@" in url:
        return f"{HIDDEN}@{url.rpartition('@')[2]}"
    hidden = "@" in parts.netloc
    if hidden:
        host = parts.netloc.rpartition("@")[2]
        user = f"{parts.username or ''}:" if password is not None else ""
        parts = parts._replace(netloc=f"{user}{HIDDEN}@{host}")
    if parts.query:
        parts = parts._replace(query=_redact_query(parts.query))
    if not hidden and not parts.query:
        return url
    if not parts.netloc:  # unix:///path?password=...: urlunsplit would drop the //
        query = f"?{parts.query}" if parts.query else ""
        fragment = f"#{parts.fragment}" if parts.fragment else ""
        return f"{parts.scheme}://{parts.path}{query}{fragment}"
    return urllib.parse.urlunsplit(parts)
