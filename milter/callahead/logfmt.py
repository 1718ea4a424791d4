"""Log fields that no sender can forge.

A recipient is the sender's text, and a primary's reply often echoes it: a quoted local
part may hold spaces, ``>`` and ``=``, so a raw ``rcpt=<...>`` could end early and add
``decision=accept`` for a fail2ban-style parser. Every attacker-controlled field goes
through ``escape``: backslash, quote, angle brackets, ``=``, and every control, space
or unprintable character become ``\\xHH`` (``\\uHHHH`` beyond Latin-1), so no field can
end early and no ``key=value`` can appear inside one. A URL loses its password
(``redact_url``).
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


def escape(text: str, *, spaces: bool = False) -> str:
    """``text`` with every character that could end or forge a log field escaped; plain
    spaces are kept when ``spaces`` (for a field written inside double quotes)."""
    if _UNSAFE.search(text) is None:
        return text
    out = []
    for char in text:
        if char == " " and spaces:
            out.append(char)
        elif char in '\\"<>=' or not char.isprintable() or char.isspace():
            out.append(_code(char))
        else:
            out.append(char)  # printable non-ASCII, as in an SMTPUTF8 address
    return "".join(out)


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (a Redis URL in a log line or in
    ``callahead config``)."""
    try:
        parts = urllib.parse.urlsplit(url)
        password = parts.password
    except ValueError:
        return "(unparsable URL)"
    if password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
