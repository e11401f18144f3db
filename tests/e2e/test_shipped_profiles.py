"""What ships is what is tested: every profile in profiles/ goes through the README's notebook cell, in a
real Jupyter kernel, on the Colab stand-in (tests/platforms/colab_t4.py: Colab's variables, one T4 in
nvidia-smi, the google.colab stand-in) and on the Kaggle stand-in (tests/platforms/kaggle_t4x2.py:
Kaggle's variables over Colab's image, two T4s, the secrets service), to completion and, on Colab,
release of the runtime.

Only the model and the data are swapped for tiny ones, by the test-only RELAY_TEST_TINY_MODEL=N
(runner/profile.py; docs/platforms.md "Testing what ships"): the profile's name, run key and
effective batch stay as shipped, so the run lands where a user's would, under the profile's run
key. Two profiles of one run, sdxl-naruto-t4 on Colab then sdxl-naruto-kaggle-2xt4 on Kaggle,
continue each other through the same cell.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from runner import daemon
from runner import events as ev
from runner.profile import load_profile
from runner.rundir import run_dir_for
from tests.e2e.conftest import REPO, relay_env, sessions, verified_steps
from tests.fakedrive import FOLDER_MIME, FakeDrive, make_fake_account
from tests.platforms import child_env, colab_t4, kaggle_t4x2
from tests.platforms.kaggle_service import KaggleSecretsService

pytest.importorskip("jupyter_client", reason="pip install nbclient ipykernel (the [test] extra)")
pytest.importorskip("ipykernel", reason="pip install nbclient ipykernel (the [test] extra)")
from tests.e2e.test_notebook_cell import Kernel, calls, events_of  # noqa: E402

# Experiments (profiles with [[variants]]) train several runs: tests/e2e/test_experiment.py trains the shipped one.
SHIPPED = sorted(p.stem for p in (REPO / "profiles").glob("*.toml") if "[[variants]]" not in p.read_text())
STEPS = 2


def cell(platform: str, profile: str, storage: str, workdir: Path) -> str:
    """The README's cell after bootstrap (README "On Colab" / "On Kaggle"), with this test's paths."""
    finish = "release_gpu=True" if platform == "colab" else f"workdir={str(workdir)!r}"
    return (
        "from runner import notebook\n"
        f"PROFILE = {profile!r}\nSTORAGE = {str(storage)!r}\n"
        f"notebook.run(profile=PROFILE, storage=STORAGE, {finish})\n"
    )


class Platforms:
    """A kernel on the Colab stand-in or on the Kaggle stand-in, one VM home per platform, and one store: a
    folder on the Google Drive API stand-in (tests/fakedrive.py), the README's Colab store, which outlives
    the VM (a folder on the VM's own disk would be refused on both platforms, and never released)."""

    def __init__(self, tmp: Path, secrets: KaggleSecretsService, drive: FakeDrive) -> None:
        self.tmp, self.secrets, self.kernels, self.drive = tmp, secrets, {}, drive
        self.accounts: dict[str, dict[str, str]] = {}  # one Google account per platform's VM
        self.folder = drive.add_folder("root", "relay runs")
        self.storage = f"gdrive://{self.folder}"

    def stored(self, run: str) -> Path:
        """The run's folder as it is in the store, copied to local disk (for the conftest readers)."""
        out = self.tmp / "stored" / run
        if out.exists():
            import shutil

            shutil.rmtree(out)

        def copy(parent: str, into: Path) -> None:
            into.mkdir(parents=True, exist_ok=True)
            for child in self.drive.children(parent):
                if child.mime_type == FOLDER_MIME:
                    copy(child.id, into / child.title)
                else:
                    (into / child.title).write_bytes(child.content)

        for top in self.drive.children(self.folder, run):
            copy(top.id, out)
        return out

    def env(self, platform: str, **extra: str) -> dict[str, str]:
        base = relay_env({"PYTHONPATH": str(REPO), daemon.ENV_BACKOFF: "1", "RELAY_TEST_TINY_MODEL": str(STEPS)})
        vm = self.tmp / f"vm-{platform}"
        if platform == "colab":
            (vm / "var" / "colab").mkdir(parents=True, exist_ok=True)
            (vm / "var" / "colab" / "hostname").write_text("colab-standin\n")
            frontend = self.tmp / "frontend.json"
            frontend.write_text(json.dumps({"secrets": {}, "sign_in": True}))
            env = child_env(colab_t4.ENV, base, DATALAB_ROOT=str(vm), COLAB_STANDIN_FRONTEND=str(frontend),
                            COLAB_STANDIN_CALLS=str(self.tmp / "calls.jsonl"))  # fmt: skip
        else:
            env = child_env(kaggle_t4x2.ENV, base, KAGGLE_URL_BASE=self.secrets.url)
        for name in ("GOOGLE_APPLICATION_CREDENTIALS", "RELAY_GDRIVE_CREDENTIALS"):
            env.pop(name, None)
        if platform not in self.accounts:  # the user's Drive credentials on that VM
            self.accounts[platform] = make_fake_account(self.drive, self.tmp / f"account-{platform}")
        return {**env, **self.accounts[platform], "RELAY_HOME": str(vm / "home"), **extra}

    def kernel(self, platform: str, **extra: str) -> Kernel:
        kernel = Kernel(self.env(platform, **extra), self.tmp)
        self.kernels[id(kernel)] = kernel
        return kernel

    def close(self) -> None:
        for kernel in self.kernels.values():
            kernel.close()


@pytest.fixture
def platforms(tmp_path):
    with KaggleSecretsService({}) as service, FakeDrive() as drive:
        p = Platforms(tmp_path, service, drive)
        try:
            yield p
        finally:
            p.close()


def test_the_profiles_that_ship_are_the_ones_tested():
    assert {"sdxl-naruto-t4", "sdxl-naruto-kaggle-2xt4", "tiny"} <= set(SHIPPED)


HOME = {"sdxl-naruto-kaggle-2xt4": "kaggle"}
COVERED = {("sdxl-naruto-kaggle-2xt4", "kaggle")}
"""Each profile runs by default on the platform it is written for (Colab unless named in HOME); the other
platform's run is marked slow (`pytest -m slow`), to keep the default suite short on 2 cores. The Kaggle
profile's own run to completion on Kaggle is also the second half of the continuation test below, which
runs by default (exact_resume), so its single run is slow too."""
MATRIX = [
    pytest.param(profile, platform, marks=()
                 if HOME.get(profile, "colab") == platform and (profile, platform) not in COVERED else pytest.mark.slow)
    for profile in SHIPPED for platform in ("colab", "kaggle")
]  # fmt: skip


@pytest.mark.parametrize(("profile", "platform"), MATRIX)
def test_a_shipped_profile_trains_to_completion_through_the_readme_cell(profile, platform, platforms, monkeypatch):
    """The cell trains the profile's run (its run key, not its name), prints a final/ path that exists,
    finds the run complete when run again, and on Colab ends the runtime after verifying the final commit."""
    tmp = platforms.tmp
    storage, workdir = platforms.storage, tmp / "work"
    monkeypatch.setenv("RELAY_TEST_TINY_MODEL", str(STEPS))
    shipped = load_profile(profile)
    run = shipped.run or profile
    tiny = load_profile(profile)
    assert (tiny.name, tiny.run_name) == (shipped.name, shipped.run_name)  # the override keeps the identity
    assert tiny.train.batch_size * tiny.train.grad_accum == shipped.train.batch_size * shipped.train.grad_accum

    kernel = platforms.kernel(platform)
    out, error = kernel.execute(cell(platform, profile, storage, workdir), timeout_s=420)
    assert error == "" and "exit 0: done" in out, out[-3000:]
    stored = platforms.stored(run)
    assert f"the LoRA is in {storage}/{run}/final/" in out, out[-2000:]
    assert (stored / "final" / "pytorch_lora_weights.safetensors").is_file(), out[-2000:]
    assert max(verified_steps(stored)) == STEPS
    rundir = run_dir_for(run, storage, platforms.env(platform))
    assert any(isinstance(e, ev.StepDone) for e in events_of(rundir)), "the cell followed another run folder"
    if platform == "colab":
        assert "final commit verified; ending the runtime" in out, out[-2000:]
        assert [c for c in calls(tmp) if c["call"] == "runtime.unassign" and c["in_kernel"]]
    else:
        assert not (tmp / "calls.jsonl").exists() or not [c for c in calls(tmp) if c["call"] == "runtime.unassign"]
    assert [s.get("platform") for s in sessions(stored)] == [platform]

    again, error = kernel.execute(cell(platform, profile, storage, workdir), timeout_s=240)
    assert error == "" and f"run {run!r} is complete" in again, again[-2000:]


@pytest.mark.exact_resume
@pytest.mark.slow
def test_two_profiles_of_one_run_continue_each_other_from_colab_to_kaggle(platforms):
    """sdxl-naruto-t4's session on Colab is stopped halfway (`relay stop --profile`, as a cut-off would
    end it); sdxl-naruto-kaggle-2xt4's cell on Kaggle resumes the same run, sdxl-naruto, to its end."""
    import subprocess

    tmp, steps = platforms.tmp, 4
    storage, workdir = platforms.storage, tmp / "work"
    colab = platforms.kernel("colab", RELAY_TEST_TINY_MODEL=str(steps), RELAY_TEST_STEP_DELAY_S="1.5")
    colab_env = platforms.env("colab")
    rundir = run_dir_for("sdxl-naruto", storage, colab_env)

    def stop_after_a_step() -> bool:
        if any(isinstance(e, ev.StepDone) for e in events_of(rundir)):
            subprocess.run([sys.executable, "-m", "runner", "stop", "--profile", "sdxl-naruto-t4", "--storage",
                            storage], env=colab_env, check=True, timeout=60)  # fmt: skip
            return True
        return False

    stopper = {"done": False}

    def interrupt_when() -> bool:  # never interrupts the cell: stops the trainer once, the cell sees exit 75
        if not stopper["done"]:
            stopper["done"] = stop_after_a_step()
        return False

    out, error = colab.execute(cell("colab", "sdxl-naruto-t4", storage, workdir), timeout_s=420,
                               interrupt_when=interrupt_when)  # fmt: skip
    assert error == "" and "exit 75: session over" in out, out[-3000:]
    first = max(verified_steps(platforms.stored("sdxl-naruto")))
    assert 0 < first < steps
    assert not [c for c in calls(tmp) if c["call"] == "runtime.unassign"], "released a runtime of an unfinished run"

    kaggle = platforms.kernel("kaggle", RELAY_TEST_TINY_MODEL=str(steps))
    out, error = kaggle.execute(cell("kaggle", "sdxl-naruto-kaggle-2xt4", storage, workdir), timeout_s=420)
    assert error == "" and "exit 0: done" in out, out[-3000:]
    stored = platforms.stored("sdxl-naruto")
    assert (stored / "final" / "pytorch_lora_weights.safetensors").is_file()
    done = sessions(stored)
    assert [s.get("platform") for s in done] == ["colab", "kaggle"], done
    assert (done[0]["step_to"], done[1]["step_from"], done[1]["step_to"]) == (first, first, steps), done
    assert (done[0]["gpu_count"], done[1]["gpu_count"]) == (1, 2), done  # one T4, then both of Kaggle's
    assert not platforms.drive.children(platforms.folder, "sdxl-naruto-t4")  # the run's key names the folder,
    assert not platforms.drive.children(platforms.folder, "sdxl-naruto-kaggle-2xt4")  # not the profile's name
