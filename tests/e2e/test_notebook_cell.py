"""The notebook cell, driven through a real Jupyter kernel (jupyter_client + ipykernel, as nbclient runs
notebooks) with the google.colab stand-in (tests/platforms/colab) importable and Colab's variables set,
and the detached trainer's supervisor: what a Colab user depends on.

- secrets, sign-in, the Drive mount and unassign are called in the kernel; the same call from a `!`
  child raises, as on Colab;
- interrupting the cell or restarting the kernel leaves the trainer running; running the cell again
  follows it to the end;
- a trainer killed with SIGKILL is restarted from the last committed step and the final LoRA equals an
  uninterrupted run's, bit for bit;
- a crash that repeats with no new committed step stops with a message instead of looping.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runner import daemon
from runner import events as ev
from runner.rundir import RunDir, pid_alive, run_dir_for
from tests.e2e.conftest import FAST, REPO, STEPS, assert_same_lora, relay_env, train_args, verified_steps

jupyter_client = pytest.importorskip("jupyter_client", reason="pip install nbclient ipykernel (the [test] extra)")
pytest.importorskip("ipykernel", reason="pip install nbclient ipykernel (the [test] extra)")

STANDIN = REPO / "tests" / "platforms" / "colab"
HF_SECRET = "hf_standin_value_never_printed"
CELL_TIMEOUT_S = 240


class Kernel:
    """A real IPython kernel; `execute` returns the cell's text output and its error name, if any."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.km = jupyter_client.KernelManager(kernel_name="python3")
        self.km.start_kernel(env=env, cwd=str(cwd))
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)

    def execute(self, code: str, *, timeout_s: float = CELL_TIMEOUT_S, interrupt_when=None) -> tuple[str, str]:
        msg_id = self.kc.execute(code)
        text, error, interrupted = [], "", False
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if interrupt_when is not None and not interrupted and interrupt_when():
                self.km.interrupt_kernel()
                interrupted = True
            try:
                msg = self.kc.get_iopub_msg(timeout=0.5)
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                text.append(content["text"])
            elif kind in ("display_data", "update_display_data", "execute_result"):
                text.append(content["data"].get("text/plain", ""))
            elif kind == "error":
                error = content["ename"]
                text.append(f"{content['ename']}: {content['evalue']}")
            elif kind == "status" and content["execution_state"] == "idle":
                return "".join(text), error
        raise AssertionError(f"cell did not finish in {timeout_s} s: {''.join(text)[-2000:]}")

    def restart(self) -> None:
        self.km.restart_kernel(now=True)
        self.kc.wait_for_ready(timeout=60)

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


@pytest.fixture
def colab(tmp_path):
    """Colab's variables, the stand-in frontend (a Colab secret HF_TOKEN) and a kernel with both."""
    root = tmp_path / "vm"
    (root / "var" / "colab").mkdir(parents=True)
    (root / "var" / "colab" / "hostname").write_text("colab-standin\n")
    frontend = tmp_path / "frontend.json"
    frontend.write_text(json.dumps({"secrets": {"HF_TOKEN": HF_SECRET}, "sign_in": True}))
    env = relay_env({
        "PYTHONPATH": os.pathsep.join([str(REPO), str(STANDIN)]),
        "COLAB_RELEASE_TAG": "release-colab_20261120-060000_RC00", "COLAB_GPU": "", "TBE_RUNTIME_ADDR": "127.0.0.1:9",
        "DATALAB_ROOT": str(root), "COLAB_STANDIN_CALLS": str(tmp_path / "calls.jsonl"),
        "COLAB_STANDIN_FRONTEND": str(frontend), "RELAY_HOME": str(tmp_path / "home"), daemon.ENV_BACKOFF: "1",
    })  # fmt: skip
    for name in ("GOOGLE_APPLICATION_CREDENTIALS", "RELAY_GDRIVE_CREDENTIALS", "KAGGLE_KERNEL_RUN_TYPE", "HF_TOKEN"):
        env.pop(name, None)
    kernel = Kernel(env, tmp_path)
    try:
        yield kernel, env, tmp_path
    finally:
        kernel.close()


def calls(tmp_path: Path) -> list[dict]:
    path = tmp_path / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def events_of(rundir: RunDir) -> list[ev.Event]:
    return list(ev.iter_events(ev.read_records(rundir.events)[0]))


def wait_for(predicate, timeout_s: float = 180, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_the_cell_uses_kernel_services_survives_an_interrupt_and_a_kernel_restart_and_finishes(colab):
    kernel, env, tmp = colab
    storage, workdir, steps = tmp / "My Drive" / "relay runs", tmp / "work", 8  # spaces: one argument each
    overrides = [*FAST, f"train.steps={steps}"]
    cell = (
        "from runner import notebook\n"
        f"notebook.run(profile='tiny', storage={str(storage)!r}, workdir={str(workdir)!r}, "
        f"overrides={overrides!r}, release_gpu=True, storage_on_vm=True)\n"
    )
    rundir = run_dir_for("tiny", str(storage), env)

    def training() -> bool:
        return any(isinstance(e, ev.StepDone) for e in events_of(rundir))

    out, error = kernel.execute(cell, interrupt_when=training)
    assert error == "" and "stopped following; the run goes on" in out, out
    trainer_pid = rundir.read_state()["trainer_pid"]
    assert pid_alive(trainer_pid), "interrupting the cell stopped the trainer"
    for pid in (trainer_pid, rundir.read_state()["supervisor_pid"]):  # `ps e` shows neither the secret
        assert HF_SECRET.encode() not in Path(f"/proc/{pid}/environ").read_bytes(), f"secret in pid {pid}'s environ"
    assert not list(rundir.root.glob(".relay-secrets-*")), "the trainer did not take its secrets over"
    kernel.restart()  # Runtime → Restart session: jupyter_client signals the kernel's whole process group
    assert pid_alive(trainer_pid), "a kernel restart stopped the trainer"

    out, error = kernel.execute(cell)  # the same cell again: follows the live run to its end
    second = out
    assert error == "", out
    assert "is training on this VM; following it" in out and "exit 0: done" in out, out
    assert "keeping the runtime: the run's storage is on this VM's disk" in out, out  # the only copy
    assert "runtime.unassign" not in {c["call"] for c in calls(tmp)}
    assert (storage / "tiny" / "final" / "pytorch_lora_weights.safetensors").exists()
    assert not [e for e in events_of(rundir) if isinstance(e, ev.TrainerRestarted)]
    for path in (rundir.events, rundir.trainer_log, rundir.state_file):
        assert HF_SECRET not in path.read_text(), f"secret written to {path}"
    assert HF_SECRET not in out

    out, error = kernel.execute(
        "from runner import notebookenv\n"
        "env = notebookenv.trainer_env('colab', 'gdrive://My Drive/relay', {}, sign_in=notebookenv.colab_sign_in)\n"
        "print(env['RELAY_GDRIVE_CREDENTIALS'], env['GOOGLE_APPLICATION_CREDENTIALS'])\n"
        f"notebookenv.mount_drive({str(tmp / 'mnt')!r})\n"
        "import os; notebook.is_complete = notebook.show_result = lambda *a: True  # a run finished in a store\n"
        "done = notebook.Outcome('tiny', 'hf://me/runs', 0, '/nonexistent')  # that outlives the VM\n"
        "notebook._finish(done, os.environ, None, True, 'hf://me/runs')\n"
    )
    assert error == "", out
    assert f"application-default {tmp / 'vm' / 'content' / '.adc' / 'adc.json'}" in out
    assert (tmp / "mnt" / "MyDrive").is_dir()
    made = {c["call"] for c in calls(tmp) if c["in_kernel"]}
    assert {"request:GetSecret", "runtime.unassign", "auth.authenticate_user", "drive.mount"} <= made, (made, second)
    assert "final commit verified; ending the runtime" in out, out
    assert not [c for c in calls(tmp) if not c["in_kernel"]], "a Colab service was called outside the kernel"

    out, error = kernel.execute(f"!{sys.executable} -c \"from google.colab import userdata; userdata.get('HF_TOKEN')\"")
    assert "AttributeError: 'NoneType' object has no attribute 'kernel'" in out, out


def start_detached(tmp: Path, storage: Path, workdir: Path, extra_env: dict[str, str]) -> RunDir:
    env = relay_env({"RELAY_HOME": str(tmp / "home"), daemon.ENV_BACKOFF: "1", **extra_env})
    return daemon.start(train_args(storage, workdir)[1:], env)


def follow(rundir: RunDir, timeout_s: float = 240) -> int:
    deadline = time.monotonic() + timeout_s

    def check(_event) -> None:
        assert time.monotonic() < deadline, "the detached run did not end in time"

    return daemon.follow(rundir, check, poll_s=0.2)


def test_a_killed_trainer_is_resumed_by_the_supervisor_and_ends_bit_exact(tmp_path, reference_factory):
    reference = reference_factory(STEPS)
    storage = tmp_path / "storage"
    rundir = start_detached(tmp_path, storage, reference.seed_workdir(tmp_path / "work"), {})
    wait_for(lambda: any(isinstance(e, ev.CheckpointCommitted) for e in events_of(rundir)), what="a commit")
    os.kill(rundir.read_state()["trainer_pid"], signal.SIGKILL)
    assert follow(rundir) == 0, rundir.trainer_log.read_text()[-3000:]
    restarts = [e for e in events_of(rundir) if isinstance(e, ev.TrainerRestarted)]
    assert len(restarts) == 1 and restarts[0].exit_code == -signal.SIGKILL, restarts
    assert any(isinstance(e, ev.Warning) and e.kind == "restart" and "SIGKILL" in e.message for e in events_of(rundir))
    assert_same_lora(storage / "tiny" / "final" / "pytorch_lora_weights.safetensors", reference.final_lora)


def test_a_crash_that_repeats_without_progress_stops_with_a_message(tmp_path):
    not_a_folder = tmp_path / "workdir-is-a-file"
    not_a_folder.write_text("")
    rundir = start_detached(tmp_path, tmp_path / "storage", not_a_folder, {})
    assert follow(rundir, timeout_s=120) == 1
    restarts = [e for e in events_of(rundir) if isinstance(e, ev.TrainerRestarted)]
    assert len(restarts) == 1, "restarted more than once with no new committed step"
    state = rundir.read_state()
    assert state["phase"] == "ended" and "no new committed step" in state["message"], state
    assert rundir.trainer_log.read_text().count("relay: unexpected error") == 2


def test_train_detach_then_stop_checkpoints_and_ends_75_and_attach_replays_the_run(tmp_path):
    storage, workdir = tmp_path / "storage", tmp_path / "work"
    env = relay_env({"RELAY_HOME": str(tmp_path / "home")})
    started = subprocess.run([sys.executable, "-m", "runner", *train_args(storage, workdir, steps=500), "--detach"],
                             env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert started.returncode == 0 and "training in the background" in started.stdout, started.stderr
    rundir = run_dir_for("tiny", str(storage), env)
    wait_for(lambda: any(isinstance(e, ev.StepDone) for e in events_of(rundir)), what="a step")
    stop = subprocess.run([sys.executable, "-m", "runner", "stop"], env=env, capture_output=True, text=True)
    assert stop.returncode == 0, stop.stderr
    attach = subprocess.run([sys.executable, "-m", "runner", "attach", "--plain"], env=env, capture_output=True,
                            text=True, timeout=240)  # fmt: skip
    assert attach.returncode == 75, attach.stdout + attach.stderr
    assert "relay | step" in attach.stdout and "trainer ended: session over" in attach.stderr
    assert not [e for e in events_of(rundir) if isinstance(e, ev.TrainerRestarted)]
    ended = [e for e in events_of(rundir) if isinstance(e, ev.SessionEnded)]
    assert ended and ended[-1].exit_code == 75 and ended[-1].step == max(verified_steps(storage / "tiny"))
