"""The admin socket: ``callahead cache ...`` and ``callahead status`` talk to ``serve``.

A unix socket (``CALLAHEAD_ADMIN_SOCKET``, mode 0600: the service's own user, and root,
whom no mode stops), served on the probe loop. Not its group's: the unit's group is
``postfix``, and every Postfix process could then flush the cache or list the addresses
verified recently. One request per connection: a JSON object on one line, one
JSON object back on one line, then the server closes. Requests (``op``):

* ``cache-show`` ``{"address": ...}`` -> ``{"cached": bool, "remaining": seconds|null}``
  (with Redis, ``"shared": true`` when Redis answered, and ``cached`` is then Redis's)
* ``cache-flush`` with ``{"address": ...}``, ``{"domain": ...}`` or ``{"all": true}``
  -> ``{"flushed": n}`` (with Redis: the keys removed from Redis, every backup's local
  copies go too, and ``"shared": false`` when Redis did not answer); with a cache file,
  the file is saved before the answer, which says ``"saved": bool``
* ``cache-stats`` -> entries, size, TTL, hits, misses, refreshes, the cache file
* ``status`` -> ``{"healthy": bool, "loop": {...}, "primaries": [...]}``
* ``report`` -> ``{"since": unix time, "metered": bool, "domains": {...}}``: ``callahead
  report``'s counts per domain since serve started (maillog/tally.py); ``metered``:
  the mail log is read (``CALLAHEAD_MAILLOG``), so the fates are counted

Every answer has ``"ok": true``, or ``"ok": false`` with ``"error"``. A request that is
too long, not JSON, or unknown gets an error answer, never more than that.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..base.address import normalize_domain, normalize_recipient
from ..base.errors import CallaheadError
from ..base.logfmt import escape
from ..caching.cache import PositiveCache
from ..caching.redisstore import SharedUnavailable
from ..caching.sharedcache import SharedGate
from ..probing.engine import PrimaryState
from .maillog.tally import DomainTally
from .unixsocket import BoundSocket, UnixSocketError, bind_unix

log = logging.getLogger("callahead.admin")

MAX_REQUEST = 64 * 1024
"""Bytes of one request line, at most."""
REQUEST_TIMEOUT = 5.0
"""Seconds a client has to send its request."""
SOCKET_MODE = 0o600
"""The service's own user (a DynamicUser under the unit) and root: nobody else."""


class AdminError(CallaheadError):
    """The admin socket cannot be set up; the message says why."""


@dataclass(frozen=True, slots=True)
class Health:
    """What ``status`` reports."""

    loop_alive: bool
    loop_silent_for: float
    primaries: list[PrimaryState]
    dry_run: bool

    @property
    def healthy(self) -> bool:
        return self.loop_alive and not any(primary_problem(p) for p in self.primaries)


def primary_problem(state: PrimaryState) -> str | None:
    """Why a primary makes callahead degraded; None when it does not."""
    if state.breaker_open:
        return "treated as down (breaker open)"
    if state.refuses_prober:
        return "refuses the probes (its recipients are accepted unverified)"
    if state.last_verdict is not None and not state.reached:
        return "not reached by the last probe"
    return None


class AdminServer:
    """Answers admin requests; runs on the probe loop."""

    def __init__(
        self,
        cache: PositiveCache,
        health: Callable[[], Health],
        counters: Callable[[], Mapping[str, float]],
        cache_file: str = "",
        shared: SharedGate | None = None,
        save: Callable[[], Awaitable[bool]] | None = None,
        report: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        """``shared``: the shared cache (Redis), on which ``cache show`` and ``cache
        flush`` act too, for every backup. ``save``: saves the cache file (True when
        written), awaited after every change before the answer, so that a flush
        survives a crash of serve."""
        self._cache = cache
        self._save = save
        self._shared = shared
        self._health = health
        self._counters = counters
        self._cache_file = cache_file
        self._report = report
        self._server: asyncio.Server | None = None
        self._bound: BoundSocket | None = None

    async def start(self, path: str) -> None:
        """Listen on ``path``; raises ``AdminError`` when it cannot (or must not: a file
        that is not a socket, or a socket where another callahead answers)."""
        try:
            bound = bind_unix(path, SOCKET_MODE)
        except UnixSocketError as exc:
            raise AdminError(str(exc)) from None
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, sock=bound.sock, limit=MAX_REQUEST
            )
        except OSError as exc:
            bound.sock.close()
            bound.remove()
            raise AdminError(f"cannot listen on {path}: {exc.strerror or exc}") from None
        self._bound = bound

    async def aclose(self) -> None:
        if self._server is None:
            return
        self._server.close()
        await self._server.wait_closed()
        self._server = None
        if self._bound is not None:
            self._bound.remove()  # only if it is still ours (not a later instance's)
            self._bound = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    line = await reader.readline()
            except (ValueError, asyncio.LimitOverrunError):
                answer = _error(f"request longer than {MAX_REQUEST} bytes")
            else:
                answer = await self.answer_async(line)
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    async def answer_async(self, line: bytes) -> dict[str, Any]:
        """The answer to one request line, on the probe loop: ``cache show`` and ``cache
        flush`` ask the shared cache too, when there is one."""
        request = _request(line)
        if isinstance(request, str):
            return self._answer(request)
        op = request.get("op")
        if op == "cache-show" and self._shared is not None:
            return await self._shared_show(self._shared, request)
        if op != "cache-flush":
            return self._answer(request)
        if self._shared is not None:
            answer = await self._shared_flush(self._shared, request)
        else:
            answer = self._flush(request)
        if answer["ok"] and self._save is not None:
            # Before the answer: once `callahead cache flush` returns, the file agrees.
            answer["saved"] = await self._save()
        return answer

    async def _shared_show(self, shared: SharedGate, request: Mapping[str, Any]) -> dict[str, Any]:
        answer = self._show(request)
        if not answer["ok"]:
            return answer
        try:
            left = await shared.remaining(answer["address"])
        except SharedUnavailable:
            answer["shared"] = None  # Redis did not answer: this backup's own cache only
            return answer
        answer.update(cached=left is not None, remaining=left, shared=True)
        return answer

    async def _shared_flush(self, shared: SharedGate, request: Mapping[str, Any]) -> dict[str, Any]:
        target = _flush_target(request)
        if target is None:
            return _error("expected an address, @domain or all")
        kind, what = target
        local = self._flush_local(kind, what)
        if kind == "all":
            flushed = await shared.flush_all()
        elif kind == "domain":
            flushed = await shared.flush_domain(what)
        else:
            flushed = await shared.flush_address(what)
        label = "all" if kind == "all" else what
        if flushed is None:
            log.warning(
                "admin: cache flush %s: %d local entr%s; redis did not answer: the other "
                "backups keep theirs",
                escape(label),
                local,
                _ies(local),
            )
            return {"ok": True, "flushed": local, "shared": False}
        log.info("admin: cache flush %s: %d shared entr%s", escape(label), flushed, _ies(flushed))
        return {"ok": True, "flushed": flushed, "shared": True}

    def _flush_local(self, kind: str, what: str) -> int:
        if kind == "all":
            return self._cache.clear()
        if kind == "domain":
            return self._cache.discard_domain(what)
        return int(self._cache.discard(what))

    def answer(self, line: bytes) -> dict[str, Any]:
        """The answer to one request line (this backup's own cache only)."""
        return self._answer(_request(line))

    def _answer(self, request: dict[str, Any] | str) -> dict[str, Any]:
        if isinstance(request, str):  # not a request: why
            return _error(request)
        op = request.get("op")
        if op == "cache-show":
            return self._show(request)
        if op == "cache-flush":
            return self._flush(request)
        if op == "cache-stats":
            return self._stats()
        if op == "cache-recent":
            return self._recent(request)
        if op == "status":
            return self._status()
        if op == "report" and self._report is not None:
            return {"ok": True, **self._report()}
        return _error(f"unknown op {str(op)[:40]!r}")

    def _show(self, request: Mapping[str, Any]) -> dict[str, Any]:
        address = _address(request.get("address"))
        if address is None:
            return _error("expected an address, user@domain")
        left = self._cache.remaining(address)
        return {"ok": True, "address": address, "cached": left is not None, "remaining": left}

    def _recent(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Addresses of a domain verified recently, newest first (``callahead doctor``
        probes one as a real user)."""
        domain = request.get("domain")
        if not isinstance(domain, str) or not domain or "@" in domain:
            return _error("expected a domain")
        domain = normalize_domain(domain)
        return {"ok": True, "domain": domain, "addresses": list(self._cache.recent(domain))}

    def _flush(self, request: Mapping[str, Any]) -> dict[str, Any]:
        target = _flush_target(request)
        if target is None:
            return _error("expected an address, @domain or all")
        kind, what = target
        flushed = self._flush_local(kind, what)
        label = "all" if kind == "all" else f"@{what}" if kind == "domain" else what
        log.info("admin: cache flush %s: %d entr%s", escape(label), flushed, _ies(flushed))
        return {"ok": True, "flushed": flushed}

    def _stats(self) -> dict[str, Any]:
        stats = self._cache.stats()
        return {
            "ok": True,
            "enabled": stats.enabled,
            "entries": stats.entries,
            "size": stats.maxsize,
            "ttl": stats.ttl,
            "file": self._cache_file,
            **({} if self._shared is None else {"shared": redis_state(self._shared)}),
            **self._counters(),
        }

    def _status(self) -> dict[str, Any]:
        health = self._health()
        return {
            "ok": True,
            "healthy": health.healthy,
            "dry_run": health.dry_run,
            "loop": {"alive": health.loop_alive, "silent_for": health.loop_silent_for},
            "primaries": [_primary(p) for p in health.primaries],
            **({} if self._shared is None else {"redis": redis_status(self._shared)}),
        }


def report_answer(tally: DomainTally, *, metered: bool) -> dict[str, Any]:
    """The ``report`` op's answer, but ``ok``."""
    return {"since": tally.since, "metered": metered, "domains": tally.snapshot()}


def redis_state(shared: SharedGate) -> str:
    return "redis up" if shared.store.up else "redis down (this backup's own cache only)"


def redis_status(shared: SharedGate) -> dict[str, Any]:
    """The shared cache's Redis for ``status``: up or not, and behind Sentinel the master
    the sentinels name and since when (Unix time; None before they first answered)."""
    info = shared.store.master_info
    return {
        "up": shared.store.up,
        "sentinel": shared.store.master is not None,
        "master": None if info is None else info.address,
        "master_since": None if info is None else info.since,
    }


def _primary(state: PrimaryState) -> dict[str, Any]:
    return {
        "name": state.name,
        "breaker_open": state.breaker_open,
        "sessions": state.open_sessions,
        "reached": state.reached,
        "refuses_prober": state.refuses_prober,
        "last_verdict": None if state.last_verdict is None else state.last_verdict.value,
        "last_detail": state.last_detail,
        "last_age": state.last_age,
        "problem": primary_problem(state),
    }


def _request(line: bytes) -> dict[str, Any] | str:
    """A request line as a JSON object, or why it is not one."""
    try:
        request = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "the request is not a JSON object on one line"
    if not isinstance(request, dict):
        return "the request is not a JSON object"
    return request


def _flush_target(request: Mapping[str, Any]) -> tuple[str, str] | None:
    """What a flush request names: ("all", ""), ("domain", DOMAIN) or ("address",
    ADDRESS), normalized; None when it names nothing."""
    if request.get("all") is True:
        return "all", ""
    domain = request.get("domain")
    if isinstance(domain, str) and domain.strip("@ "):
        return "domain", normalize_domain(domain.strip().lstrip("@"))
    address = _address(request.get("address"))
    return None if address is None else ("address", address)


def _address(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    normalized = normalize_recipient(value)
    return None if normalized is None else normalized.address


def _error(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message}


def _ies(count: int) -> str:
    return "y" if count == 1 else "ies"
