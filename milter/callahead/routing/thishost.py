"""This host, as MX routes must know it: the names and addresses that mean "this backup"
among a domain's MX hosts (Postfix's myhostname, inet_interfaces, proxy_interfaces and
the interface addresses), so that callahead never probes itself and never skips the real
primary. SIGHUP rebuilds the identity; the interface addresses are re-read at an MX
lookup once they are INTERFACE_REFRESH seconds old.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..base.address import normalize_domain
from ..base.errors import CallaheadError
from ..base.logfmt import escape

log = logging.getLogger("callahead.resolve")


INTERFACE_REFRESH = 30.0
"""Seconds this host's interface addresses are used before an MX lookup re-reads them."""
FIB_TRIE = "/proc/net/fib_trie"
IF_INET6 = "/proc/net/if_inet6"


class InterfaceReadError(CallaheadError):
    """This host's interface addresses cannot be read: the reason in the message."""


@dataclass(frozen=True, slots=True)
class ThisHost:
    """What counts as this host among MX hosts: its names and its addresses."""

    names: frozenset[str]
    addresses: frozenset[str]

    @classmethod
    def from_postfix(cls, names: Iterable[str], interfaces: Iterable[str]) -> ThisHost:
        """``interfaces``: Postfix's ``inet_interfaces`` and ``proxy_interfaces``
        entries; ``all`` means every address of this host's interfaces (read now)."""
        identity = HostIdentity.from_postfix(names, interfaces)
        return identity.with_interfaces(
            frozenset(interface_addresses()) if identity.all_interfaces else frozenset()
        )

    def current(self) -> ThisHost:
        """This host as it is now (``HostView``): a fixed one never changes."""
        return self

    def is_self(self, name: str, addresses: Sequence[str]) -> bool:
        return normalize_domain(name) in self.names or any(
            _canonical(a) in self.addresses for a in addresses
        )


@dataclass(frozen=True, slots=True)
class HostIdentity:
    """What the configuration says this host is: its names, the addresses it lists, and
    whether it listens on all of them (``all``: every interface address counts too)."""

    names: frozenset[str]
    addresses: frozenset[str]
    all_interfaces: bool

    @classmethod
    def from_postfix(cls, names: Iterable[str], interfaces: Iterable[str]) -> HostIdentity:
        """``interfaces``: Postfix's ``inet_interfaces`` and ``proxy_interfaces``
        entries; a name among them counts as one of this host's names."""
        addresses: set[str] = set()
        all_names = list(names)
        every = False
        for item in interfaces:
            item = item.strip("[]").lower()
            if item == "all":
                every = True
            elif item in ("loopback-only", "localhost"):
                addresses |= {"127.0.0.1", "::1"}
            else:
                try:
                    addresses.add(str(ipaddress.ip_address(item)))
                except ValueError:
                    all_names.append(item)
        return cls(
            frozenset(normalize_domain(n) for n in all_names if n),
            frozenset(addresses),
            every,
        )

    def with_interfaces(self, found: frozenset[str]) -> ThisHost:
        """This host with ``found`` as its interfaces' addresses (counted with ``all``
        only)."""
        return ThisHost(
            self.names, self.addresses | found if self.all_interfaces else self.addresses
        )


class HostView(Protocol):
    """This host as it is at the moment of asking (``ThisHost``, ``LiveThisHost``)."""

    def current(self) -> ThisHost: ...


def _canonical(address: str) -> str:
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return address


def read_interface_addresses() -> frozenset[str]:
    """Every address of this host's interfaces (Linux: the kernel's local routes in
    ``/proc/net/fib_trie``, and ``/proc/net/if_inet6``, absent without IPv6). Raises
    ``InterfaceReadError`` when they cannot be read, or when no address is found at all
    (every Linux host has 127.0.0.1: an empty answer is a misread)."""
    found: set[str] = set()
    try:
        fib = Path(FIB_TRIE).read_text()
    except OSError as exc:
        raise InterfaceReadError(f"{FIB_TRIE}: {exc.strerror or exc}") from None
    last = ""
    for line in fib.splitlines():
        text = line.strip()
        if text.startswith(("|--", "+--")):
            last = text[3:].strip().split("/")[0]
        elif text.startswith("/32 host LOCAL") and last:
            found.add(last)
    try:
        inet6 = Path(IF_INET6).read_text()
    except FileNotFoundError:
        inet6 = ""  # IPv6 is off on this host
    except OSError as exc:
        raise InterfaceReadError(f"{IF_INET6}: {exc.strerror or exc}") from None
    for line in inet6.splitlines():
        try:
            found.add(str(ipaddress.ip_address(bytes.fromhex(line.split()[0]))))
        except (ValueError, IndexError):
            raise InterfaceReadError(f"{IF_INET6}: unreadable line {line.strip()!r}") from None
    if not found:
        raise InterfaceReadError(f"no address found in {FIB_TRIE} or {IF_INET6}")
    return frozenset(found)


def interface_addresses() -> set[str]:
    """``read_interface_addresses``, or none when they cannot be read."""
    try:
        return set(read_interface_addresses())
    except InterfaceReadError:
        return set()


class LiveThisHost:
    """This host as it is now (``HostView``), for ``MxResolver``.

    ``current`` re-reads the interfaces' addresses (with ``all`` only) when the last
    read is ``interval`` seconds old: at most one read per interval, and none while no
    MX route is looked up. ``replace`` (SIGHUP) puts a new identity in force and reads
    the interfaces at once. A read that fails keeps the addresses read before; the
    first failure of a run is logged, and so is the read that works again. ``current``
    runs on the probe loop and ``replace`` in the main thread: a lock keeps a read that
    began before ``replace`` from putting back the old identity."""

    def __init__(
        self,
        identity: HostIdentity,
        *,
        read: Callable[[], frozenset[str]] = read_interface_addresses,
        clock: Callable[[], float] = time.monotonic,
        interval: float = INTERFACE_REFRESH,
    ) -> None:
        self._read = read
        self._clock = clock
        self._interval = interval
        self._lock = threading.Lock()
        self._identity = identity
        self._found: frozenset[str] | None = None
        """The interfaces' addresses last read; None before one read worked."""
        self._failing = False
        self._due = clock()
        self._view = identity.with_interfaces(frozenset())
        with self._lock:
            self._update(self._due)

    @property
    def identity(self) -> HostIdentity:
        return self._identity

    def current(self) -> ThisHost:
        if self._identity.all_interfaces and self._clock() >= self._due:
            with self._lock:
                now = self._clock()
                if now >= self._due:
                    self._update(now)
        return self._view

    def replace(self, identity: HostIdentity) -> ThisHost:
        """Put ``identity`` in force (the interfaces re-read now); returns this host."""
        with self._lock:
            before = self._view
            self._identity = identity
            self._update(self._clock())
            view = self._view
        if view != before:
            log.info(
                "this host among MX hosts (never probed) is now: names %s; addresses %s",
                escape(",".join(sorted(view.names)) or "none"),
                escape(",".join(sorted(view.addresses)) or "none"),
            )
        return view

    def _update(self, now: float) -> None:
        """Re-read the interfaces (with ``all``) and rebuild the view; under the lock."""
        if self._identity.all_interfaces:
            self._due = now + self._interval
            try:
                found = self._read()
            except InterfaceReadError as exc:
                if not self._failing:
                    self._failing = True
                    log.warning(
                        "cannot read this host's interface addresses, keeping the %d "
                        "known (their MX entries stay skipped): %s",
                        len(self._found or ()),
                        exc,
                    )
            else:
                if self._failing:
                    self._failing = False
                    log.info("this host's interface addresses can be read again")
                if self._found is not None and found != self._found:
                    log.info(
                        "this host's interface addresses changed: added %s; removed %s",
                        escape(",".join(sorted(found - self._found)) or "none"),
                        escape(",".join(sorted(self._found - found)) or "none"),
                    )
                self._found = found
        self._view = self._identity.with_interfaces(self._found or frozenset())
