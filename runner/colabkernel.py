"""What the notebook cell asks of Colab's frontend, in the kernel, beyond one call: secrets that do not come
in time, and the Drive mount that can be mounted once per runtime.

Owns: `asking_twice` (a secret Colab does not hand over within userdata.get's 10 s, or answers with an
error, is asked for once more, visibly), `mount_drive` / `flush_drive` (flush_and_unmount is the mount's
only flush; after it Colab cannot mount Drive again in that runtime, colabtools #4773, and mount_drive
says what to do). The facts and their sources: docs/platforms.md, "What the stand-ins now reproduce of
Colab's Drive mount and secrets". Must not: import google.colab at module level, or print a secret.
"""

from __future__ import annotations

from collections.abc import Callable

from runner.errors import UsageError


def asking_twice(lookup: Callable[[str], str | None]) -> Callable[[str], str | None]:
    """Colab's `userdata.get` waits 10 s for the frontend, then raises TimeoutException; a frontend error is a
    MessageError (colabtools google/colab/userdata.py, _message.py). Such a secret is asked for once more,
    saying so, and a second failure is said too (the run goes on without it). Any other answer is read by
    `lookup` (credentials.colab_secret) as usual, from the same one request."""

    def ask(name: str) -> str | None:
        try:
            from google.colab import userdata  # type: ignore[import-not-found]
        except ImportError:
            return None
        for attempt in (1, 2):
            try:
                answer: object = userdata.get(name)
            except Exception as exc:  # noqa: BLE001 - classified below, or by `lookup`
                if type(exc).__name__ not in ("TimeoutException", "MessageError"):
                    answer = exc
                elif attempt == 1:
                    print(f"relay: Colab did not hand over the secret {name} ({type(exc).__name__}); asking once "
                          "more: keep this tab in front and allow access if Colab asks")  # fmt: skip
                    continue
                else:
                    print(f"relay: Colab did not hand over the secret {name} twice ({type(exc).__name__}); going "
                          "on without it: run this cell again to retry")  # fmt: skip
                    return None
            return _replayed(userdata, lookup, name, answer)
        return None

    return ask


def _replayed(userdata, lookup: Callable[[str], str | None], name: str, answer: object) -> str | None:
    """`lookup(name)` reading `answer` (a value, or the exception userdata.get raised) instead of asking again."""

    def get(_key: str):
        if isinstance(answer, BaseException):
            raise answer
        return answer

    original = userdata.get
    userdata.get = get
    try:
        return lookup(name)
    finally:
        userdata.get = original


def mount_drive(mount_point: str) -> None:
    """Mount Drive in the kernel. Once this runtime has flushed and unmounted it, Colab cannot mount it again
    (colabtools #4773: `ValueError: mount failed`); say what to do instead of a traceback."""
    from google.colab import drive  # type: ignore[import-not-found]

    try:
        drive.mount(mount_point)
    except ValueError as exc:
        if mount_point not in _UNMOUNTED:
            raise
        raise UsageError(
            f"Google Drive cannot be mounted again in this runtime ({exc}): Relay flushed and unmounted it when "
            "the last run here ended, and Colab mounts it once per runtime (colabtools #4773)",
            hint="choose Runtime → Disconnect and delete runtime, then run this cell again",
        ) from None


_UNMOUNTED: set[str] = set()
"""Mount points this kernel has flushed and unmounted (a remount fails until the runtime is new)."""


def flush_drive(mount_point: str) -> None:
    """Push the mount's pending writes to Drive and unmount it (colabtools drive.py: `flush_and_unmount` is the
    only flush it offers); in the kernel, after everything that reads the mount."""
    from google.colab import drive  # type: ignore[import-not-found]

    drive.flush_and_unmount()
    _UNMOUNTED.add(mount_point)
