"""Commits conditional on the Hub branch's head: compare-and-swap, and the lease's fence.

Owns: `FencedCommits`, the commits of runner.storage.hub once they depend on what the branch holds.
`update_if_unchanged` reads a key at the head H (from the commit listing, which a commit's parent is
checked against; repo info may lag behind it), decides, and commits with `parent_commit` H; when
another commit landed meanwhile (412) it reads and decides again, with jittered backoff between rounds.
While a session holds the run's lease (`fence`), every commit but the lease's own is conditional on a
head at which lease.json was ours: a 412 makes it read the real head and check the lease there again;
still ours, it commits on that head; taken, the check raises LeaseLost and nothing is written.

Must not: know what the check reads in lease.json (the lease decides); map keys to paths (the caller
passes both); retry a commit itself (runner.storage.hubcalls does, once per round).
"""

from __future__ import annotations

import logging
import random
import tempfile
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runner.clock import Clock
from runner.errors import StorageError
from runner.storage.hubcalls import CommitConflict, HubCalls
from runner.storage.hubwire import HubWire

log = logging.getLogger(__name__)

CAS_TRIES = 8  # compare-and-swap rounds before giving up (each lost round means another commit landed)
CAS_PAUSE_S = 0.5  # first pause between two compare-and-swap rounds, doubled each round, jittered ×0.5..1.5
Fence = Callable[[bytes | None], None]
"""Given lease.json's content at a head, raises unless the lease there is still ours."""


class FencedCommits:
    """The commits of one repo, conditional on its head where they must be. Thread-safe."""

    def __init__(self, calls: HubCalls, wire: HubWire, *, url: str, clock: Clock) -> None:
        self._calls = calls
        self._wire = wire
        self._url = url
        self._clock = clock
        self._lock = threading.Lock()
        self._fence: tuple[str, Fence] | None = None  # (lease path, check) while a session holds the lease
        self._fence_head: str | None = None  # a head at which the lease was ours: the parent of the next commit
        self._random = random.Random()

    def update_if_unchanged(self, path: str, key: str, decide: Callable[[bytes | None], bytes | None]) -> bytes | None:
        """Compare-and-swap on `key` (at `path` in the repo): read it at the branch head H, write
        decide(content) (None: delete) in a commit whose parent must be H. If another commit landed meanwhile
        (412), read again and decide again. `decide` may raise to refuse; returns what was written."""
        for round_ in range(CAS_TRIES):
            self._pause(round_)
            head, current = self._calls.run("read", key, lambda: self._read_at_head(path))
            new = decide(current)
            make = _update_operations(path, new)
            if new is None and current is None:
                return None
            try:
                self.commit(f"update {key}", key, make, parent=head)
                return new
            except CommitConflict:
                log.info("%s/%s changed while updating it; reading it again", self._url, key)
        raise StorageError(f"{self._url}/{key}: could not update it: the repo kept changing", key=key, transient=True)

    def fence(self, lease_path: str, lease_key: str, check: Fence) -> None:
        """From now on (until `unfence`) every commit without a parent of its own is conditional on a head at
        which `check(content of lease_path)` passes; `check` raises (LeaseLost) to refuse."""
        with self._lock:
            self._fence, self._fence_head = (lease_path, check), None
        try:
            self._confirm_fence(lease_key)
        except StorageError as exc:  # the next commit confirms it first; nothing goes unfenced meanwhile
            log.info("%s: the fence's head is not known yet (%s)", self._url, exc)

    def unfence(self) -> None:
        with self._lock:
            self._fence, self._fence_head = None, None

    def commit(
        self,
        what: str,
        key: str,
        operations: Callable[[Any], list],
        *,
        parent: str | None = None,
        missing_ok: bool = False,
    ) -> str:
        """One commit; while fenced and given no parent, conditional on a head where the lease is ours."""
        fence = self._fence
        if parent is not None or fence is None:
            return self._commit_once(what, key, operations, parent=parent, missing_ok=missing_ok)
        for round_ in range(CAS_TRIES):
            self._pause(round_)
            if self._fence_head is None:
                self._confirm_fence(key, fence)
            try:
                return self._commit_once(what, key, operations, parent=self._fence_head, missing_ok=missing_ok)
            except CommitConflict:
                log.info("%s: the branch moved before %s; checking the lease at the new head", self._url, what)
                self._confirm_fence(key, fence)
        raise StorageError(f"could not {what} {self._url}/{key}: the repo kept changing", key=key, transient=True)

    def _commit_once(
        self, what: str, key: str, operations: Callable[[Any], list], *, parent: str | None, missing_ok: bool
    ) -> str:
        commit_id = self._calls.commit(what, key, operations, parent=parent, missing_ok=missing_ok)
        with self._lock:
            if self._fence is not None and commit_id:
                self._fence_head = commit_id  # our own commit: the lease there is what it was at its parent
        return commit_id

    def _confirm_fence(self, key: str, fence: tuple[str, Fence] | None = None) -> None:
        """Read the real head and the lease there; the fence's check raises when it is not ours."""
        fence = fence or self._fence
        if fence is None:
            return
        path, check = fence
        head, current = self._calls.run("read", key, lambda: self._read_at_head(path))
        check(current)
        with self._lock:
            self._fence_head = head

    def _pause(self, round_: int) -> None:
        """Backoff with jitter between compare-and-swap rounds (none before the first)."""
        if round_:
            self._clock.sleep(CAS_PAUSE_S * 2 ** (round_ - 1) * self._random.uniform(0.5, 1.5))

    def _read_at_head(self, path: str) -> tuple[str, bytes | None]:
        """(head commit id, content of `path` at that commit or None). The head comes from the commit listing,
        which a commit's parent is checked against; repo info may lag behind it (a cached answer)."""
        head = self._wire.head()
        scratch = Path(tempfile.gettempdir()) / f"relay-hub-{uuid.uuid4().hex[:12]}"
        try:
            found = self._wire.download(path, scratch, revision=head)
            return head, scratch.read_bytes() if found else None
        finally:
            scratch.unlink(missing_ok=True)


def _update_operations(path: str, new: bytes | None) -> Callable[[Any], list]:
    """The operations that write `new` at `path` (None: delete it)."""
    if new is None:
        return lambda ops: [ops.Delete(path)]
    return lambda ops: [ops.Add(path, new)]
