"""Shared helpers of the end-to-end fault suite: run Relay, read what it wrote, compare LoRAs.

Owns: the short tiny-profile settings every e2e fault test trains with, starting `relay
train` as a subprocess (the realistic case for kills and signals) or in-process through
runner.cli.main (cheap: torch is imported once), the reference uninterrupted runs that
resumed runs must match bit for bit, readers for checkpoints and sessions.jsonl in a local
storage folder, and the reliability recorder with the hook that rewrites docs/reliability.md.
Must not: work around Relay bugs (a test that finds one fails and says so).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.reliability import ENV_WRITE, ReliabilityRecorder

REPO = Path(__file__).resolve().parents[2]
RUN = "tiny"  # the tiny profile's name, the default run name
RECORDER_KEY = pytest.StashKey[ReliabilityRecorder]()

# Short runs: one image a step, 32 px, a checkpoint after every step (every_min tiny, overhead
# unbounded), a one-step sample grid at the end. About 1-2 s a step on a loaded 2-core CI box.
FAST = (
    "data.generated_count=4",
    "data.validation_count=0",
    "train.batch_size=1",
    "train.grad_accum=1",
    "train.resolution=32",
    "sample.inference_steps=1",
    "checkpoint.every_min=0.001",
    "checkpoint.keep=2",
)
STEPS = 6  # the default (CI) runs' target


def train_args(
    storage: Path | str, workdir: Path, *, steps: int = STEPS, extra: tuple[str, ...] = (), flags: tuple[str, ...] = ()
) -> list[str]:
    """`relay train` arguments for a short tiny run; `extra` are --set items, `flags` more options."""
    args = ["train", "--profile", "tiny", "--storage", str(storage), "--workdir", str(workdir), "--plain", *flags]
    for item in (*FAST, f"train.steps={steps}", *extra):
        args += ["--set", item]
    return args


def relay_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HF_TOKEN", None)
    env.update(extra or {})
    return env


def start_relay(args: list[str], log_file: Path, *, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`python -m runner ARGS` in the background, stdout and stderr into log_file (read it while it runs)."""
    out = open(log_file, "ab")  # noqa: SIM115 - the child owns it; closed by wait_relay
    proc = subprocess.Popen([sys.executable, "-m", "runner", *args], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                            env=env or relay_env())  # fmt: skip
    proc._relay_log = out  # type: ignore[attr-defined]
    return proc


def wait_relay(proc: subprocess.Popen, timeout_s: float = 300) -> int:
    try:
        return proc.wait(timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc._relay_log.close()  # type: ignore[attr-defined]


def run_relay(
    args: list[str], *, env: dict[str, str] | None = None, timeout_s: float = 300
) -> subprocess.CompletedProcess:
    """Run Relay to the end in a subprocess; stdout and stderr captured separately."""
    return subprocess.run([sys.executable, "-m", "runner", *args], cwd=REPO, capture_output=True, text=True,
                          env=env or relay_env(), timeout=timeout_s)  # fmt: skip


def relay_main(args: list[str], *, contexts=None) -> int:
    """Relay's CLI in this process (exit code returned, output to the captured stdout/stderr). `contexts`:
    how `relay train` builds its sessions' contexts (on build_context: a wrapped storage, a listener)."""
    from runner.cli import main

    return main(args, contexts=contexts)


def send(proc: subprocess.Popen, sig: signal.Signals) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, sig)


# ---------------------------------------------------------------- reading what Relay wrote


def read_lora(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def assert_same_lora(got: Path, want: Path) -> None:
    """Every tensor bit-identical (torch.equal), same keys."""
    import torch

    a, b = read_lora(got), read_lora(want)
    assert sorted(a) == sorted(b), f"{got}: LoRA keys differ from {want}"
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different, f"{got}: {len(different)} of {len(a)} tensors differ from {want}, e.g. {different[:3]}"


def step_folders(run_dir: Path) -> dict[int, Path]:
    folders = {}
    for folder in (run_dir / "checkpoints").glob("step-*"):
        folders[int(folder.name.split("-")[1])] = folder
    return folders


def verified_steps(run_dir: Path) -> list[int]:
    """Checkpoint steps whose COMMIT.json exists and whose listed files all match it."""
    from runner.checkpoint.manifest import COMMIT, parse_manifest, verify_dir
    from runner.errors import CheckpointCorrupt

    good = []
    for step, folder in sorted(step_folders(run_dir).items()):
        try:
            manifest = parse_manifest((folder / COMMIT).read_bytes(), str(folder))
        except (OSError, CheckpointCorrupt):  # missing or invalid: not committed
            continue
        if not verify_dir(folder, manifest):
            good.append(step)
    return good


def broken_commits(run_dir: Path) -> list[int]:
    """Steps with a COMMIT.json whose files do not match it (must always be empty)."""
    from runner.checkpoint.manifest import COMMIT

    return [s for s, f in step_folders(run_dir).items() if (f / COMMIT).exists() and s not in verified_steps(run_dir)]


def sessions(run_dir: Path) -> list[dict]:
    path = run_dir / "sessions.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- reference runs


@dataclass(frozen=True)
class Reference:
    """An uninterrupted run: its storage and workdir, and where its final and last-checkpoint LoRAs are."""

    storage: Path
    workdir: Path
    steps: int

    @property
    def run_dir(self) -> Path:
        return self.storage / RUN

    @property
    def final_lora(self) -> Path:
        return self.run_dir / "final" / "pytorch_lora_weights.safetensors"

    @property
    def last_lora(self) -> Path:
        return self.run_dir / "checkpoints" / f"step-{self.steps:08d}" / "lora.safetensors"

    def copy_storage(self, dest: Path, *, drop: tuple[str, ...] = ("final", "lease.json")) -> Path:
        """A copy of the reference storage without `drop` (paths under the run)."""
        shutil.copytree(self.storage, dest)
        for name in drop:
            target = dest / RUN / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
        return dest

    def seed_workdir(self, dest: Path) -> Path:
        """A fresh workdir holding only the reference's verified latent cache (saves building it again)."""
        shutil.copytree(self.workdir / RUN / "cache", dest / RUN / "cache")
        return dest


@pytest.fixture(scope="session")
def reference_factory(tmp_path_factory):
    """reference(steps) → the uninterrupted run of that length (subprocess, run once per session)."""
    made: dict[int, Reference] = {}

    def make(steps: int = STEPS) -> Reference:
        if steps not in made:
            root = tmp_path_factory.mktemp(f"reference-{steps}")
            ref = Reference(root / "storage", root / "work", steps)
            # In-process, a checkpoint after every step, all kept: fault tests start from copies of
            # this storage cut back to any step. (When checkpoints are taken changes no weight.)
            args = train_args(ref.storage, ref.workdir, steps=steps, extra=(f"checkpoint.keep={steps + 1}",))
            with pytest.MonkeyPatch.context() as patch:
                checkpoint_every_step(patch, wait_uploads=True)
                code = relay_main(args)
            assert code == 0, "the reference run failed (see the captured output)"
            assert len(list((ref.run_dir / "checkpoints").iterdir())) == steps
            assert ref.final_lora.exists() and ref.last_lora.exists()
            made[steps] = ref
        return made[steps]

    return make


def checkpoint_every_step(patch: pytest.MonkeyPatch, *, wait_uploads: bool = False) -> None:
    """Make in-process sessions checkpoint after every step (the budget would space them by cost).

    A checkpoint still waiting when the next one is submitted is superseded (by design), so on a
    slow machine some steps would have none; `wait_uploads` makes each submit wait for its upload.
    """
    from runner import budget
    from runner.checkpoint.manager import CheckpointManager

    patch.setattr(budget, "should_checkpoint", lambda ctx: not budget.should_stop(ctx))
    if wait_uploads:
        submit = CheckpointManager.submit

        def submit_and_wait(self, staged):
            submit(self, staged)
            self.wait()

        patch.setattr(CheckpointManager, "submit", submit_and_wait)


@pytest.fixture
def every_step(monkeypatch) -> None:
    checkpoint_every_step(monkeypatch, wait_uploads=True)


@pytest.fixture(scope="session")
def reference(reference_factory) -> Reference:
    return reference_factory(STEPS)


# ---------------------------------------------------------------- the reliability table


@pytest.fixture
def reliability(request) -> ReliabilityRecorder:
    config = request.config
    if RECORDER_KEY not in config.stash:
        config.stash[RECORDER_KEY] = ReliabilityRecorder()
    return config.stash[RECORDER_KEY]


def pytest_sessionfinish(session, exitstatus) -> None:
    recorder = session.config.stash.get(RECORDER_KEY, None)
    if os.environ.get(ENV_WRITE) != "1" or recorder is None or not recorder.rows:
        return
    failed = session.testsfailed
    outcome = f"{session.testscollected} tests collected, {failed} failed (exit status {int(exitstatus)})"
    command = "RELAY_WRITE_RELIABILITY=1 python3 -m pytest " + shlex.join(sys.argv[1:])
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    recorder.write(REPO / "docs" / "reliability.md", command=command, date=date, outcome=outcome)


def wait_for(predicate, timeout_s: float, poll_s: float = 0.005) -> bool:
    """Poll `predicate` until true or timeout; True if it became true."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(poll_s)
    return False
