"""The admin socket's client side: what `callahead cache ...` and `callahead status` send
to a running `serve` (one JSON line each way, bounded) and how they print its answer.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterable, Mapping
from typing import Any

from ..base.errors import CallaheadError
from ..base.logfmt import escape

CLIENT_TIMEOUT = 10.0
"""Seconds the command line waits for an answer."""


class AdminUnavailable(CallaheadError):
    """No ``serve`` answers on the admin socket (not running, or not reachable)."""

    def __init__(self, message: str, *, permission: bool = False) -> None:
        super().__init__(message)
        self.permission = permission


def ask(path: str, request: Mapping[str, Any], *, timeout: float = CLIENT_TIMEOUT) -> Any:
    """Send one request to the ``serve`` listening on ``path``; its answer.

    Raises ``AdminUnavailable`` when nothing answers there."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        try:
            conn.connect(path)
        except PermissionError as exc:
            raise AdminUnavailable(
                f"no permission to use {path} ({exc.strerror}): run as root (the socket is "
                "for root and the service's own user alone)",
                permission=True,
            ) from None
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise AdminUnavailable(
                f"callahead serve is not running (nothing at {path}: {exc.strerror})"
            ) from None
        except OSError as exc:
            raise AdminUnavailable(f"cannot reach {path}: {exc.strerror or exc}") from None
        try:
            conn.sendall(json.dumps(request).encode() + b"\n")
            answer = _read_line(conn)
        except OSError as exc:
            raise AdminUnavailable(f"no answer on {path}: {exc.strerror or exc}") from None
    try:
        return json.loads(answer)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise AdminUnavailable(f"the answer on {path} is not callahead's") from None


def _read_line(conn: socket.socket) -> bytes:
    chunks: list[bytes] = []
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
        if chunk.endswith(b"\n"):
            break
    return b"".join(chunks)


def status_lines(answer: Mapping[str, Any]) -> Iterable[str]:
    """``callahead status`` as text."""
    yield f"callahead: {'healthy' if answer['healthy'] else 'degraded'}"
    loop = answer["loop"]
    if loop["alive"]:
        yield f"probe loop: alive (last beat {loop['silent_for']:.1f} s ago)"
    else:
        yield f"probe loop: STALLED (no beat for {loop['silent_for']:.1f} s)"
    if answer.get("dry_run"):
        yield "dry run: yes (nothing is rejected or deferred)"
    if answer.get("redis") is not None:
        yield redis_line(answer["redis"])
    primaries = answer["primaries"]
    if not primaries:
        yield "primaries: none probed yet"
    for p in primaries:
        breaker = "open" if p["breaker_open"] else "closed"
        if p["last_verdict"] is None:
            last = "none yet"
        else:
            detail = escape(str(p["last_detail"]), spaces=True)
            last = f"{p['last_verdict']} {p['last_age']:.1f} s ago: {detail}"
        line = (
            f"primary {p['name']}: breaker {breaker}, {p['sessions']} pool session"
            f"{'' if p['sessions'] == 1 else 's'}, last probe {last}"
        )
        if p["problem"]:
            line += f" -- DEGRADED: {p['problem']}"
        yield line


def redis_line(redis: Mapping[str, Any]) -> str:
    """The shared cache's line of ``callahead status``."""
    line = "redis: up" if redis["up"] else "redis: DOWN (this backup's own cache only)"
    if redis.get("master"):
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(redis["master_since"]))
        line += f", master {escape(str(redis['master']))} (Sentinel) since {since}"
    elif redis.get("sentinel"):
        line += ", master not named by the sentinels yet"
    return line
