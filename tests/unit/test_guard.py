"""The dictionary-attack guard, driven with a fake clock."""

from __future__ import annotations

import threading

import pytest

from callahead.guard import ClientGuard


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
