"""The one retry policy: backoff with jitter, bounded, Retry-After honoured, one layer per operation."""

from __future__ import annotations

import pytest

from runner.clock import FakeClock
from runner.errors import StorageError
from runner.storage.retry import RetryPolicy, call_with_retry, should_retry_again, was_retried

POLICY = RetryPolicy(attempts=5, initial_s=1.0, max_s=60.0, jitter_s=1.0, max_total_s=600.0)


def failing(times: int, *, retry_after_s: float | None = None, transient: bool = True):
    calls = []

    def operation() -> str:
        calls.append(1)
        if len(calls) <= times:
            error = StorageError("busy", transient=transient)
            if retry_after_s is not None:
                error.retry_after_s = retry_after_s
            raise error
        return "done"

    return operation, calls


def test_transient_errors_back_off_exponentially_with_jitter():
    clock = FakeClock()
    operation, calls = failing(3)
    assert call_with_retry(operation, policy=POLICY, clock=clock) == "done"
    assert len(calls) == 4 and len(clock.sleeps) == 3
    for n, wait in enumerate(clock.sleeps):
        assert 2**n <= wait <= 2**n + 1


def test_retry_after_is_honoured_and_capped():
    clock = FakeClock()
    operation, _ = failing(1, retry_after_s=42)
    call_with_retry(operation, policy=POLICY, clock=clock)
    assert 42 <= clock.sleeps[0] <= 43
    clock = FakeClock()
    operation, _ = failing(1, retry_after_s=3600)
    call_with_retry(operation, policy=POLICY, clock=clock)
    assert clock.sleeps == [POLICY.max_retry_after_s]


def test_permanent_errors_fail_at_once_and_are_not_marked():
    clock = FakeClock()
    operation, calls = failing(9, transient=False)
    with pytest.raises(StorageError) as info:
        call_with_retry(operation, policy=POLICY, clock=clock)
    assert len(calls) == 1 and clock.sleeps == [] and not was_retried(info.value)


def test_gives_up_after_the_attempts_and_marks_the_error_so_no_layer_above_retries_it():
    clock = FakeClock()
    operation, calls = failing(99)
    with pytest.raises(StorageError) as info:
        call_with_retry(operation, policy=POLICY, clock=clock)
    assert len(calls) == POLICY.attempts
    assert was_retried(info.value) and not should_retry_again(info.value)


def test_total_time_is_bounded():
    clock = FakeClock()
    operation, calls = failing(99, retry_after_s=250)
    with pytest.raises(StorageError):
        call_with_retry(operation, policy=POLICY, clock=clock)
    assert clock.monotonic() < POLICY.max_total_s + POLICY.max_retry_after_s
    assert len(calls) < POLICY.attempts


def test_nested_layers_do_not_multiply():
    """A backend's exhausted retries are not retried again by the checkpoint layer: 5 tries, not 25."""
    clock = FakeClock()
    operation, calls = failing(99)

    def backend_call() -> str:
        return call_with_retry(operation, policy=POLICY, clock=clock)

    with pytest.raises(StorageError):
        call_with_retry(backend_call, policy=POLICY, clock=clock, retry_if=should_retry_again)
    assert len(calls) == POLICY.attempts
