"""``doctor``'s ``redis`` item behind Sentinel: the sentinels asked which master they
name (with its state, its replicas and the other sentinels they see), and that master
asked for a PING with the data nodes' password."""

from __future__ import annotations

import asyncio
from typing import Any

from ...base.logfmt import escape
from ...caching.redisclient import (
    SentinelTarget,
    close_client,
    host_port,
    master_client,
    sentinel_manager,
)
from ..config import Config
from ..sentinelconfig import sentinel_target
from .postfixhooks import Finding

ASK_TIMEOUT = 3.0
"""Seconds for each question to a sentinel or the master."""
SENTINEL_FIX = (
    "check CALLAHEAD_REDIS_SENTINELS, CALLAHEAD_REDIS_SERVICE (sentinel monitor NAME ...) "
    "and CALLAHEAD_REDIS_SENTINEL_PASSWORD against the sentinels' configuration"
)


def sentinel_findings(config: Config) -> list[Finding]:
    """The ``redis`` item for ``CALLAHEAD_REDIS_SENTINELS``."""
    target = sentinel_target(config)
    assert target is not None
    shown = f"{config.redis_shown} CALLAHEAD_REDIS_SERVICE={escape(target.service)}"
    if config.redis_refused:
        return [
            Finding(
                "redis",
                False,
                f"{shown} is not used, the shared cache is off: {config.redis_refused}",
                "give the sentinels a password (requirepass) and the master and replicas "
                "one (requirepass, masterauth), and set CALLAHEAD_REDIS_SENTINEL_PASSWORD "
                "and CALLAHEAD_REDIS_PASSWORD",
            )
        ]
    return [asyncio.run(_ask(target, shown, max(config.redis_timeout, ASK_TIMEOUT)))]


async def _ask(target: SentinelTarget, shown: str, timeout: float) -> Finding:
    sentinel = sentinel_manager(target, timeout)
    errors: list[str] = []
    try:
        for client, (host, port) in zip(list(sentinel.sentinels), target.sentinels, strict=True):
            where = host_port(host, port)
            try:
                asked: Any = client.sentinel_master(target.service)
                state: dict[str, Any] = await asyncio.wait_for(asked, timeout)
            except Exception as exc:  # noqa: BLE001 -- reported, the next sentinel asked
                errors.append(f"{where}: {escape(str(exc) or type(exc).__name__, spaces=True)}")
                continue
            return await _master(sentinel, target, shown, where, state, timeout)
    finally:
        for client in sentinel.sentinels:
            await close_client(client)
    return Finding(
        "redis", False, f"{shown}: no sentinel names the master: {'; '.join(errors)}", SENTINEL_FIX
    )


async def _master(
    sentinel: Any,
    target: SentinelTarget,
    shown: str,
    where: str,
    state: dict[str, Any],
    timeout: float,
) -> Finding:
    """What sentinel ``where`` says of the master (``state``), and whether it answers."""
    master = host_port(str(state.get("ip")), int(state.get("port", 0)))
    seen = (
        f"sentinel {where} names master {master} ({state.get('num-slaves', 0)} replicas, "
        f"{state.get('num-other-sentinels', 0)} other sentinels)"
    )
    if not state.get("is_master") or state.get("is_sdown") or state.get("is_odown"):
        return Finding(
            "redis",
            False,
            f"{shown}: {seen}, but it is down (flags {escape(str(state.get('flags', '')))}): "
            "a failover may be under way; until it ends each backup verifies alone",
            "look at the sentinels' logs; callahead follows the new master by itself",
        )
    client = master_client(sentinel, target, timeout)
    try:
        await asyncio.wait_for(client.ping(), timeout)
    except Exception as exc:  # noqa: BLE001 -- reported as the item's failure
        detail = escape(str(exc) or type(exc).__name__, spaces=True)
        return Finding(
            "redis",
            False,
            f"{shown}: {seen}, and it does not answer: {detail}",
            "check CALLAHEAD_REDIS_PASSWORD against the master's requirepass, and that "
            "this host reaches it",
        )
    finally:
        await close_client(client)
    return Finding(
        "redis",
        True,
        f"{shown}: {seen}, which answers; the shared cache uses it and follows a failover "
        "(callahead status shows when the master last changed)",
    )
