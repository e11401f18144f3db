"""A Storage wrapper that injects faults, for tests.

Owns: failing chosen operations a set number of times (transient or permanent
StorageError), optionally only for keys containing a substring, and holding
puts at a gate so a test can observe what happens while an upload is in flight.
Records every call. Must not: sleep on its own or change the data it passes on.
"""

from __future__ import annotations

import threading
from pathlib import Path

from runner.errors import StorageError
from runner.storage import Storage


class FlakyStorage:
    """Delegates to `inner`; `fail_ops={"put": 2}` makes the next two matching puts fail."""

    def __init__(
        self,
        inner: Storage,
        *,
        fail_ops: dict[str, int] | None = None,
        transient: bool = True,
        key_contains: str = "",
        gate: threading.Event | None = None,
    ) -> None:
        self.inner = inner
        self.url = inner.url
        self.fail_ops = dict(fail_ops or {})
        self.transient = transient
        self.key_contains = key_contains  # only keys containing this fail ("" = all)
        self.gate = gate  # when given, put waits until it is set
        self.at_gate = threading.Event()  # set once a put is waiting at the gate
        self.calls: list[tuple[str, str]] = []
        self.failures = 0
        self._lock = threading.Lock()

    def heal(self) -> None:
        """Stop injecting faults."""
        with self._lock:
            self.fail_ops.clear()

    def _maybe_fail(self, op: str, key: str) -> None:
        with self._lock:
            self.calls.append((op, key))
            if self.fail_ops.get(op, 0) > 0 and self.key_contains in key:
                self.fail_ops[op] -= 1
                self.failures += 1
                raise StorageError(f"injected {op} failure on {key!r}", key=key, transient=self.transient)

    def put(self, local_file: Path, key: str) -> None:
        if self.gate is not None:
            self.at_gate.set()
            self.gate.wait()
        self._maybe_fail("put", key)
        self.inner.put(local_file, key)

    def get(self, key: str, local_file: Path) -> None:
        self._maybe_fail("get", key)
        self.inner.get(key, local_file)

    def list(self, prefix: str) -> list[str]:
        self._maybe_fail("list", prefix)
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self._maybe_fail("delete", key)
        self.inner.delete(key)

    def exists(self, key: str) -> bool:
        self._maybe_fail("exists", key)
        return self.inner.exists(key)
