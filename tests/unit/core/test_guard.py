"""The dictionary-attack guard, driven with a fake clock."""

from __future__ import annotations

import threading

import pytest

from callahead.core.guard import ClientGuard, client_key


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(limit: int = 3, window: float = 60.0) -> tuple[ClientGuard, FakeClock]:
    clock = FakeClock()
    return ClientGuard(limit=limit, window=window, clock=clock), clock


CLIENT = "192.0.2.10"


def test_below_the_limit_is_not_blocked() -> None:
    guard, _ = make(3)
    assert not guard.blocked(CLIENT)
    for _ in range(2):
        guard.record_unknown(CLIENT)
        assert not guard.blocked(CLIENT)


@pytest.mark.parametrize("limit", [1, 3, 20])
def test_at_the_limit_is_blocked(limit: int) -> None:
    guard, _ = make(limit)
    for _ in range(limit):
        assert not guard.blocked(CLIENT)
        guard.record_unknown(CLIENT)
    assert guard.blocked(CLIENT)
    guard.record_unknown(CLIENT)
    assert guard.blocked(CLIENT)


def test_sliding_window_expiry_unblocks() -> None:
    guard, clock = make(3, window=60)
    for _ in range(3):
        guard.record_unknown(CLIENT)
        clock.now += 10  # unknowns at 100, 110, 120
    assert guard.blocked(CLIENT)  # at 130
    clock.now = 159.9
    assert guard.blocked(CLIENT)
    clock.now = 160.0  # the one at 100 leaves the window
    assert not guard.blocked(CLIENT)
    guard.record_unknown(CLIENT)  # 110, 120, 160
    assert guard.blocked(CLIENT)
    clock.now = 180.0  # 110 and 120 gone
    assert not guard.blocked(CLIENT)
    clock.now = 1000.0
    assert not guard.blocked(CLIENT)
    for _ in range(2):
        guard.record_unknown(CLIENT)
    assert not guard.blocked(CLIENT)  # the old ones do not count any more


def test_clients_are_independent() -> None:
    guard, _ = make(2)
    for _ in range(2):
        guard.record_unknown("192.0.2.1")
    guard.record_unknown("192.0.2.2")
    assert guard.blocked("192.0.2.1")
    assert not guard.blocked("192.0.2.2")
    assert not guard.blocked("2001:db8::1")
    guard.record_unknown("192.0.2.2")
    assert guard.blocked("192.0.2.2")


@pytest.mark.parametrize(("limit", "window"), [(0, 60.0), (3, 0.0), (0, 0.0)])
def test_zero_limit_or_window_disables(limit: int, window: float) -> None:
    guard, _ = make(limit, window)
    assert not guard.enabled
    for _ in range(100):
        guard.record_unknown(CLIENT)
    assert not guard.blocked(CLIENT)


@pytest.mark.parametrize("client", [None, ""])
def test_no_client_is_never_blocked(client: str | None) -> None:
    guard, _ = make(1)
    assert guard.enabled
    for _ in range(10):
        guard.record_unknown(client)
        assert not guard.blocked(client)
    assert not guard.blocked(CLIENT)  # nor counted against anyone else


def test_concurrent_threads_count_every_unknown() -> None:
    guard = ClientGuard(limit=1000, window=600)
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        for _ in range(125):
            guard.record_unknown(CLIENT)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert guard.blocked(CLIENT)  # 8 x 125 = 1000 counted, none lost


def test_an_ipv6_client_rotating_through_its_64_is_one_client() -> None:
    guard, _ = make(3)
    for host in (1, 0xBEEF, 0xFFFF_FFFF_FFFF_FFFF):
        assert not guard.blocked("2001:db8:1:2::1")
        guard.record_unknown(
            f"2001:db8:1:2::{host:x}" if host < 0x10000 else "2001:db8:1:2:ffff:ffff:ffff:ffff"
        )
    assert guard.blocked("2001:db8:1:2::42")
    assert guard.blocked("IPv6:2001:db8:1:2::43")  # as some MTAs write it
    assert not guard.blocked("2001:db8:1:3::1")  # the next /64
    assert len(guard) == 1


def test_ipv6_prefix_is_configurable() -> None:
    guard = ClientGuard(limit=2, window=60, ipv6_prefix=128)
    guard.record_unknown("2001:db8::1")
    guard.record_unknown("2001:db8::2")
    assert not guard.blocked("2001:db8::1")
    wide = ClientGuard(limit=2, window=60, ipv6_prefix=48)
    wide.record_unknown("2001:db8:0:1::1")
    wide.record_unknown("2001:db8:0:2::1")
    assert wide.blocked("2001:db8:0:ffff::1")


@pytest.mark.parametrize(
    ("client", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("2001:db8:a:b:c:d:e:f", "2001:db8:a:b::/64"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("unknown", "unknown"),
        ("not:an:address", "not:an:address"),
    ],
)
def test_client_key(client: str, key: str) -> None:
    assert client_key(client) == key


def test_a_flood_of_new_clients_cannot_evict_a_blocked_one() -> None:
    clock = FakeClock()
    guard = ClientGuard(limit=2, window=600, max_clients=10, clock=clock)
    guard.record_unknown(CLIENT)
    guard.record_unknown(CLIENT)
    assert guard.blocked(CLIENT)
    for n in range(1000):
        clock.now += 0.01
        guard.record_unknown(f"198.51.100.{n % 250}" if n < 250 else f"203.0.113.{n % 250}")
    assert len(guard) <= 10
    assert guard.blocked(CLIENT)


def test_when_every_tracked_client_is_blocked_a_newcomer_is_not_tracked() -> None:
    guard = ClientGuard(limit=1, window=600, max_clients=3, clock=FakeClock())
    blocked = ["192.0.2.1", "192.0.2.2", "192.0.2.3"]
    for client in blocked:
        guard.record_unknown(client)
    guard.record_unknown("192.0.2.99")
    assert all(guard.blocked(c) for c in blocked)
    assert not guard.blocked("192.0.2.99")


def test_clients_whose_unknowns_left_the_window_are_forgotten() -> None:
    guard, clock = make(3, window=60)
    for n in range(50):
        guard.record_unknown(f"192.0.2.{n}")
    assert len(guard) == 50
    clock.now += 61
    guard.record_unknown("198.51.100.1")
    assert len(guard) == 1
