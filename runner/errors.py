"""The RelayError hierarchy and the process exit codes.

Owns: every error a user can see, each with structured fields so callers can
act on it (retry a transient storage error, name the differing fields of a
resume mismatch) and a message that says what to do. Imports nothing of Relay.
"""

from __future__ import annotations

EXIT_OK = 0  # target reached, final LoRA written
EXIT_ERROR = 1  # something must be fixed before running again
EXIT_USAGE = 2  # bad command line or bad input
EXIT_PREEMPTED = 75  # session budget spent or interrupted: run the same command again (EX_TEMPFAIL)
# refused, never restarted by itself: another session holds the run (at the start, or it took the run over and this
# one stopped without writing), or the store refused the credentials. Wait for it, or fix the credentials.
EXIT_REFUSED = 3
EXIT_KEYBOARD = 130  # Ctrl-C reached the command line before a session could stop cleanly (128 + SIGINT)


class RelayError(Exception):
    """Base of every error Relay raises on purpose. `str()` is the user-facing message."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  → {self.hint}" if self.hint else self.message


class ProfileError(RelayError):
    """A profile file or an override is invalid. Names the file (or the flag), the key and what is allowed."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, *, path: str = "", key: str = "", hint: str = "") -> None:
        where = ": ".join(p for p in (path, key) if p)
        super().__init__(f"{where}: {message}" if where else message, hint=hint)
        self.path = path
        self.key = key
        self.detail = message  # what is wrong, without where

    def blamed_on(self, path: str) -> ProfileError:
        """The same error, naming `path` (a flag such as "--hours 0.5") as where the value came from."""
        return ProfileError(self.detail, path=path, key=self.key, hint=self.hint)


class UsageError(RelayError):
    """Bad command-line input (unknown profile, bad storage URL, …)."""

    exit_code = EXIT_USAGE


class DataError(RelayError):
    """The dataset cannot be used: empty, missing column, too many unreadable images. Bad input: exit 2."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, *, source: str = "", hint: str = "") -> None:
        super().__init__(f"{source}: {message}" if source else message, hint=hint)
        self.source = source


class ModelError(RelayError):
    """The base model or VAE cannot be loaded."""


class StorageError(RelayError):
    """A storage operation failed. `transient` errors are retried; others fail at once."""

    def __init__(self, message: str, *, key: str = "", transient: bool = False, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.key = key
        self.transient = transient


class StorageLocationError(StorageError):
    """The --storage location itself cannot be used (a folder that cannot be created): bad input, exit 2."""

    exit_code = EXIT_USAGE


class CredentialsError(StorageError):
    """Missing or invalid storage credentials: a refusal (exit 3), never retried or restarted by itself.
    The message never contains the secret."""

    exit_code = EXIT_REFUSED


class CheckpointCorrupt(RelayError):
    """A committed checkpoint (or cache) whose files do not match its COMMIT.json."""

    def __init__(self, message: str, *, path: str = "") -> None:
        super().__init__(message)
        self.path = path


class ResumeMismatch(RelayError):
    """The stored run was trained with different settings that change the result."""

    exit_code = EXIT_USAGE

    def __init__(self, fields: dict[str, tuple[object, object]]) -> None:
        lines = "\n".join(f"  {name}: stored {old!r}, now {new!r}" for name, (old, new) in sorted(fields.items()))
        super().__init__(
            f"this run was started with different settings that change the trained weights:\n{lines}",
            hint="use the stored settings, start a new run with --run NAME, or pass --force to continue anyway",
        )
        self.fields = fields


class LeaseHeld(RelayError):
    """Another live session holds the run's lease: a refusal (exit 3)."""

    exit_code = EXIT_REFUSED

    def __init__(self, holder: str, since: str, heartbeat_age_s: float) -> None:
        super().__init__(
            f"another session is training this run: {holder}, since {since} "
            f"(last heartbeat {heartbeat_age_s:.0f} s ago)",
            hint="wait for it to stop, or pass --take-over if that session is dead",
        )
        self.holder = holder
        self.since = since
        self.heartbeat_age_s = heartbeat_age_s


class LeaseLost(LeaseHeld):
    """This session held the lease and another session has taken it since: it stops and writes nothing more."""


class LeaseLapsed(RelayError):
    """The heartbeat could not renew the lease before it would lapse (the store refused or did not answer).
    The session stops before anyone could take the run over; run the same command again."""

    exit_code = EXIT_PREEMPTED


class OutOfMemory(RelayError):
    """No training plan fits the GPU's free memory."""


class TrainingDiverged(RelayError):
    """Too many non-finite losses in a row."""


class Interrupted(RelayError):
    """The session was asked to stop (signal) or ran out of time; work was committed."""

    exit_code = EXIT_PREEMPTED


def exit_code_for(exc: BaseException) -> int:
    """The one rule from a failure to the process exit code; the CLI returns it and the dashboard prints it.

    A RelayError carries its own code; Ctrl-C that escapes a session is 130; anything unexpected is 1."""
    if isinstance(exc, RelayError):
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_KEYBOARD
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    return EXIT_ERROR


def end_reason_for(exc: BaseException) -> str:
    """How a session that failed with `exc` ended, in a word or two, for the dashboard's "ended" line."""
    if isinstance(exc, LeaseLost):
        return "stopped: another session took the run"
    if isinstance(exc, LeaseLapsed):
        return "stopped: the lease could not be renewed"
    if isinstance(exc, LeaseHeld):
        return "refused: another session holds the lease"
    if isinstance(exc, ResumeMismatch):
        return "refused: settings differ from the stored run"
    if isinstance(exc, (Interrupted, KeyboardInterrupt)):
        return "interrupted"
    if exit_code_for(exc) == EXIT_USAGE:
        return "bad input"
    return "error"
