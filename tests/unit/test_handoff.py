"""Setup handed from rank 0 to the other ranks through the work folder, and the latent cache in pieces:
a piece committed before a kill is never built again, and a waiting rank sits in no collective."""

from __future__ import annotations

import json

import pytest

from runner import events
from runner.checkpoint.store import FolderStore, ensure_latent_cache_in_pieces
from runner.handoff import Handoff, launch_id
from runner.storage.local import LocalStorage

RANGES = [(0, 2), (2, 4), (4, 5)]


def test_a_waiting_rank_polls_until_rank_0_marks_the_work_done(tmp_path):
    sleeps: list[float] = []
    leader = Handoff(tmp_path, "L")

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 3:
            leader.mark("latent-cache", "/work/run/cache/fp")

    follower = Handoff(tmp_path, "L", sleep=sleep, monotonic=lambda: float(len(sleeps)))
    assert follower.wait("latent-cache", poll_s=0.5) == "/work/run/cache/fp"
    assert sleeps == [0.5, 0.5, 0.5]
    assert not Handoff(tmp_path, "other launch").folder.exists()


def test_the_ranks_of_one_launch_share_an_id_that_names_the_rendezvous_port():
    assert launch_id({"MASTER_PORT": "29500"}).endswith("-29500")
    assert launch_id({"MASTER_PORT": "29500"}) != launch_id({"MASTER_PORT": "29501"})


class Killed(Exception):
    pass


def builder(built: list[int], *, die_at: int | None = None):
    def build(start: int, stop: int, folder) -> None:
        if start == die_at:
            raise Killed  # the VM dies while this piece is encoded
        built.append(start)
        (folder / "latents.bin").write_bytes(bytes(range(start, stop)))
        (folder / "index.json").write_text(json.dumps({"records": [start, stop]}))

    return build


def merge(local, pieces: list[str]) -> None:
    (local / "index.json").write_text(json.dumps(pieces))


def test_pieces_committed_before_a_kill_are_reused_by_the_next_session_on_another_vm(tmp_path):
    storage, bus = LocalStorage(tmp_path / "storage"), events.EventBus()
    first = FolderStore(storage, "run", tmp_path / "vm1")
    built: list[int] = []
    with pytest.raises(Killed):
        ensure_latent_cache_in_pieces(first, "fp", RANGES, builder(built, die_at=4), merge, bus)
    assert built == [0, 2] and not first.is_committed("cache/fp")
    assert first.is_committed("cache/fp/piece-00000") and first.is_committed("cache/fp/piece-00001")

    second = FolderStore(storage, "run", tmp_path / "vm2")
    built = []
    local, count = ensure_latent_cache_in_pieces(second, "fp", RANGES, builder(built), merge, bus)
    assert built == [4] and count == 1  # only the piece the kill interrupted
    assert (local / "piece-00000" / "latents.bin").read_bytes() == bytes([0, 1])
    assert json.loads((local / "index.json").read_text()) == ["piece-00000", "piece-00001", "piece-00002"]
    assert second.is_committed("cache/fp")

    third = FolderStore(storage, "run", tmp_path / "vm3")
    built = []
    assert ensure_latent_cache_in_pieces(third, "fp", RANGES, builder(built), merge, bus)[1] == 0 and not built
    assert (third.local("cache/fp") / "piece-00002" / "latents.bin").read_bytes() == bytes([4])


def test_a_piece_built_for_other_records_is_built_again(tmp_path):
    storage, bus = LocalStorage(tmp_path / "storage"), events.EventBus()
    store = FolderStore(storage, "run", tmp_path / "vm")
    with pytest.raises(Killed):
        ensure_latent_cache_in_pieces(store, "fp", [(0, 3), (3, 5)], builder([], die_at=3), merge, bus)
    built: list[int] = []
    ensure_latent_cache_in_pieces(store, "fp", RANGES, builder(built), merge, bus)
    assert built == [0, 2, 4]


def test_a_piece_half_written_by_a_killed_builder_in_the_same_work_folder_is_built_again(tmp_path):
    storage, bus = LocalStorage(tmp_path / "storage"), events.EventBus()
    store = FolderStore(storage, "run", tmp_path / "vm")

    def dies_mid_piece(start: int, stop: int, folder) -> None:
        if start == 2:  # one file of the piece is written, then the process dies
            (folder / "latents.bin").write_bytes(b"half")
            raise Killed
        builder([])(start, stop, folder)

    with pytest.raises(Killed):
        ensure_latent_cache_in_pieces(store, "fp", RANGES, dies_mid_piece, merge, bus)
    half = store.local("cache/fp/piece-00001")
    assert (half / "latents.bin").read_bytes() == b"half" and not store.is_committed("cache/fp/piece-00001")

    built: list[int] = []
    local, count = ensure_latent_cache_in_pieces(store, "fp", RANGES, builder(built), merge, bus)
    assert built == [2, 4] and count == 2  # the half piece is encoded again, the whole one is reused
    assert (local / "piece-00001" / "latents.bin").read_bytes() == bytes([2, 3])
    assert (local / "piece-00001" / "index.json").is_file()
    assert store.is_committed("cache/fp/piece-00001") and store.is_committed("cache/fp")
