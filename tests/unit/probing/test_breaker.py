"""The primary-down breaker, driven with a fake clock."""

from __future__ import annotations

import pytest

from callahead.probing.breaker import Admission, Breaker, State


class FakeClock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


def make(failures: int = 3, cooldown: float = 30.0) -> tuple[Breaker, FakeClock]:
    clock = FakeClock()
    return Breaker(failures=failures, cooldown=cooldown, clock=clock), clock


def state_of(breaker: Breaker) -> State:
    """The state, read afresh (a plain attribute read would let mypy narrow it)."""
    return breaker.state


def fail(breaker: Breaker, times: int) -> None:
    for _ in range(times):
        assert breaker.allow()
        breaker.record(False)


def test_starts_closed_and_lets_everything_through() -> None:
    breaker, _ = make()
    assert state_of(breaker) is State.CLOSED
    assert all(breaker.allow() for _ in range(100))


@pytest.mark.parametrize("failures", [1, 3, 5])
def test_opens_after_n_consecutive_unreached(failures: int) -> None:
    breaker, _ = make(failures)
    fail(breaker, failures - 1)
    assert state_of(breaker) is State.CLOSED
    assert breaker.allow()
    breaker.record(False)
    assert state_of(breaker) is State.OPEN
    assert not breaker.allow()


def test_reached_resets_the_count() -> None:
    breaker, _ = make(3)
    for _ in range(10):
        fail(breaker, 2)
        assert breaker.allow()
        breaker.record(True)
        assert state_of(breaker) is State.CLOSED
    fail(breaker, 2)
    assert state_of(breaker) is State.CLOSED
    fail(breaker, 1)
    assert state_of(breaker) is State.OPEN


def test_open_rejects_until_the_cooldown_ends() -> None:
    breaker, clock = make(2, cooldown=30)
    fail(breaker, 2)
    opened = clock.now
    for elapsed in (0.0, 1.0, 10.0, 29.5, 29.99):
        clock.now = opened + elapsed
        assert state_of(breaker) is State.OPEN
        assert not breaker.allow()
    clock.now = opened + 30.0
    assert state_of(breaker) is State.HALF_OPEN


def test_half_open_lets_exactly_one_trial_at_a_time() -> None:
    breaker, clock = make(2, cooldown=10)
    fail(breaker, 2)
    clock.now += 10
    assert breaker.allow()  # the trial
    assert state_of(breaker) is State.HALF_OPEN
    assert not any(breaker.allow() for _ in range(20))
    clock.now += 100  # time alone does not free the trial slot
    assert not breaker.allow()


def test_trial_success_closes() -> None:
    breaker, clock = make(2, cooldown=10)
    fail(breaker, 2)
    clock.now += 10
    assert breaker.allow()
    breaker.record(True)
    assert state_of(breaker) is State.CLOSED
    assert all(breaker.allow() for _ in range(10))
    # The count starts over: one failure does not reopen it.
    breaker.record(False)
    assert state_of(breaker) is State.CLOSED


def test_trial_failure_reopens_for_another_cooldown() -> None:
    breaker, clock = make(3, cooldown=10)
    fail(breaker, 3)
    clock.now += 12
    assert breaker.allow()
    breaker.record(False)  # one failure is enough in half-open state
    assert state_of(breaker) is State.OPEN
    assert not breaker.allow()
    clock.now += 9.9
    assert not breaker.allow()
    clock.now += 0.1
    assert state_of(breaker) is State.HALF_OPEN
    assert breaker.allow()
    assert not breaker.allow()


def test_zero_failures_never_opens() -> None:
    breaker, clock = make(0, cooldown=10)
    for _ in range(1000):
        assert breaker.allow()
        breaker.record(False)
    clock.now += 1
    assert state_of(breaker) is State.CLOSED
    assert breaker.allow()


def test_release_frees_the_trial_slot() -> None:
    breaker, clock = make(1, cooldown=10)
    fail(breaker, 1)
    clock.now += 10
    trial = breaker.allow()
    assert trial is Admission.TRIAL
    assert not breaker.allow()
    breaker.release(trial)  # the trial was cancelled: no verdict on the primary
    assert state_of(breaker) is State.HALF_OPEN
    trial = breaker.allow()
    assert trial is Admission.TRIAL
    assert not breaker.allow()
    breaker.record(True, trial)
    assert state_of(breaker) is State.CLOSED


@pytest.mark.parametrize("outcome", ["release", "record_reached_false"])
def test_only_the_trials_own_outcome_frees_the_trial_slot(outcome: str) -> None:
    """A probe admitted while the breaker was closed may end while the trial is out:
    its outcome must not let a second trial through."""
    breaker, clock = make(2, cooldown=10)
    early = breaker.allow()  # admitted while closed, still running
    assert early is Admission.PROBE
    fail(breaker, 2)
    clock.now += 10
    trial = breaker.allow()
    assert trial is Admission.TRIAL
    if outcome == "release":
        breaker.release(early)
        assert state_of(breaker) is State.HALF_OPEN
    else:
        breaker.record(False, early)  # a new cooldown: its own trial later
        assert state_of(breaker) is State.OPEN
        clock.now += 10
    assert breaker.allow() is (None if outcome == "release" else Admission.TRIAL)
    assert not breaker.allow()


def test_an_early_probes_success_closes_even_with_the_trial_out() -> None:
    breaker, clock = make(2, cooldown=10)
    early = breaker.allow()
    assert early is Admission.PROBE
    fail(breaker, 2)
    clock.now += 10
    trial = breaker.allow()
    assert trial is Admission.TRIAL
    breaker.record(True, early)  # the primary answered: it is up
    assert state_of(breaker) is State.CLOSED
    assert breaker.allow() is Admission.PROBE
    breaker.record(True, trial)
    fail(breaker, 2)  # open again later: a new trial after the cooldown
    clock.now += 10
    assert breaker.allow() is Admission.TRIAL
