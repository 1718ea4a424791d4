"""The policy's routes: ``CALLAHEAD_ROUTES`` first, then a Postfix configuration's maps.

The Postfix lookups (postfixmaps.py) are subprocesses run on the probe loop; a libmilter
thread waits for one at most ``LOOKUP_WAIT`` seconds, and a route already known is
answered without the loop. ``reload`` (SIGHUP) re-reads the Postfix configuration and
starts with empty caches; if the new configuration cannot be read, the old one stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

from ..base.logfmt import escape
from .postfixmaps import LOOKUP_TIMEOUT, PostfixRoutes
from .postfixsettings import PostfixSettings, load_settings
from .routes import Nexthop, RouteTable, RouteUnavailable

log = logging.getLogger("callahead.router")

LOOKUP_WAIT = 2 * LOOKUP_TIMEOUT + 1.0
"""Seconds a recipient waits for its route at most (a relay_domains lookup, then a
transport_maps one)."""

Runner = Callable[[Coroutine[Any, Any, tuple[Nexthop, ...]], float], tuple[Nexthop, ...]]
"""Runs a coroutine on the probe loop and waits (loop.ProbeLoop.run)."""


class Router:
    def __init__(
        self,
        table: RouteTable,
        postfix: PostfixRoutes | None,
        run: Runner,
        on_reload: Callable[[], None] = lambda: None,
    ) -> None:
        self._table = table
        self._postfix = postfix
        self._run = run
        self._on_reload = on_reload

    def lookup(self, domain: str, address: str = "") -> tuple[Nexthop, ...]:
        known = self._known(domain, address)
        if known is not None or self._postfix is None:
            return known or ()
        with self._lookup_errors(domain):
            return self._run(self._postfix.lookup(domain, address), LOOKUP_WAIT)

    async def lookup_async(self, domain: str, address: str = "") -> tuple[Nexthop, ...]:
        """``lookup`` on the probe loop itself (the policy service): the Postfix lookups
        are awaited, never waited for with the loop blocked."""
        known = self._known(domain, address)
        if known is not None or self._postfix is None:
            return known or ()
        with self._lookup_errors(domain):
            async with asyncio.timeout(LOOKUP_WAIT):
                return await self._postfix.lookup(domain, address)

    def route_key(self, domain: str) -> str:
        return self._table.route_key(domain)

    def _known(self, domain: str, address: str) -> tuple[Nexthop, ...] | None:
        """The route without a Postfix lookup, if it is known so; None: look it up."""
        hops = self._table.lookup(domain)
        if hops or self._postfix is None:
            return hops
        return self._postfix.cached(domain, address)

    @contextlib.contextmanager
    def _lookup_errors(self, domain: str) -> Iterator[None]:
        """A lookup that fails or takes too long: logged, and RouteUnavailable."""
        try:
            yield
        except TimeoutError:
            log.warning("route of %s: no answer from the Postfix maps in time", escape(domain))
            raise RouteUnavailable("the Postfix map lookups took too long") from None
        except RouteUnavailable as exc:
            log.warning("route of %s: %s", escape(domain), exc)
            raise

    @property
    def postfix_settings(self) -> PostfixSettings | None:
        """The Postfix settings in force (the last ones read), None without Postfix."""
        return None if self._postfix is None else self._postfix.settings

    def describe(self) -> str:
        """Where routes come from, for the log and ``callahead config``."""
        return describe_routes(self._table, self._postfix)

    def reload(self) -> str:
        """Re-read the Postfix configuration, then call ``on_reload`` (which may read
        ``postfix_settings``); returns what is in force now. Raises
        ``postfixmaps.PostfixConfigError`` (the old routes stay, ``on_reload`` is not
        called) when it cannot."""
        if self._postfix is not None:
            settings = load_settings(self._postfix.settings.config_dir)
            self._postfix = PostfixRoutes(settings)
        self._on_reload()
        return self.describe()


def describe_routes(table: RouteTable, postfix: PostfixRoutes | None) -> str:
    parts = []
    if table:
        parts.append("CALLAHEAD_ROUTES " + " ".join(f"{d}={h}" for d, h in table.entries()))
    if postfix is not None:
        parts.append(postfix.settings.describe())
    return ", then ".join(parts) or "none"
