"""Which addresses an MX lookup may give as probe targets.

A relay domain's DNS is not the operator's word: its MX records could point a probe at
this host's own services (``127.0.0.1``, or ``0.0.0.0``, which a connect takes to this
host), at a neighbour on the link, or at a multicast group. So an address that an MX
lookup gives is skipped when it is

* unspecified (``0.0.0.0/8``, ``::``): always;
* loopback (``127.0.0.0/8``, ``::1``) or link-local (``169.254.0.0/16``, ``fe80::/10``),
  unless it is in the operator's ``CALLAHEAD_MX_ALLOW_NETWORKS`` (a lab whose whole
  network is loopback);
* multicast: always (no SMTP server is there).

IPv4-mapped IPv6 addresses (``::ffff:127.0.0.1``) are judged as the IPv4 address they
carry. Private addresses (RFC 1918, ``fc00::/7``) are probed: many sites run their
primary on one, behind the backup, over a VPN or on the same LAN. This host's own
addresses and names are resolve.py's (Postfix's ``inet_interfaces``, as smtp(8) skips
its own MX entry). Literal nexthops (``[host]``) are the operator's and never judged
here. Each skipped target is logged once (``TargetLog``).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from ..base.logfmt import escape

log = logging.getLogger("callahead.resolve")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

UNSPECIFIED = "unspecified"
LOOPBACK = "loopback"
LINK_LOCAL = "link-local"
MULTICAST = "multicast"
THIS_HOST = "this host"
AFTER_THIS_HOST = "after this host"
LOGGED_MAX = 1024
"""Skipped targets remembered as logged; past it the memory starts again (a DNS that
hands out many addresses gets a line per new one at most, never one per recipient)."""


@dataclass(frozen=True, slots=True)
class SkippedTarget:
    """An MX host's address that is not probed, and why: ``unspecified``,
    ``loopback``, ``link-local``, ``multicast``, ``this host`` (the MX host is this
    one: its name or an address) or ``after this host`` (an MX host of equal or lower
    preference than this one). ``address`` is empty for an MX host skipped with no
    address."""

    host: str
    address: str
    why: str

    def __str__(self) -> str:
        where = f"{self.host} {self.address}" if self.address else self.host
        return f"{where} ({self.why})"


def describe(skipped: Sequence[SkippedTarget]) -> str:
    """``mx.example.com 127.0.0.1 (loopback), ...`` for a message."""
    return ", ".join(str(s) for s in skipped)


def unsafe(address: str, allowed: Sequence[Network] = ()) -> str | None:
    """Why an address an MX lookup gave must not be probed (``UNSPECIFIED``,
    ``LOOPBACK``, ``LINK_LOCAL``, ``MULTICAST``), or None when it may be. ``allowed``
    lets loopback and link-local addresses through, never the others."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return UNSPECIFIED  # not an address at all: nothing to connect to
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified or (isinstance(ip, ipaddress.IPv4Address) and ip.packed[0] == 0):
        return UNSPECIFIED
    if ip.is_multicast:
        return MULTICAST
    why = LOOPBACK if ip.is_loopback else LINK_LOCAL if ip.is_link_local else None
    if why is not None and any(ip.version == n.version and ip in n for n in allowed):
        return None
    return why


class TargetLog:
    """Logs each skipped target once (per MX host, address and reason), bounded."""

    def __init__(self) -> None:
        self._logged: set[SkippedTarget] = set()

    def note(self, name: str, skipped: SkippedTarget) -> None:
        """Log ``skipped`` (an MX host of ``name``) unless it was logged already."""
        if skipped.why in (THIS_HOST, AFTER_THIS_HOST) or skipped in self._logged:
            return  # this host's own entry is in every backup's MX list: not news
        if len(self._logged) >= LOGGED_MAX:
            self._logged.clear()
        self._logged.add(skipped)
        hint = (
            " (CALLAHEAD_MX_ALLOW_NETWORKS can let its network through)"
            if skipped.why in (LOOPBACK, LINK_LOCAL)
            else ""
        )
        log.warning(
            "MX host %s of %s is at %s, %s: never probed%s",
            escape(skipped.host),
            escape(name),
            escape(skipped.address),
            escape(skipped.why),
            hint,
        )
