"""The one retry policy for every storage backend (Drive API, Hugging Face Hub) and the checkpoint layer.

Owns: `RetryPolicy` (exponential backoff with jitter, bounded in attempts and in total
time, honouring a server's Retry-After) and `call_with_retry`, which runs one operation
under it with an injected clock, so tests record the waits instead of sleeping.

One operation is retried at one layer only. A backend retries each of its calls; when
the policy gives up it marks the error (`was_retried`), and the layer above (the
checkpoint manager's whole-commit retry) does not retry that error again. Before this
module, Drive's 8 attempts sat inside the manager's 5: up to 40 tries and ~40 minutes
for one dead network (issue 20).

Must not: decide what is transient (the backend says so with StorageError.transient);
sleep or read time except through the Clock it is given.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
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

    def out_of_time(state: tenacity.RetryCallState) -> bool:
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
        if attempts > 1 and retry_if(error):
            setattr(error, RETRIED_MARK, True)
        raise
    raise AssertionError("unreachable: tenacity either returns or raises")
