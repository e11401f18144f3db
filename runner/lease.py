"""One writer per run: a lease in RUN/lease.json with a heartbeat.

Owns: the protocol of acquiring, renewing (the `Heartbeat` thread) and releasing the lease, and the
fence. The record in lease.json and the judgement of its holder's life are runner.leaserecord's. A
session holds the lease while it trains; another session refuses to start (LeaseHeld) while the
holder's heartbeat is fresher than `timeout_s`, unless told to take over.

Where the storage offers compare-and-swap (`update_if_unchanged`: the Hugging Face
Hub, whose commits can require a parent), acquiring, renewing and releasing are
swaps, and two sessions can never both hold the lease. Other storage offers no
compare-and-swap (Drive, a mounted folder), so the protection
is write, settle, read back: a contender writes its own random token, waits
`settle_s`, and wins only if the token it reads back is still its own. Two
sessions that both read "free" and both write see the same last writer after
the settle and exactly one proceeds. The limit: a contender whose read-to-write
gap is longer than `settle_s` (or a backend whose reads lag writes by more than
that) can still overwrite a winner; the winner then finds a foreign token at
its next write (the fence below) or heartbeat and stops with LeaseLost, so it
writes at most the one file whose check had already passed. Heartbeat ages use wall
clocks of different machines; timeout_s (minutes) dwarfs their usual skew.

Fencing: a session that is no longer the holder writes nothing more. `assert_held()` is asked right
before every write that matters (runner.storage.fenced wraps the session's storage with it): on a
store without compare-and-swap it reads lease.json and compares the token; the window that remains
is the time between that read and the write (docs/storage.md). On the Hub the write itself is
conditional (`HubStorage.fence`): every commit names as parent a head at which lease.json was ours,
so a takeover makes the old holder's next commit fail with LeaseLost, whatever the timing.

The heartbeat outranks retries: each beat runs under a deadline (runner.storage.retry.deadline) at
the moment the lease would lapse, less a guard; a beat that cannot land by then ends the session
(LeaseLapsed, exit 75) before another session may take the run, instead of training unleased.

The heartbeat runs on a small daemon thread (`Heartbeat`) from the moment
the lease is acquired until it is released, whatever the process is doing
(downloads, building the latent cache, compiling, training): a long setup never
lets the lease age into "dead". A heartbeat that finds the lease taken records
it; the session asks `check()` between steps and stops.

Must not: decide what a session does when it loses the lease (the session
stops); touch checkpoints.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
from collections.abc import Callable
from dataclasses import asdict

from runner.clock import Clock, iso
from runner.errors import LeaseHeld, LeaseLapsed, LeaseLost, StorageError
from runner.leaserecord import DEFAULT_TIMEOUT_S, LEASE_FILE, LeaseRecord, parse_lease, read_lease
from runner.storage import CompareAndSwap, Storage, capability
from runner.storage.blobs import read_bytes, write_bytes
from runner.storage.retry import deadline

log = logging.getLogger(__name__)


class Heartbeat:
    """Calls `beat` every `every_s` seconds on a daemon thread until `stop()`.

    `wait(seconds) -> bool` waits for the next beat and returns True once stopped (default: a
    threading.Event's wait, so stop() ends the wait at once); tests inject their own. A LeaseHeld
    from `beat` ends the thread and is kept in `lost`; other storage errors are logged and retried
    at the next beat (a missed beat or two is within the lease's timeout)."""

    def __init__(
        self,
        beat: Callable[[], None],
        every_s: float,
        *,
        wait: Callable[[float], bool] | None = None,
        time_left: Callable[[], float] | None = None,
    ):
        self.beat, self.every_s = beat, every_s
        self.time_left = time_left or (lambda: float("inf"))  # seconds until the lease would lapse
        self._stopped = threading.Event()
        self._wait = wait or self._stopped.wait
        self.lost: LeaseHeld | LeaseLapsed | None = None
        self.beats = 0
        self._thread = threading.Thread(target=self._run, name="relay-lease-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=30.0)

    def _run(self) -> None:
        wait_s = self.every_s
        while not self._wait(wait_s) and not self._stopped.is_set():
            try:
                self.beat()
                self.beats += 1
                wait_s = self.every_s
            except LeaseHeld as exc:
                self.lost = exc
                log.error("lease lost: %s", exc)
                return
            except StorageError as exc:
                left = self.time_left()
                if left <= 0:
                    self.lost = LeaseLapsed(
                        f"the lease could not be renewed before it would lapse ({exc})",
                        hint="nothing more is written; run the same command again once the storage answers",
                    )
                    log.error("%s", self.lost)
                    return
                wait_s = min(self.every_s, max(left / 2, 1.0))  # try more often as the lapse nears
                log.warning("lease heartbeat failed (%s); trying again in %.0f s (%.0f s left)", exc, wait_s, left)


class Lease:
    """The lease of one run for one holder.

    Acquire and release are called from the session's thread; between them only the heartbeat thread
    writes the lease (`start_heartbeat`), and release stops that thread before it deletes the lease."""

    def __init__(
        self,
        storage: Storage,
        run: str,
        holder: str,
        *,
        clock: Clock,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        settle_s: float = 2.0,
    ) -> None:
        self.storage = storage
        self.run = run
        self.holder = holder
        self.clock = clock
        self.timeout_s = timeout_s  # a heartbeat older than this means the holder is dead
        self.settle_s = settle_s  # wait between writing and reading back
        self.heartbeat_every_s = timeout_s / 3  # two missed beats still keep it
        self.guard_s = max(settle_s, timeout_s / 10)  # stop this long before others may call the lease dead
        self._renewed_at: float | None = None  # monotonic start of the last write that landed
        self._lost: LeaseHeld | None = None  # set when a fenced write found the lease taken
        self._token: str | None = None
        self._since = ""
        self._heartbeat: Heartbeat | None = None

    @property
    def key(self) -> str:
        return f"{self.run}/{LEASE_FILE}"

    def acquire(self, take_over: bool = False) -> LeaseRecord:
        """Take the lease or raise LeaseHeld naming the live holder (also when another contender won)."""
        if _swaps(self.storage):
            return self._acquire_by_swap(take_over)
        current = read_lease(self.storage, self.run)
        now = self.clock.wall()
        if current is not None and current.token != self._token:
            age = current.age_s(now)
            if current.is_fresh(now) and not take_over:
                raise LeaseHeld(current.holder, current.since, age)
            why = "taking over as asked" if current.is_fresh(now) else f"its heartbeat is {age:.0f} s old"
            log.warning("taking the lease of %s from %s: %s", self.run, current.holder, why)
        token = secrets.token_hex(16)
        self._since = iso(now)
        started = self.clock.monotonic()
        self._write(token)
        self.clock.sleep(self.settle_s)
        back = read_lease(self.storage, self.run)
        if back is None or back.token != token:
            self._token = None
            if back is None:
                raise LeaseHeld("unknown (lease.json vanished while acquiring)", self._since, 0.0)
            raise LeaseHeld(back.holder, back.since, back.age_s(self.clock.wall()))
        self._token = token
        self._renewed_at = started
        log.info("lease of %s acquired by %s", self.run, self.holder)
        return back

    def heartbeat(self) -> None:
        """Renew the lease; LeaseHeld if another session has taken it (then this one must stop). Its retries
        never wait past the moment the lease would lapse (a StorageError then: the heartbeat thread decides)."""
        started = self.clock.monotonic()
        with deadline(self._valid_until()):
            if _swaps(self.storage):
                self._swap(self._still_ours)
            else:
                self._check_ours()
                self._write(self._token)
        self._renewed_at = started

    def time_left_s(self) -> float:
        """Seconds until this holder must stop: the lease's timeout since the last renewal, less `guard_s`."""
        until = self._valid_until()
        return float("inf") if until is None else until - self.clock.monotonic()

    def _valid_until(self) -> float | None:
        return None if self._renewed_at is None else self._renewed_at + self.timeout_s - self.guard_s

    def start_heartbeat(self, wait: Callable[[float], bool] | None = None) -> Heartbeat:
        """Renew the lease every `heartbeat_every_s` on a daemon thread until `release()`."""
        self._heartbeat = Heartbeat(self.heartbeat, self.heartbeat_every_s, wait=wait, time_left=self.time_left_s)
        self._heartbeat.start()
        return self._heartbeat

    @property
    def is_lost(self) -> bool:
        """Whether this session learnt that it may no longer write (taken over, or lapsed)."""
        if self._lost is not None or (self._heartbeat is not None and self._heartbeat.lost is not None):
            return True
        return self._token is not None and self.time_left_s() <= 0

    def check(self) -> None:
        """Raise what the heartbeat or a fenced write met, if anything: LeaseHeld/LeaseLost (another session
        took the run) or LeaseLapsed (the lease could not be renewed in time)."""
        if self._lost is not None:
            raise self._lost
        if self._heartbeat is not None and self._heartbeat.lost is not None:
            raise self._heartbeat.lost

    def assert_held(self) -> None:
        """The fence, asked right before each write that matters: raise LeaseLost when another session holds
        the lease now, LeaseLapsed when it may have lapsed. On a compare-and-swap store only the local state
        is checked here: the write itself is conditional (HubStorage.fence)."""
        self.check()
        if self._token is None:
            raise self._lose(LeaseLost("nobody (this session holds no lease)", "", 0.0))
        if self.time_left_s() <= 0:
            raise LeaseLapsed(
                "the lease was not renewed in time; this session writes nothing more",
                hint="run the same command again once the storage answers",
            )
        if not _swaps(self.storage):
            self._fence_check(read_bytes(self.storage, self.key))

    def _fence_check(self, raw: bytes | None) -> None:
        """Raise LeaseLost unless `raw` (lease.json's content) is our lease."""
        current = parse_lease(raw, f"{self.storage.url}/{self.key}")
        if current is None or current.token != self._token:
            holder = current.holder if current else "unknown (lease.json was removed by someone else)"
            age = current.age_s(self.clock.wall()) if current else 0.0
            raise self._lose(LeaseLost(holder, current.since if current else self._since, age))

    def _lose(self, error: LeaseLost) -> LeaseLost:
        self._lost = self._lost or error
        log.error("lease lost: %s", error)
        return error

    def release(self) -> str | None:
        """Stop the heartbeat; delete the lease if it is still ours; leave another holder's lease alone.
        Returns why the lease was left in place, or None when it was released (or was not ours to release)."""
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
        swaps = capability(self.storage, CompareAndSwap)
        if swaps is not None:
            swaps.fence(self.key, None)  # the release commit removes our lease: no later commit is ours to fence
        if self._token is None or self._lost is not None:
            self._token = None
            return None
        try:
            if swaps is not None:
                self._release_by_swap()
            else:
                self._release_by_token()
        except StorageError as exc:  # the run is safe; only the next session's start is delayed
            why = (f"the lease of {self.run} was not released ({exc}); the next session takes it once its "
                   f"heartbeat is {self.timeout_s:.0f} s old, or at once with --take-over")  # fmt: skip
            log.warning("%s", why)
            return why
        finally:
            self._token = None
        return None

    def _release_by_token(self) -> None:
        current = read_lease(self.storage, self.run)
        if current is not None and current.token == self._token:
            self.storage.delete(self.key)
            log.info("lease of %s released by %s", self.run, self.holder)
        else:
            log.warning("lease of %s is no longer ours at release; left as is", self.run)

    def _check_ours(self) -> None:
        if self._token is None:
            raise LeaseLost("nobody (this session never acquired the lease)", "", 0.0)
        current = read_lease(self.storage, self.run)
        if current is None:
            self._token = None
            raise LeaseLost("unknown (lease.json was removed by someone else)", self._since, 0.0)
        if current.token != self._token:
            self._token = None
            raise LeaseLost(current.holder, current.since, current.age_s(self.clock.wall()))

    def _write(self, token: str) -> None:
        write_bytes(self.storage, self.key, self._encode(token))

    def _encode(self, token: str) -> bytes:
        record = LeaseRecord(self.holder, token, self._since, self.clock.wall(), self.timeout_s)
        data = {**asdict(record), "heartbeat": iso(record.heartbeat_wall)}
        return json.dumps(data, indent=2).encode()

    # ---- compare-and-swap, where the storage offers it (the Hub: a commit with parent_commit) ----------
    # The backend reads lease.json at a revision, asks `decide`, and writes only if nothing was committed
    # since; otherwise it reads and asks again. Two contenders can never both win, and no settle wait is needed.

    def _swap(self, decide: Callable[[LeaseRecord | None], str | None]) -> None:
        """Write our record with token decide(current) (None: delete it); decide raises LeaseHeld to refuse."""

        def to_bytes(raw: bytes | None) -> bytes | None:
            token = decide(parse_lease(raw, f"{self.storage.url}/{self.key}"))
            return None if token is None else self._encode(token)

        self.storage.update_if_unchanged(self.key, to_bytes)  # type: ignore[attr-defined]

    def _acquire_by_swap(self, take_over: bool) -> LeaseRecord:
        token = secrets.token_hex(16)

        def decide(current: LeaseRecord | None) -> str:
            now = self.clock.wall()
            if current is not None and current.token != self._token:
                age = current.age_s(now)
                if current.is_fresh(now) and not take_over:
                    raise LeaseHeld(current.holder, current.since, age)
                log.warning("taking the lease of %s from %s (heartbeat %.0f s old)", self.run, current.holder, age)
            self._since = iso(now)
            return token

        started = self.clock.monotonic()
        self._swap(decide)
        self._token = token
        self._renewed_at = started
        # from now on every commit is conditional on a head where the lease is ours (only a swapping store gets here)
        capability(self.storage, CompareAndSwap).fence(self.key, self._fence_check)
        log.info("lease of %s acquired by %s (compare-and-swap)", self.run, self.holder)
        return LeaseRecord(self.holder, token, self._since, self.clock.wall(), self.timeout_s)

    def _still_ours(self, current: LeaseRecord | None) -> str:
        if self._token is None:
            raise LeaseLost("nobody (this session never acquired the lease)", "", 0.0)
        if current is None or current.token != self._token:
            self._token = None
            if current is None:
                raise LeaseLost("unknown (lease.json was removed by someone else)", self._since, 0.0)
            raise LeaseLost(current.holder, current.since, current.age_s(self.clock.wall()))
        return current.token

    def _release_by_swap(self) -> None:
        try:
            self._swap(lambda current: self._still_ours(current) and None)
            log.info("lease of %s released by %s", self.run, self.holder)
        except LeaseHeld:
            log.warning("lease of %s is no longer ours at release; left as is", self.run)


def _swaps(storage: Storage) -> bool:
    """Whether `storage` offers compare-and-swap (update_if_unchanged); else write, settle, read back."""
    return capability(storage, CompareAndSwap) is not None
