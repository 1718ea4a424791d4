"""Control addresses: which addresses of a domain a probe session may ask to learn
whether the primary is judging recipients at all (session.py's evidence rules).

An address verified valid recently is the best control: the primary said it exists,
so refusing it now means the primary stopped judging (drift), or the user was removed.
They come from the local positive cache (the few addresses of each domain verified
last) and, when it has none, from Redis (the address any backup of the site verified
last). postmaster@ is the session's own last resort and is not listed here.

While a domain has no verified address yet, the operator's ``CALLAHEAD_CONTROLS`` (users
known to exist) stand in: without them a primary that answers with bare codes and has
no postmaster@ (docs/verdicts.md) cannot be told from one in drift, and every unknown
recipient of the domain is accepted until one of its users has been verified. Refused
while another address of the domain is accepted, a configured control is not
forgotten (it is the operator's), but said once in the log: the user is gone, and the
domain is protected only by what was verified since.

A catch-all check's made-up address is never a control: the primary accepted it only
because it accepted everything, and refuses it once it stops, which would read as drift.
The checks keep and share nothing (catchall.py); the filter here also covers what an
earlier version published to Redis.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Protocol

from ..base.logfmt import escape
from .cache import PositiveCache
from .catchall import is_check_address

log = logging.getLogger("callahead.controls")


class SharedControls(Protocol):
    """Controls shared by the site's backups (sharedcache.SharedGate)."""

    async def recent_valid(self, domain: str) -> str | None: ...


class Controls:
    """The session's ``ControlSource``: the local cache first, then Redis."""

    def __init__(
        self,
        local: PositiveCache,
        shared: SharedControls | None = None,
        configured: Iterable[str] = (),
    ) -> None:
        """``configured``: ``CALLAHEAD_CONTROLS``, addresses with normalized domains."""
        self._local = local
        self._shared = shared
        self._configured: dict[str, tuple[str, ...]] = {}
        for address in configured:
            domain = address.rpartition("@")[2]
            self._configured[domain] = (*self._configured.get(domain, ()), address)
        self._said_gone: set[str] = set()

    async def controls(self, domain: str) -> tuple[str, ...]:
        found = tuple(a for a in self._local.recent(domain) if not is_check_address(a))
        if found:
            return found
        if self._shared is not None:
            shared = await self._shared.recent_valid(domain)
            if shared is not None and not is_check_address(shared):
                return (shared,)
        return self._configured.get(domain, ())

    def stale(self, address: str) -> None:
        if address in self._configured.get(address.rpartition("@")[2], ()):
            if address not in self._said_gone:
                self._said_gone.add(address)
                log.warning(
                    "CALLAHEAD_CONTROLS names <%s>, which the primary refused as unknown "
                    "while another address of its domain was accepted: the user is gone; "
                    "name one that exists",
                    escape(address),
                )
            return
        self._local.forget_recent(address)
