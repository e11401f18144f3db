"""Faults inside a session: a crashing step, a full disk, storage errors, corrupt files, a second writer.

Most scenarios run Relay's CLI in this process (runner.cli.main: torch is imported once) on a
copy of a reference run's storage, cut back to an earlier checkpoint, so each costs a step or
two. Storage faults wrap the session's storage (FlakyStorage from tests/flaky.py, or the fake
Drive server failing every few requests); crashes and a full disk patch the trainer. Each
scenario must end as designed: the same final LoRA as the uninterrupted reference, bit for
bit, or a clear error (no traceback) with every earlier checkpoint still verified and no
COMMIT.json vouching for a half-written folder.
"""

from __future__ import annotations

import errno
import json
import shutil
import time
from pathlib import Path

import pytest

from runner import events
from runner.checkpoint.manifest import parse_manifest, verify_dir
from runner.errors import EXIT_REFUSED
from tests.e2e.conftest import (
    RUN,
    Reference,
    assert_same_lora,
    broken_commits,
    checkpoint_every_step,
    relay_env,
    relay_main,
    start_relay,
    train_args,
    verified_steps,
    wait_for,
    wait_relay,
)
from tests.flaky import FlakyStorage


@pytest.fixture(autouse=True)
def _every_step(request, monkeypatch):
    """Every scenario here checkpoints after each step, so the fault lands where the test says; each
    submit waits for its upload, unless the test asks for `uploads_overlap` (training goes on meanwhile)."""
    checkpoint_every_step(monkeypatch, wait_uploads="uploads_overlap" not in request.fixturenames)


@pytest.fixture
def uploads_overlap() -> None:
    """Checkpoints are written and uploaded in the background while the next steps train, as in production."""


@pytest.fixture
def session_hooks():
    """Events of in-process sessions, and a way to wrap their storage: hooks.wrap = fn(storage) → storage.
    `relay_main(args, contexts=hooks.build_context)` builds the sessions' contexts with them."""
    from runner.context import build_context as real_build

    class Hooks:
        events: list[events.Event] = []
        wrap = None
        contexts: list = []
        subscribers: list = []

        @staticmethod
        def build_context(opts, **kwargs):
            ctx = real_build(opts, **kwargs)
            if Hooks.wrap is not None:
                ctx.storage = Hooks.wrap(ctx.storage)
            ctx.bus.subscribe(Hooks.events.append)
            for fn in Hooks.subscribers:
                ctx.bus.subscribe(fn)
            Hooks.contexts.append(ctx)
            return ctx

    Hooks.events = []
    Hooks.contexts = []
    Hooks.subscribers = []
    return Hooks


def cut_back(ref: Reference, dest: Path, *, keep_steps: tuple[int, ...]) -> Path:
    """A copy of the reference storage holding only the checkpoints `keep_steps` (no final/, no lease)."""
    storage = ref.copy_storage(dest)
    for folder in (storage / RUN / "checkpoints").iterdir():
        if int(folder.name.split("-")[1]) not in keep_steps:
            shutil.rmtree(folder)
    return storage


def final_of(storage: Path) -> Path:
    return storage / RUN / "final" / "pytorch_lora_weights.safetensors"


def warnings_of(hooks, kind: str) -> list[str]:
    return [e.message for e in hooks.events if isinstance(e, events.Warning) and e.kind == kind]


def flip_byte(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------- crashes and a full disk


def _raise_at(step_to_fail: int, exc: BaseException):
    """A Trainer.step wrapper that raises `exc` once, at step `step_to_fail`."""
    state = {"raised": False}

    def wrap(real):
        def method(self, step, *args, **kwargs):
            if not state["raised"] and step == step_to_fail:
                state["raised"] = True
                raise exc
            return real(self, step, *args, **kwargs)

        return method

    return wrap, state


@pytest.mark.parametrize("fault", ["exception in a step", "disk full while staging"])
def test_crash_keeps_the_previous_checkpoint_and_a_rerun_ends_the_same(
    fault, tmp_path, reference, session_hooks, monkeypatch, capsys, reliability
):
    from runner.train.loop import Trainer

    last = reference.steps
    storage = cut_back(reference, tmp_path / "storage", keep_steps=(last - 2,))
    workdir = reference.seed_workdir(tmp_path / "work")
    failing_step = last - 1  # the second step of the session
    if fault == "exception in a step":
        wrap, state = _raise_at(failing_step, RuntimeError("injected crash in the training step"))
        monkeypatch.setattr(Trainer, "step", wrap(Trainer.step))
        expected = "injected crash in the training step"
    else:  # the checkpoint's snapshot is written to local disk by the upload worker
        from runner.train.trainstate import StateSnapshot

        state = {"raised": False}
        real_write = StateSnapshot.write

        def write(self, directory):
            if not state["raised"] and directory.name == f"step-{failing_step:08d}":
                state["raised"] = True
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(self, directory)

        monkeypatch.setattr(StateSnapshot, "write", write)
        expected = "No space left on device"

    code = relay_main(train_args(storage, workdir), contexts=session_hooks.build_context)
    err = capsys.readouterr().err
    assert state["raised"], "the fault was never injected"
    assert code == 1, f"{fault}: exit {code}, expected 1\n{err}"
    assert expected in err and "Traceback" not in err, err
    # The crash comes in the session's second step, after the first one's checkpoint; a full disk
    # comes while staging that first checkpoint, so nothing of it may reach the storage.
    newest_good = last - 1 if fault == "exception in a step" else last - 2
    verified = verified_steps(storage / RUN)
    assert last - 2 in verified and verified[-1] == newest_good, f"checkpoints verified after the fault: {verified}"
    assert broken_commits(storage / RUN) == []
    assert not (storage / RUN / "lease.json").exists(), "the failed session kept the lease"

    monkeypatch.undo()
    assert relay_main(train_args(storage, workdir)) == 0
    assert_same_lora(final_of(storage), reference.final_lora)
    reliability.record(fault, test="test_crash_keeps_the_previous_checkpoint_and_a_rerun_ends_the_same",
                       injected=1, survived=True)  # fmt: skip


def test_disk_full_while_training_goes_on_ends_the_session_at_the_next_step(
    tmp_path, reference, uploads_overlap, session_hooks, monkeypatch, capsys, reliability
):
    """The worker writes a checkpoint while the next step trains. Its failure must end the session after
    that step, not at the next checkpoint however far off, say why, and leave nothing half-committed."""
    import threading

    from runner import budget
    from runner.train.loop import Trainer
    from runner.train.trainstate import StateSnapshot

    last = reference.steps
    storage = cut_back(reference, tmp_path / "storage", keep_steps=(last - 3,))
    workdir = reference.seed_workdir(tmp_path / "work")
    first = last - 2  # the session's first step, and its only periodic checkpoint
    monkeypatch.setattr(budget, "should_checkpoint", lambda ctx: ctx.steps_left == last - first)
    real_write, real_step, failed = StateSnapshot.write, Trainer.step, threading.Event()

    def write(self, directory):
        if directory.name == f"step-{first:08d}" and not failed.is_set():
            failed.set()
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, directory)

    def step(self, n):
        if n == first:  # the step after the checkpoint: let the worker fail while it runs
            assert failed.wait(30), "the checkpoint was never written"
        return real_step(self, n)

    monkeypatch.setattr(StateSnapshot, "write", write)
    monkeypatch.setattr(Trainer, "step", step)
    code = relay_main(train_args(storage, workdir), contexts=session_hooks.build_context)
    err = capsys.readouterr().err
    assert code == 1 and "No space left on device" in err and "Traceback" not in err, err
    steps = [e.step for e in session_hooks.events if isinstance(e, events.StepDone)]
    assert steps == [first, first + 1], f"the session went on after the failed checkpoint: {steps}"
    assert verified_steps(storage / RUN) == [last - 3] and broken_commits(storage / RUN) == []
    assert not (storage / RUN / "lease.json").exists(), "the failed session kept the lease"
    monkeypatch.undo()
    assert relay_main(train_args(storage, workdir)) == 0
    assert_same_lora(final_of(storage), reference.final_lora)
    reliability.record("disk full while the next step trains (checkpoint written in the background)",
                       test="test_disk_full_while_training_goes_on_ends_the_session_at_the_next_step",
                       injected=1, survived=True)  # fmt: skip


# ---------------------------------------------------------------- storage errors


def test_permanent_upload_failure_is_reported_and_the_next_commit_succeeds(
    tmp_path, reference, session_hooks, capsys, reliability
):
    last = reference.steps
    storage = cut_back(reference, tmp_path / "storage", keep_steps=(last - 3,))
    failing = f"checkpoints/step-{last - 2:08d}/"
    flaky: list[FlakyStorage] = []
    kept: list[tuple[int, bool]] = []

    def wrap(inner):
        flaky.append(FlakyStorage(inner, fail_ops={"put": 1}, transient=False, key_contains=failing))
        return flaky[-1]

    def on_event(event):  # at the moment of the failure, the staged copy must still be on disk
        if isinstance(event, events.UploadFailed):
            kept.append((event.step, Path(event.local_copy, "lora.safetensors").is_file()))

    session_hooks.wrap = wrap
    session_hooks.subscribers.append(on_event)
    code = relay_main(
        train_args(storage, reference.seed_workdir(tmp_path / "work")), contexts=session_hooks.build_context
    )
    assert code == 0, capsys.readouterr().err
    failed = [e for e in session_hooks.events if isinstance(e, events.UploadFailed)]
    assert [e.step for e in failed] == [last - 2], failed
    assert "injected put failure" in failed[0].error
    committed = [e.step for e in session_hooks.events if isinstance(e, events.CheckpointCommitted)]
    assert last - 1 in committed and last in committed, committed
    assert flaky[0].failures == 1
    assert kept == [(last - 2, True)], "the local copy of the failed checkpoint was not kept"
    assert_same_lora(final_of(storage), reference.final_lora)
    reliability.record("permanent storage error on upload",
                       test="test_permanent_upload_failure_is_reported_and_the_next_commit_succeeds",
                       injected=1, survived=True)  # fmt: skip


class EveryNthRequestFails(list):
    """Stands in for FakeDrive.faults.errors: every n-th API request fails with a retryable status."""

    STATUSES = ((429, "rateLimitExceeded"), (503, "backendError"), (500, "internalError"))

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.count, self.injected = n, 0, 0

    def __iter__(self):
        self.count += 1
        if self.count % self.n:
            return iter(())
        self.injected += 1
        status, reason = self.STATUSES[self.injected % len(self.STATUSES)]
        return iter([(status, reason, self.injected % 2 == 0, "")])

    def remove(self, value) -> None:
        pass


def test_transient_drive_errors_on_every_operation_are_survived(tmp_path, reference, capsys, reliability):
    """Against the fake Drive server: every 4th request (reads, lists, uploads, deletes) fails with 429/5xx."""
    from runner.context import build_context
    from runner.storage.gdrive import RetryPolicy, open_gdrive
    from tests.fakedrive import ROOT_ID, FakeDrive, make_fake_account

    with FakeDrive() as server:
        folder = server.add_folder(ROOT_ID, "relay")
        account = make_fake_account(server, tmp_path / "home")
        fast = RetryPolicy(attempts=8, initial_s=0.01, max_s=0.05, jitter_s=0.01)

        def contexts(opts, **kwargs):  # the Drive client of the fake account, with a fast retry policy
            return build_context(opts, open_store=lambda url: open_gdrive(url, env=account, retry=fast), **kwargs)

        faults = EveryNthRequestFails(4)
        server.faults.errors = faults
        url = f"gdrive://{folder}"
        code = relay_main(train_args(url, reference.seed_workdir(tmp_path / "work")), contexts=contexts)
        err = capsys.readouterr().err
        assert code == 0, err
        assert faults.injected >= 20, f"only {faults.injected} faults injected"
        server.faults.errors = []
        drive = open_gdrive(url, env=account, retry=fast)
        drive.get(f"{RUN}/final/pytorch_lora_weights.safetensors", tmp_path / "final.safetensors")
    assert_same_lora(tmp_path / "final.safetensors", reference.final_lora)
    reliability.record("transient Drive errors (429/500/503) on every 4th request",
                       test="test_transient_drive_errors_on_every_operation_are_survived",
                       injected=faults.injected, survived=True)  # fmt: skip


def test_transient_upload_errors_are_retried(tmp_path, reference, session_hooks, monkeypatch, capsys, reliability):
    """Transient errors on checkpoint uploads, above the backend: the commit is retried as a whole."""
    import runner.checkpoint.manager as manager

    monkeypatch.setattr(manager, "RETRY_MAX_WAIT_S", 0.05)
    last = reference.steps
    storage = cut_back(reference, tmp_path / "storage", keep_steps=(last - 3,))
    flaky: list[FlakyStorage] = []
    session_hooks.wrap = lambda inner: (
        flaky.append(
            FlakyStorage(inner, fail_ops={"put": 3, "exists": 1}, key_contains=f"checkpoints/step-{last - 2:08d}/")
        )
        or flaky[-1]
    )
    code = relay_main(
        train_args(storage, reference.seed_workdir(tmp_path / "work")), contexts=session_hooks.build_context
    )
    assert code == 0, capsys.readouterr().err
    assert flaky[0].failures == 4
    assert not [e for e in session_hooks.events if isinstance(e, events.UploadFailed)]
    assert_same_lora(final_of(storage), reference.final_lora)
    reliability.record("transient storage errors on checkpoint upload", test="test_transient_upload_errors_are_retried",
                       injected=flaky[0].failures, survived=True)  # fmt: skip


# ---------------------------------------------------------------- corrupt files


def _corrupt_checkpoint(folder: Path, how: str) -> None:
    if how == "bit flip in lora.safetensors":
        flip_byte(folder / "lora.safetensors")
    elif how == "truncated optimizer.safetensors":
        data = (folder / "optimizer.safetensors").read_bytes()
        (folder / "optimizer.safetensors").write_bytes(data[: len(data) // 2])
    elif how == "COMMIT.json without its files":
        for name in ("lora.safetensors", "optimizer.safetensors", "state.json"):
            (folder / name).unlink()


@pytest.mark.parametrize(
    "how", ["bit flip in lora.safetensors", "truncated optimizer.safetensors", "COMMIT.json without its files"]
)
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(
    how, tmp_path, reference, session_hooks, capsys, reliability
):
    last = reference.steps
    storage = cut_back(reference, tmp_path / "storage", keep_steps=(last - 1, last))
    _corrupt_checkpoint(storage / RUN / "checkpoints" / f"step-{last:08d}", how)
    code = relay_main(
        train_args(storage, reference.seed_workdir(tmp_path / "work")), contexts=session_hooks.build_context
    )
    assert code == 0, capsys.readouterr().err
    warned = warnings_of(session_hooks, "checkpoint")
    assert any(f"step {last}" in w and "unusable" in w for w in warned), warned
    started = [e for e in session_hooks.events if isinstance(e, events.SessionStarted)]
    assert started and started[0].step == last - 1, "did not resume from the previous checkpoint"
    assert_same_lora(final_of(storage), reference.final_lora)
    assert verified_steps(storage / RUN)[-1] == last and broken_commits(storage / RUN) == []
    reliability.record(f"corrupt checkpoint: {how}",
                       test="test_corrupt_newest_checkpoint_falls_back_to_the_previous",
                       injected=1, survived=True, lost_steps=0)  # fmt: skip


@pytest.mark.parametrize("where", ["in storage", "in the local workdir"])
def test_corrupt_latent_cache_is_detected_and_replaced(where, tmp_path, reference, session_hooks, capsys, reliability):
    last = reference.steps
    storage = cut_back(reference, tmp_path / "storage", keep_steps=(last - 1,))
    if where == "in storage":
        workdir = tmp_path / "work"  # a fresh VM: the cache must come from storage
        shard = next((storage / RUN / "cache").glob("**/latents-*.safetensors"))
    else:
        workdir = reference.seed_workdir(tmp_path / "work")
        shard = next((workdir / RUN / "cache").glob("**/latents-*.safetensors"))
    flip_byte(shard)
    code = relay_main(train_args(storage, workdir), contexts=session_hooks.build_context)
    assert code == 0, capsys.readouterr().err
    local = next((workdir / RUN / "cache").glob("**/latents-*.safetensors"))
    reference_shard = next((reference.workdir / RUN / "cache").glob("**/latents-*.safetensors"))
    assert local.read_bytes() == reference_shard.read_bytes(), "the cache in use is not the good one"
    if where == "in storage":
        assert warnings_of(session_hooks, "cache"), "a corrupt stored cache was not reported"
    assert_same_lora(final_of(storage), reference.final_lora)
    commits = sorted((storage / RUN / "cache").glob("**/COMMIT.json"))  # the cache's and each of its pieces'
    stored_ok = bool(commits) and all(
        verify_dir(c.parent, parse_manifest(c.read_bytes(), str(c.parent))) == [] for c in commits
    )
    reliability.record(f"corrupt latent cache {where}", test="test_corrupt_latent_cache_is_detected_and_replaced",
                       injected=1, survived=True, notes={"stored copy good afterwards": int(stored_ok)})  # fmt: skip
    if where == "in storage":  # the next fresh VM must not have to rebuild it again
        assert stored_ok, (
            "KNOWN BUG (runner/checkpoint/store.py ensure_latent_cache): the rebuilt cache was not re-committed; the corrupt "
            "stored copy stays, so every fresh session rebuilds the cache again"
        )


# ---------------------------------------------------------------- two writers


def _lease(storage: Path, age_s: float) -> None:
    now = time.time()
    record = {"holder": "colab:dead-vm:pid1:abc", "token": "0" * 32, "since": "2026-01-01T00:00:00Z",
              "heartbeat_wall": now - age_s, "timeout_s": 300.0}  # fmt: skip
    (storage / RUN / "lease.json").write_text(json.dumps(record))


def test_stale_lease_is_taken_over_and_a_live_one_is_refused(tmp_path, reference, capsys, reliability):
    last = reference.steps
    storage = cut_back(reference, tmp_path / "storage", keep_steps=(last - 1,))
    workdir = reference.seed_workdir(tmp_path / "work")
    _lease(storage, age_s=30)
    assert relay_main(train_args(storage, workdir)) == EXIT_REFUSED
    err = capsys.readouterr().err
    assert "another session is training this run" in err and "colab:dead-vm" in err and "Traceback" not in err
    assert verified_steps(storage / RUN) == [last - 1], "a refused session touched the checkpoints"
    _lease(storage, age_s=400)  # older than the 300 s lease timeout: its holder is dead
    assert relay_main(train_args(storage, workdir)) == 0, capsys.readouterr().err
    assert_same_lora(final_of(storage), reference.final_lora)
    assert not (storage / RUN / "lease.json").exists()
    test = "test_stale_lease_is_taken_over_and_a_live_one_is_refused"
    reliability.record("live lease held by another session", test=test, injected=1, survived=True)
    reliability.record("stale lease of a dead session", test=test, injected=1, survived=True)


def test_two_processes_on_one_run_exactly_one_trains(tmp_path, reference, reliability):
    storage = cut_back(reference, tmp_path / "storage", keep_steps=())
    procs = []
    for name in ("a", "b"):
        workdir = reference.seed_workdir(tmp_path / f"work-{name}")
        procs.append(start_relay(train_args(storage, workdir), tmp_path / f"{name}.log"))
    codes = sorted(wait_relay(p, timeout_s=400) for p in procs)
    logs = [(tmp_path / f"{n}.log").read_text() for n in ("a", "b")]
    assert codes == [0, EXIT_REFUSED], f"exit codes {codes}:\n" + "\n----\n".join(log[-1500:] for log in logs)
    loser = next(log for log in logs if "another session is training this run" in log)
    assert "Traceback" not in loser
    assert_same_lora(final_of(storage), reference.final_lora)
    reliability.record("second relay process on the same run", test="test_two_processes_on_one_run_exactly_one_trains",
                       injected=1, survived=True)  # fmt: skip


def test_a_takeover_while_the_first_trainer_runs_leaves_one_writer(tmp_path, reference, reliability):
    """A trains slowly; once it has committed step 2, B takes the run over (--take-over: what a lapsed lease
    allows without the flag) and finishes it. From B's takeover on, A writes nothing: its next checkpoint is
    refused by the token check, it exits 3 ("another session is training this run"), deletes none of B's
    checkpoints and writes no final/; B's final LoRA is the uninterrupted run's, bit for bit."""
    storage = cut_back(reference, tmp_path / "storage", keep_steps=())
    sessions_before = len((storage / RUN / "sessions.jsonl").read_text().splitlines())
    slow = relay_env({"RELAY_TEST_STEP_DELAY_S": "6"})
    first = start_relay(train_args(storage, reference.seed_workdir(tmp_path / "work-a")), tmp_path / "a.log", env=slow)
    assert wait_for(lambda: first.poll() is not None or max(verified_steps(storage / RUN), default=0) >= 2, 300)
    assert first.poll() is None, (tmp_path / "a.log").read_text()[-3000:]
    second = start_relay(train_args(storage, reference.seed_workdir(tmp_path / "work-b"), flags=("--take-over",)),
                         tmp_path / "b.log")  # fmt: skip
    code_b, code_a = wait_relay(second, timeout_s=400), wait_relay(first, timeout_s=400)
    log_a, log_b = (tmp_path / "a.log").read_text(), (tmp_path / "b.log").read_text()
    assert (code_a, code_b) == (EXIT_REFUSED, 0), f"A {code_a}, B {code_b}:\n{log_a[-2000:]}\n----\n{log_b[-2000:]}"
    assert "another session is training this run" in log_a and "Traceback" not in log_a
    assert_same_lora(final_of(storage), reference.final_lora)
    assert verified_steps(storage / RUN)[-1] == reference.steps  # B's last checkpoint is there, verified
    assert not broken_commits(storage / RUN)
    lines = (storage / RUN / "sessions.jsonl").read_text().splitlines()[sessions_before:]
    assert [json.loads(line)["reason"] for line in lines] == ["completed"], "A recorded nothing after it lost the run"
    reliability.record("takeover while the first trainer still runs (local folder)",
                       test="test_a_takeover_while_the_first_trainer_runs_leaves_one_writer", injected=1,
                       survived=True)  # fmt: skip
