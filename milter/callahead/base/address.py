"""Recipient addresses: how they are normalized, and the bytes that go on the wire.

``normalize_recipient`` turns what Postfix hands over (``<User@Example.COM>``) into the
address callahead judges, caches and logs (``User@example.com``); ``wire_address``
refuses anything that could end an SMTP command early or smuggle another one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import idna

from .errors import CallaheadError

MAX_COMMAND_LINE_OCTETS = 512
"""RFC 5321 4.5.3.1.4: a command line, CRLF included. A server that reads no more than
this could take the rest of a longer line as a command of its own."""
MAX_ADDRESS_OCTETS = MAX_COMMAND_LINE_OCTETS - len(b"RCPT TO:<>\r\n")
"""The longest address a probe puts on the wire (500 octets). The 64-octet local-part
and 256-octet path limits of RFC 5321 4.5.3.1 are not enforced: servers are told not
to, Postfix does not, and refusing them let padded addresses skip verification."""


MAX_DOMAIN_OCTETS = 255
"""RFC 1035 2.3.4: the longest domain name. Routing a longer one cost time and memory
quadratic in its labels (each parent domain is a lookup key of Postfix's tables: 1 GB of
keys for a 64 KiB ``a.a.a...``), for a domain that cannot exist."""


class UnsendableAddress(CallaheadError, ValueError):
    """An address that no SMTP command may carry; it is never put on the wire."""


@dataclass(frozen=True, slots=True)
class Recipient:
    address: str
    """``local@domain``, the local part as given, the domain normalized."""
    domain: str


def normalize_recipient(text: str) -> Recipient | None:
    """``<local@domain>`` (brackets optional) to its normalized form; None without a
    local part or a domain, or with a domain longer than any domain can be (not routed
    here, as an address without a domain)."""
    address = text.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    local, sep, domain = address.rpartition("@")
    if not sep or not local or not domain:
        return None
    domain = normalize_domain(domain)
    if len(domain) > MAX_DOMAIN_OCTETS:
        return None
    return Recipient(f"{local}@{domain}", domain)


_NOT_IN_ATOMS = frozenset('()<>@,;:\\"[] ')
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
"""A control character (below 32, or DEL)."""
_NOT_ATOM_TEXT = re.compile(r'[()<>@,;:\\"\[\] \x00-\x1f\x7f]')
"""A character of ``_NOT_IN_ATOMS`` or a control: scanned in C, not a loop per character."""


def external_form(address: str) -> str:
    """``address`` as an SMTP client writes it, from Postfix's internal form: the local
    part quoted where it is not a dot-atom (``a b@x`` is ``"a b"@x``, ``@x`` is
    ``""@x``), as Postfix's own ``quote_822_local`` does (8-bit clean: UTF-8 is left
    alone). A policy service is handed the internal form, the milter the client's own
    words; both must judge the same mailbox."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address
    if _dot_atom(local):
        return address
    quoted = "".join("\\" + c if c in '"\\\r' else c for c in local)
    return f'"{quoted}"@{domain}'


def internal_form(address: str) -> str:
    """``address`` as Postfix keeps it inside: quoted strings unquoted and their
    backslash escapes resolved (``"a b"@x`` is ``a b@x``, ``"ab"@x`` is ``ab@x``); as it
    is when a quote or an escape is left open."""
    out: list[str] = []
    quoted = False
    escaped = False
    for char in address:
        if escaped:
            escaped = False
            out.append(char)
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        else:
            out.append(char)
    if quoted or escaped:
        return address
    return "".join(out)


def _dot_atom(local: str) -> bool:
    if not local or local.startswith(".") or local.endswith(".") or ".." in local:
        return False
    return _NOT_ATOM_TEXT.search(local) is None


def normalize_domain(domain: str) -> str:
    """Lower-case a domain and drop a trailing dot; IDNs are kept in their A-label form.

    The A-label is UTS #46 non-transitional, as Postfix computes it (with its default
    ``enable_idna2003_compatibility = no``): ``straße.de`` is ``xn--strae-oqa.de``, not
    ``strasse.de`` as Python's own IDNA 2003 codec would have it, which would verify
    (and cache) the user of another domain."""
    domain = domain.strip().rstrip(".").lower()
    if any(ord(c) > 127 for c in domain):
        dot = "." if domain.startswith(".") else ""
        try:
            encoded = idna.encode(domain[len(dot) :], uts46=True, transitional=False)
        except (idna.IDNAError, UnicodeError):
            return domain
        domain = dot + encoded.decode("ascii")
    return domain


def is_utf8(text: str) -> bool:
    """False when ``text`` holds bytes that were not UTF-8: a front end decodes what it
    is handed with ``surrogateescape``, which turns each such byte into a lone surrogate
    (``\\udcff`` for 0xff). Such an address can be neither looked up in a Postfix map,
    nor cached, nor put on the wire."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def needs_smtputf8(address: str) -> bool:
    """True when the local part is not ASCII (the domain is sent in A-label form)."""
    return not address.rpartition("@")[0].isascii()


def wire_address(address: str, *, allow_utf8: bool = False) -> bytes:
    """The bytes of ``address`` for a ``<...>`` path, or ``UnsendableAddress``.

    Refuses anything that could end a command early or break the path: control
    characters (CR, LF, NUL…), angle brackets or spaces outside a well-formed quoted
    local part, a non-ASCII domain (send the A-label), a non-ASCII local part unless
    ``allow_utf8`` (SMTPUTF8), and an address too long for one command line."""
    if not address:
        raise UnsendableAddress("empty address")
    if _CONTROL.search(address) is not None:
        raise UnsendableAddress("control character in address")
    local, sep, domain = address.rpartition("@")
    if not sep or not local or not domain:
        raise UnsendableAddress("address has no local part or no domain")
    if not domain.isascii():
        raise UnsendableAddress("non-ASCII domain (expected its A-label form)")
    if not local.isascii() and not allow_utf8:
        raise UnsendableAddress("non-ASCII local part needs SMTPUTF8")
    if local.startswith('"'):
        if not _is_quoted_string(local):
            raise UnsendableAddress("malformed quoted local part")
    elif any(c in local for c in '<> "\\'):
        raise UnsendableAddress("unquoted local part holds a forbidden character")
    if any(c in domain for c in '<> "\\'):
        raise UnsendableAddress("forbidden character in domain")
    try:
        raw = address.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from undecodable bytes
        raise UnsendableAddress("address is not valid UTF-8") from None
    if len(raw) > MAX_ADDRESS_OCTETS:
        raise UnsendableAddress("address too long for an SMTP command line")
    return raw


def _is_quoted_string(local: str) -> bool:
    """RFC 5321 Quoted-string: DQUOTE *(qtext / quoted-pair) DQUOTE, nothing after it."""
    if len(local) < 2 or not local.endswith('"'):
        return False
    inner = local[1:-1]
    i = 0
    while i < len(inner):
        c = inner[i]
        if c == "\\":
            i += 2
            if i > len(inner):
                return False
            continue
        if c == '"':
            return False
        i += 1
    return True
