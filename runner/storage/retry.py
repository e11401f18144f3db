"""The one retry policy for every storage backend (Drive API, Hugging Face Hub) and the checkpoint layer.

Owns: `RetryPolicy` (exponential backoff with jitter, bounded in attempts and in total
time, honouring a server's Retry-After) and `call_with_retry`, which runs one operation
under it with an injected clock, so tests record the waits instead of sleeping.

One operation is retried at one layer only. A backend retries each of its calls; when
the policy gives up it marks the error (`was_retried`), and the layer above (the
checkpoint manager's whole-commit retry) does not retry that error again. Before this
module, Drive's 8 attempts sat inside the manager's 5: up to 40 tries and ~40 minutes
for one dead network (issue 20).

A deadline (`with deadline(at):`, on the calling thread only) bounds every retry inside it: no wait
may end past `at` (the clock's monotonic seconds); the policy gives up at once instead and marks the
error (`hit_deadline`). The lease's heartbeat runs under the time left on the lease, so a server's
Retry-After of an hour can never hold it past the moment the lease would lapse.

Must not: decide what is transient (the backend says so with StorageError.transient);
sleep or read time except through the Clock it is given.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TypeVar

import tenacity

from runner.clock import Clock
from runner.errors import StorageError

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRIED_MARK = "was_retried"
"""Attribute set on an error the policy gave up on (it has been retried already: do not retry it again)."""
RETRY_AFTER_ATTR = "retry_after_s"
"""Attribute a backend sets on a StorageError when the server said how long to wait (HTTP Retry-After)."""
DEADLINE_MARK = "hit_deadline"
"""Attribute set on an error the policy gave up on because the next wait would have passed the deadline."""

_deadline: ContextVar[float | None] = ContextVar("relay_retry_deadline", default=None)
"""The monotonic time no retry wait may pass, per thread (a context variable: each thread sees its own)."""


@contextmanager
def deadline(at_monotonic: float | None) -> Iterator[None]:
    """Within the block, on this thread, retries never wait past `at_monotonic` (None: no deadline).
    Nested deadlines keep the earlier one."""
    outer = _deadline.get()
    inner = at_monotonic if outer is None else (outer if at_monotonic is None else min(outer, at_monotonic))
    token = _deadline.set(inner)
    try:
        yield
    finally:
        _deadline.reset(token)


def time_left_s(clock: Clock) -> float | None:
    """Seconds until the deadline in force on this thread (None: none)."""
    at = _deadline.get()
    return None if at is None else at - clock.monotonic()


def hit_deadline(error: BaseException) -> bool:
    return bool(getattr(error, DEADLINE_MARK, False))


@dataclass(frozen=True)
class RetryPolicy:
    """How transient errors are retried: waits of initial·2^n s (capped at max_s) plus 0..jitter_s s."""

    attempts: int = 8
    """Tries per operation, the first included (with the defaults the waits total about 2 minutes)."""
    initial_s: float = 1.0
    """The first wait before jitter, in seconds."""
    max_s: float = 60.0
    """The longest wait the backoff itself chooses, in seconds."""
    jitter_s: float = 1.0
    """Random extra of 0..jitter_s seconds added to each wait (spreads out retrying clients)."""
    max_total_s: float = 600.0
    """Give up once this many seconds have passed since the first try, whatever the attempts left."""
    max_retry_after_s: float = 300.0
    """A server's Retry-After longer than this is capped (a session cannot wait out an hour's rate limit)."""


def is_transient(error: BaseException) -> bool:
    return isinstance(error, StorageError) and error.transient


def was_retried(error: BaseException) -> bool:
    """True for an error a backend already retried under the policy until it gave up."""
    return bool(getattr(error, RETRIED_MARK, False))


def should_retry_again(error: BaseException) -> bool:
    """For a layer above the backends: transient, and not already retried below."""
    return is_transient(error) and not was_retried(error)


class _BackoffHonouringRetryAfter(tenacity.wait.wait_base):
    """Exponential backoff with jitter; never shorter than the Retry-After the failed try carried."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.backoff = tenacity.wait_exponential(multiplier=policy.initial_s, max=policy.max_s) + tenacity.wait_random(
            0, policy.jitter_s
        )

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        wait = self.backoff(retry_state)
        error = retry_state.outcome.exception() if retry_state.outcome else None
        after = getattr(error, RETRY_AFTER_ATTR, None)
        if isinstance(after, (int, float)) and after > 0:
            wait = max(wait, min(float(after), self.policy.max_retry_after_s))
        return wait


def call_with_retry(
    operation: Callable[[], T],
    *,
    policy: RetryPolicy,
    clock: Clock,
    retry_if: Callable[[BaseException], bool] = is_transient,
    on_retry: Callable[[BaseException, int, float], None] | None = None,
) -> T:
    """Run `operation`, retrying errors `retry_if` accepts under `policy`; re-raise the last one marked retried.

    `on_retry(error, next_attempt_number, wait_s)` is called before each wait (for a log line or an event).
    """

    def before_sleep(state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        if on_retry is not None and error is not None:
            on_retry(error, state.attempt_number + 1, wait)

    started = clock.monotonic()
    until = _deadline.get()
    stopped_by_deadline = {"yes": False}

    def out_of_time(state: tenacity.RetryCallState) -> bool:
        if until is not None and clock.monotonic() + state.upcoming_sleep > until:
            stopped_by_deadline["yes"] = True
            return True
        return clock.monotonic() - started >= policy.max_total_s

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(policy.attempts) | out_of_time,
        wait=_BackoffHonouringRetryAfter(policy),
        retry=tenacity.retry_if_exception(retry_if),
        sleep=clock.sleep,
        before_sleep=before_sleep,
        reraise=True,
    )
    attempts = 0
    try:
        for attempt in retrying:
            with attempt:
                attempts += 1
                return operation()
    except BaseException as error:
        if (attempts > 1 or stopped_by_deadline["yes"]) and retry_if(error):
            setattr(error, RETRIED_MARK, True)
        if stopped_by_deadline["yes"]:
            setattr(error, DEADLINE_MARK, True)
        raise
    raise AssertionError("unreachable: tenacity either returns or raises")
