"""The kernel side of a notebook run: the one cell that starts, follows and finishes a run.

    from runner import notebook
    notebook.run(profile="sdxl-naruto-t4", storage="gdrive://My Drive/relay", release_gpu=True)

Owns the cell's supervision of the trainer; what only the notebook's kernel can read (Colab or Kaggle
secrets, Colab's sign-in for Drive, the Drive mount) is runner/notebookenv.py's. Ending the runtime
(runtime.unassign) once the final commit is verified is done here. It does the right thing for this run,
every time the same cell runs:

    a trainer for this run is alive on this VM    → follow it
    the run is complete in its storage             → show the result (final/, sample grid, loss plot)
    otherwise                                      → start (or resume) it detached, and follow it

The trainer runs detached (runner.daemon): interrupting the cell, closing the browser or restarting
the kernel leaves it training. Interactive cells follow it until it ends or the cell is interrupted;
headless runs (Kaggle "Save & Run All", a script) block until it ends, so the VM stays up.

Secrets reach the trainer only through its environment; they are never printed or written.
Must not: import torch, or train in the kernel.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from runner import daemon
from runner import events as ev
from runner.errors import EXIT_OK, EXIT_PREEMPTED, RelayError
from runner.notebookenv import (
    CHAIN_SECRET_NAMES,
    add_secrets,
    colab_sign_in,
    flush_drive,
    is_headless,
    mount_drive,
    platform_of,
    trainer_env,
    uses_mount,
)
from runner.rundir import RunDir, run_dir_for
from runner.storage.url import VM_STORAGE_OPT_IN, check_vm_storage, is_vm_local

KAGGLE_RELEASE_NOTE = (
    "relay: release_gpu=True is ignored on Kaggle: a notebook cannot end its own Kaggle session; a "
    "'Save & Run All' version stops when its last cell ends, an interactive session when you stop it"
)
REDRAW_EVERY_S = 1.0
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
MEANING = {
    EXIT_OK: "done: the LoRA is in final/ in your storage",
    EXIT_PREEMPTED: "session over: run this cell again (in a new session if this one ended) to resume",
}


class NotebookRunError(RelayError):
    """The trainer ended with an error; `exit_code` keeps its meaning (1 error, 2 bad input)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Outcome:
    """How the cell left the run."""

    run: str
    storage: str
    exit_code: int | None  # None: still training (the cell stopped following it)
    local_dir: str  # the run's local folder: events.jsonl, trainer.log
    message: str = ""


# ---------------------------------------------------------------- the cell


def train_args(
    profile: str, storage: str, *, run: str | None = None, overrides: Sequence[str] = (), hours: float | None = None,
    workdir: str | None = None, extra: Sequence[str] = (),
) -> list[str]:  # fmt: skip
    """`relay train` arguments; each value is one argument, so a storage path with spaces stays whole."""
    args = ["--profile", profile, "--storage", storage]
    if run:
        args += ["--run", run]
    if hours is not None:
        args += ["--hours", str(hours)]
    if workdir:
        args += ["--workdir", workdir]
    for item in overrides:
        args += ["--set", item]
    return [*args, *extra]


def run(
    profile: str, storage: str, *, run: str | None = None, overrides: Sequence[str] = (), hours: float | None = None,
    release_gpu: bool = False, workdir: str | None = None, extra: Sequence[str] = (), follow: bool | None = None,
    storage_on_vm: bool = False,
) -> Outcome:  # fmt: skip
    """Start, resume or follow the run; see the module docstring.

    profile, storage, run, overrides (`section.key=value` items), hours, workdir: as `relay train`.
    release_gpu: on Colab, end the runtime once this cell has finished the run and its final commit is
    verified (never when the storage is on the VM, never on a re-run of a finished run).
    storage_on_vm: on Colab or Kaggle, allow storage on the VM's own disk, which is deleted with the VM.
    follow: None follows until the end (headless) or until the cell is interrupted (interactive);
    False returns once the trainer is started."""
    env = dict(os.environ)
    platform = platform_of(env)
    headless = is_headless(env)
    if storage_on_vm:
        env[VM_STORAGE_OPT_IN] = "1"
    vm_warning = check_vm_storage(storage, platform, env)  # a typo'd remote form must not become a VM folder
    if vm_warning:
        print(f"relay: warning: {vm_warning}")
    if release_gpu and platform == "kaggle":
        print(KAGGLE_RELEASE_NOTE)
    settings = _profile_or_none(profile, overrides)  # read once: data.source and session.chain
    chain_on = settings is not None and settings.session.chain == "kaggle"
    data_source = settings.data.source if settings is not None else ""
    if platform == "colab" and (uses_mount(storage) or uses_mount(data_source)):
        mount_drive()  # for the run's storage, or for your images in a Drive folder (data.source)
    child = trainer_env(platform, storage, env, sign_in=colab_sign_in)
    argv = train_args(profile, storage, run=run, overrides=overrides, hours=hours, workdir=workdir, extra=extra)
    name, url = daemon.identify(argv, child)
    rundir = run_dir_for(name, url, child)
    if rundir.is_live():
        print(f"relay: run {name!r} is training on this VM; following it ({rundir.root})")
    elif is_complete(name, url, child):
        print(f"relay: run {name!r} is complete")
        if release_gpu and platform == "colab":  # the user came back to look at it: keep the runtime
            print("relay: keeping the runtime (release_gpu ends it only when this cell finishes the run)")
        return _finish(Outcome(name, url, EXIT_OK, str(rundir.root)), child, workdir, False, storage)
    else:
        if chain_on:  # a run without a chain starts no chain process and reads no Kaggle key
            said = _chain(platform, child, ["begin", *train_args(profile, storage, run=run, overrides=overrides)])
            child.update(quota_end(said))
        rundir = daemon.start(argv, child)
        print(f"relay: training {name!r} in the background; interrupting this cell leaves it running ({rundir.root})")
    if follow is False:
        return Outcome(name, url, None, str(rundir.root))
    code = _follow(rundir, headless=headless)
    if code is None:
        print("relay: stopped following; the run goes on. Run this cell again to follow it.")
        return Outcome(name, url, None, str(rundir.root))
    # the trainer's last exit (the supervisor's restarts are behind it): the chain pushes the next session or stops
    if chain_on:
        after = ["after", "--exit-code", str(code), *train_args(profile, storage, run=run, overrides=overrides)]
        _chain(platform, child, after)
    return _finish(Outcome(name, url, code, str(rundir.root), rundir.read_state().get("message", "")),
                   child, workdir, release_gpu, storage)  # fmt: skip


def _profile_or_none(profile: str, overrides: Sequence[str]):
    """The profile as the trainer will load it, or None for a bad one (the trainer reports that)."""
    from runner.profile import load_profile

    try:
        return load_profile(profile, list(overrides))
    except RelayError:
        return None


def _chain(platform: str, child: Mapping[str, str], args: list[str]) -> str:
    """`python -m runner.chain begin|after …` (docs/chain.md), for a profile with session.chain = "kaggle".
    The Kaggle API key is read here, in the kernel, and given to that process alone (never the trainer)."""
    env = dict(child)
    add_secrets(platform, env, CHAIN_SECRET_NAMES)
    _ensure_chain_client(env)
    proc = subprocess.run([sys.executable, "-m", "runner.chain", *args], capture_output=True, text=True, env=env,
                          timeout=900)  # fmt: skip
    from runner.chain import QUOTA_LINE

    for line in (proc.stdout + proc.stderr).splitlines():
        if line.strip() and not line.startswith(QUOTA_LINE):
            print(f"relay: {line}")
    return proc.stdout


def _ensure_chain_client(env: Mapping[str, str]) -> None:
    """The chain's extra (kagglesdk, pyproject's [kaggle]) where the chain is on: installed once if missing."""
    import importlib.util

    if importlib.util.find_spec("kagglesdk") is not None:
        return
    print("relay: installing kagglesdk for the Kaggle chain (pip install 'kagglesdk>=0.1')")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "kagglesdk>=0.1"], capture_output=True,
                          text=True, env=dict(env), timeout=600)  # fmt: skip
    if done.returncode != 0:
        print(f"relay: could not install kagglesdk: {(done.stderr or done.stdout).strip()[-300:]}")


def quota_end(said: str) -> dict[str, str]:
    """The trainer's RELAY_SESSION_END_WALL/_SOURCE from `runner.chain begin`'s quota line (none: no change)."""
    from runner.chain import QUOTA_LINE
    from runner.env import SESSION_END_ENV, SESSION_END_SOURCE_ENV

    for line in said.splitlines():
        if line.startswith(QUOTA_LINE):
            try:
                data = json.loads(line[len(QUOTA_LINE) :])
                return {SESSION_END_ENV: str(float(data["end_wall"])), SESSION_END_SOURCE_ENV: str(data["source"])}
            except (ValueError, KeyError, TypeError):
                return {}
    return {}


def _follow(rundir: RunDir, *, headless: bool) -> int | None:
    """Show the dashboard until the trainer ends (its exit code), or None when the cell is interrupted."""
    view = PlainView() if headless else CellView()
    try:
        return daemon.follow(rundir, view.on_event, on_poll=view.tick)
    except KeyboardInterrupt:
        return None
    finally:
        view.close()


def _finish(outcome: Outcome, env: Mapping[str, str], workdir: str | None, release_gpu: bool, storage: str) -> Outcome:
    code = outcome.exit_code
    print(f"relay: exit {code}: {MEANING.get(code, 'error: see the message below')}")
    if code not in (EXIT_OK, EXIT_PREEMPTED):
        tail = _tail(Path(outcome.local_dir) / "trainer.log")
        raise NotebookRunError(f"the trainer ended with exit {code}: {outcome.message}\n{tail}", exit_code=code)
    colab = platform_of(env) == "colab"
    # Everything that reads the storage comes before the unmount: on `drive` storage the run is on the mount
    complete = code == EXIT_OK and release_gpu and colab and is_complete(outcome.run, outcome.storage, env)
    if code == EXIT_OK and not show_comparison(outcome.run, outcome.storage, env, workdir):
        show_result(outcome.run, outcome.storage, workdir)
    if uses_mount(storage) and colab:
        flush_drive()  # the mount writes back late; push everything before the VM can go
    if code == EXIT_OK and release_gpu and colab:
        if is_vm_local(storage):
            print("relay: keeping the runtime: the run's storage is on this VM's disk and would go with it; "
                  "download final/ first")  # fmt: skip
            return outcome
        if not complete:
            print("relay: final/ is not committed in storage; keeping the runtime")
            return outcome
        from google.colab import runtime  # type: ignore[import-not-found]

        print("relay: final commit verified; ending the runtime (release_gpu=True)")
        runtime.unassign()
    return outcome


def is_complete(run: str, storage: str, env: Mapping[str, str]) -> bool:
    """Whether the run's final/ is committed in its storage (`relay status --json`, in a child process that
    gets the secrets through its environment)."""
    plain = {k: v for k, v in env.items() if k not in ("FORCE_COLOR", "CLICOLOR_FORCE")}  # a kernel sets these
    proc = subprocess.run([sys.executable, "-m", "runner", "status", "--storage", storage, "--run", run, "--json"],
                          capture_output=True, text=True, env={**plain, "NO_COLOR": "1"}, timeout=600)  # fmt: skip
    if proc.returncode != 0:
        return False
    try:
        return bool(json.loads(ANSI.sub("", proc.stdout)).get("complete"))
    except ValueError:
        return False


def status(storage: str, run: str | None = None) -> None:
    """`relay status` for this notebook's storage, with the notebook's secrets."""
    env = trainer_env(platform_of(os.environ), storage, os.environ, sign_in=colab_sign_in)
    cmd = [sys.executable, "-m", "runner", "status", "--storage", storage, *(["--run", run] if run else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    print(proc.stdout + proc.stderr, end="")


def stop(storage: str, run: str | None = None, *, profile: str | None = None) -> bool:
    """Ask this VM's trainer of the run to checkpoint and stop (exit 75). The run is `run`, or the one
    `profile` trains (its run key, else its name: runner.runinfo.run_identity)."""
    from runner.runinfo import identify_run

    if not run and not profile:
        raise ValueError("name the run (run=…) or the profile that trains it (profile=…)")
    return daemon.stop(run_dir_for(run or identify_run(profile or ""), storage, os.environ))


def show_result(run: str, storage: str, workdir: str | None) -> None:
    """Where final/ is, and the images found on this machine (sample grid, loss plot)."""
    local = "://" not in storage and storage != "drive"
    print(f"relay: the LoRA is in {storage.rstrip('/')}/{run}/final/")
    roots = [Path(storage) / run / "final"] if local else []
    if workdir:
        roots.append(Path(workdir) / run)
    found = [p for root in roots if root.is_dir() for p in sorted(root.rglob("*.png")) if "final" in p.parts]
    images = [p for i, p in enumerate(found) if p.name not in {q.name for q in found[:i]}]  # storage's final/
    # and the workdir's build of it hold the same files: show each image once
    try:
        from IPython.display import Image, display
    except ImportError:
        return
    for image in images[:4]:
        print(image)
        display(Image(filename=str(image)))


def show_comparison(run: str, storage: str, env: Mapping[str, str], workdir: str | None) -> bool:
    """For a complete experiment: `relay compare` (its table, loss plot and grid) shown in the cell; False when
    `run` is no experiment."""
    out = Path(workdir or tempfile.gettempdir()) / run / "compare"
    proc = subprocess.run([sys.executable, "-m", "runner", "compare", "--storage", storage, "--experiment", run,
                           "--out", str(out)], capture_output=True, text=True, env=dict(env))  # fmt: skip
    if proc.returncode != 0:
        return False
    print(proc.stdout, end="")
    try:
        from IPython.display import Image, display
    except ImportError:
        return True
    for name in ("grid.png", "losses.png"):
        if (out / name).is_file():
            display(Image(filename=str(out / name)))
    return True


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ---------------------------------------------------------------- views


class CellView:
    """The dashboard in the cell's output, redrawn in place (a display handle; no ipywidgets needed)."""

    def __init__(self, width: int = 100) -> None:
        from IPython.display import display

        from runner.clock import SystemClock
        from runner.snapshot import Snapshot

        self.clock, self.width, self.snapshot = SystemClock(), width, Snapshot()
        self.handle = display({"text/plain": "relay: waiting for the trainer…"}, raw=True, display_id=True)
        self.drawn_at = 0.0

    def on_event(self, event: ev.Event) -> None:
        from runner.snapshot import apply

        self.snapshot = apply(self.snapshot, event, self.clock.monotonic())
        if isinstance(event, ev.Warning):
            print(f"relay | warning ({event.kind}): {event.message}")
        elif isinstance(event, ev.Notice):
            print(f"relay | {event.message}")

    def tick(self) -> None:
        if time.monotonic() - self.drawn_at >= REDRAW_EVERY_S:
            self.draw()

    def draw(self) -> None:
        from rich.console import Console

        from runner.dashview import render

        console = Console(file=io.StringIO(), record=True, width=self.width, force_terminal=True, force_jupyter=False)
        console.print(render(self.snapshot, self.clock.monotonic()))
        text = console.export_text(clear=False)  # before export_html, which clears what was recorded
        html = console.export_html(inline_styles=True, code_format="<pre style='line-height:1.2'>{code}</pre>")
        self.handle.update({"text/plain": text, "text/html": html}, raw=True)
        self.drawn_at = time.monotonic()

    def close(self) -> None:
        self.draw()


class PlainView:
    """Plain progress lines (a headless run is read later as a log)."""

    def __init__(self) -> None:
        from rich.console import Console

        from runner.clock import SystemClock
        from runner.dashboard import Dashboard

        console = Console(file=sys.stdout, force_jupyter=False, force_terminal=False, width=160)
        self.dash = Dashboard(console, SystemClock(), live=False)

    def on_event(self, event: ev.Event) -> None:
        self.dash.on_event(event)

    def tick(self) -> None:
        pass

    def close(self) -> None:
        self.dash.stop()
