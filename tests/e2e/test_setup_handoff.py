"""The setup phase (issue 14, item 5b): no rank waits in a collective while rank 0 builds the latent cache,
and the cache is committed in pieces, so a first session killed while building it does not start over.

On 2×T4 a first latent cache takes 20-40 minutes and NCCL's collectives time out after 10; here the same
happens in seconds: gloo with RELAY_COLLECTIVE_TIMEOUT_S=3 and RELAY_TEST_CACHE_DELAY_S before each piece.
(Before the handoff, rank 1 died in the barrier: "Timed out waiting 3000ms for recv operation".)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.e2e.conftest import REPO, RUN, relay_env, wait_for

# 130 records: the cache is built in 3 pieces of at most 64 (runner.train.cache.PIECE_RECORDS)
SETTINGS = ("data.generated_count=130", "data.validation_count=0", "train.resolution=32", "sample.inference_steps=1",
            "train.batch_size=1", "train.grad_accum=2", "train.steps=2")  # fmt: skip
PIECES = 3


def args(storage: Path, workdir: Path) -> list[str]:
    out = [sys.executable, "-m", "runner", "train", "--profile", "tiny", "--storage", str(storage),
           "--workdir", str(workdir), "--plain"]  # fmt: skip
    for item in SETTINGS:
        out += ["--set", item]
    return out


def piece_commits(storage: Path) -> dict[str, tuple[int, bytes]]:
    """Each committed piece of the stored cache: (mtime, bytes) of its COMMIT.json."""
    found = {}
    for path in (storage / RUN / "cache").glob("*/piece-*/COMMIT.json"):
        found[path.parent.name] = (path.stat().st_mtime_ns, path.read_bytes())
    return found


def test_ranks_wait_for_a_cache_build_longer_than_the_collective_timeout(tmp_path):
    env = relay_env({"RELAY_PROCESSES": "2", "OMP_NUM_THREADS": "1", "RELAY_COLLECTIVE_TIMEOUT_S": "3",
                     "RELAY_TEST_CACHE_DELAY_S": "2"})  # fmt: skip
    done = subprocess.run(args(tmp_path / "s", tmp_path / "w"), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Timed out" not in done.stdout + done.stderr
    assert len(piece_commits(tmp_path / "s")) == PIECES
    assert (tmp_path / "s" / RUN / "final" / "pytorch_lora_weights.safetensors").exists()


def test_a_session_killed_while_building_the_cache_keeps_the_committed_pieces(tmp_path):
    storage = tmp_path / "s"
    env = relay_env({"OMP_NUM_THREADS": "1", "RELAY_TEST_CACHE_DELAY_S": "3"})
    with open(tmp_path / "first.log", "wb") as log:
        first = subprocess.Popen(args(storage, tmp_path / "w1"), cwd=REPO, env=env, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            assert wait_for(lambda: len(piece_commits(storage)) >= 1 or first.poll() is not None, 240, 0.05)
        finally:
            os.killpg(first.pid, signal.SIGKILL)  # the VM dies mid-cache
            first.wait()
    kept = piece_commits(storage)
    assert 1 <= len(kept) < PIECES, f"the kill should come while the cache is being built: {sorted(kept)}"
    assert not list((storage / RUN / "cache").glob("*/COMMIT.json")), "the whole cache must not be committed yet"

    time.sleep(0.01)  # a rebuilt piece's COMMIT.json would get a later mtime
    # another VM (a fresh work folder): the committed pieces are downloaded, the others built
    second = subprocess.run(args(storage, tmp_path / "w2"), cwd=REPO, capture_output=True, text=True,
                            env=relay_env({"OMP_NUM_THREADS": "1"}), timeout=300)  # fmt: skip
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    after = piece_commits(storage)
    rebuilt = [name for name in after if after[name] != kept.get(name)]
    assert len(after) == PIECES and len(rebuilt) == PIECES - len(kept), (sorted(kept), rebuilt)
    assert all(after[name] == kept[name] for name in kept), "a committed piece was built again"
