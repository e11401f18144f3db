"""The optional storage capabilities are declared once (runner.storage) and found through wrappers: the Hub's
atomic folders and compare-and-swap, the Colab mount's late write-back, nothing more on a plain folder or Drive."""

from __future__ import annotations

import pytest

from runner.storage import AtomicFolders, CompareAndSwap, WritesBackLate, capability
from runner.storage.colab import ColabDriveStorage
from runner.storage.fenced import FencedStorage
from runner.storage.gdrive import DriveStorage
from runner.storage.hub import HubStorage
from runner.storage.local import LocalStorage

KINDS = (AtomicFolders, CompareAndSwap, WritesBackLate)


def offered(storage) -> set[type]:
    return {kind for kind in KINDS if capability(storage, kind) is not None}


@pytest.mark.parametrize(
    ("backend", "expected"),
    [
        (HubStorage, {AtomicFolders, CompareAndSwap}),
        (ColabDriveStorage, {WritesBackLate}),
        (DriveStorage, set()),
        (LocalStorage, set()),
    ],
)
def test_each_backend_offers_what_it_can_do_also_behind_the_fence(backend, expected):
    store = object.__new__(backend)  # the methods are what counts; no connection is made
    store.url = "test://"
    assert offered(store) == expected
    assert offered(FencedStorage(store, lambda: None)) == expected  # the session writes through the fence


def test_a_fenced_atomic_folder_commit_asks_the_lease_first(tmp_path):
    calls: list[str] = []

    class Atomic(LocalStorage):
        def commit_folder(self, local_dir, key_prefix, names):
            calls.append("commit")

        def delete_folder(self, key_prefix):
            calls.append("delete")

    fenced = FencedStorage(Atomic(tmp_path), lambda: calls.append("lease checked"))
    folders = capability(fenced, AtomicFolders)
    folders.commit_folder(tmp_path, "run/checkpoints/step-1", ["COMMIT.json"])
    folders.delete_folder("run/checkpoints/step-0")
    assert calls == ["lease checked", "commit", "lease checked", "delete"]
