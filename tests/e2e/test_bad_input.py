"""Bad input through the real command line: a clear message naming the file or field, never a traceback.

Each case runs `python -m runner train …` in a subprocess, as a user would (bad datasets run the
same CLI in-process, to import torch once), with a bad profile (file or --set), a bad dataset
(corrupt images, missing captions, wrong columns, no images), a bad storage URL or bad Drive
credentials, and checks the exit code (2: bad input, fixable
before any work; 1: an error found while working), that stderr names what is wrong, and that
no Python traceback reaches the user.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from runner.errors import EXIT_REFUSED, EXIT_USAGE
from tests.e2e.conftest import REPO, relay_env, relay_main, train_args

PROFILE_TIMEOUT_S = 120
DATA_TIMEOUT_S = 300


def relay(args: list[str], *, env: dict[str, str] | None = None, timeout_s: float = PROFILE_TIMEOUT_S):
    return subprocess.run([sys.executable, "-m", "runner", *args], cwd=REPO, capture_output=True, text=True,
                          env=env or relay_env(), timeout=timeout_s)  # fmt: skip


def assert_clear(done: subprocess.CompletedProcess, code: int, *names: str) -> None:
    err = done.stderr
    assert done.returncode == code, f"exit {done.returncode}, expected {code}\nstderr:\n{err[-3000:]}"
    assert "Traceback" not in err + done.stdout, f"a traceback reached the user:\n{err[-3000:]}"
    for name in names:
        assert name in err, f"{name!r} is not named in the error:\n{err[-3000:]}"


def tiny_toml(tmp_path: Path, replace: tuple[str, str] | None = None, append: str = "") -> Path:
    text = (REPO / "profiles" / "tiny.toml").read_text()
    if replace:
        assert replace[0] in text
        text = text.replace(*replace)
    path = tmp_path / "bad.toml"
    path.write_text(text + append)
    return path


# (id, --set items, names the error must contain)
BAD_SETS = [
    ("rank zero", ["lora.rank=0"], ["lora.rank"]),
    ("negative lr", ["train.lr=-1"], ["train.lr"]),
    ("lr not a number", ["train.lr=abc"], ["train.lr"]),
    ("fractional rank", ["lora.rank=2.5"], ["lora.rank"]),
    ("unknown optimizer", ["train.optimizer=sgd"], ["train.optimizer"]),
    ("unknown precision", ["train.precision=fp8"], ["train.precision"]),
    ("unknown key", ["train.stepz=5"], ["train.stepz"]),
    ("unknown section", ["nosuch.key=1"], ["nosuch"]),
    ("keep zero", ["checkpoint.keep=0"], ["checkpoint.keep"]),
    ("steps zero", ["train.steps=0"], ["train.steps"]),
    ("override without =", ["train.lr"], ["train.lr"]),
]


@pytest.mark.parametrize("sets, names", [pytest.param(s, n, id=i) for i, s, n in BAD_SETS])
def test_bad_override_is_named(sets, names, tmp_path):
    args = ["train", "--profile", "tiny", "--storage", str(tmp_path / "s"), "--workdir", str(tmp_path / "w")]
    for item in sets:
        args += ["--set", item]
    assert_clear(relay(args), 2, *names)
    assert not (tmp_path / "s" / "tiny").exists(), "bad input must be refused before the run is created"


@pytest.mark.parametrize(
    "edit, names",
    [
        pytest.param(("[train]", "[train\n"), ["bad.toml"], id="toml syntax error"),
        pytest.param(("steps = 40", 'steps = "forty"'), ["bad.toml", "train.steps"], id="string for an integer"),
        pytest.param(("rank = 4", "rank = 4\nrnak = 8"), ["bad.toml", "lora.rnak"], id="misspelt key in file"),
        pytest.param(("resolution = 64", "resolution = 65"), ["bad.toml", "train.resolution"], id="resolution"),
    ],
)
def test_bad_profile_file_is_named(edit, names, tmp_path):
    path = tiny_toml(tmp_path, edit)
    args = ["train", "--profile", str(path), "--storage", str(tmp_path / "s"), "--workdir", str(tmp_path / "w")]
    assert_clear(relay(args), 2, *names)


def test_unknown_profile_name(tmp_path):
    args = ["train", "--profile", "no-such-profile", "--storage", str(tmp_path / "s")]
    assert_clear(relay(args), 2, "no-such-profile")


# ---------------------------------------------------------------- datasets


def _images(folder: Path, count: int, *, captions: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (40, 40), (40 * i % 255, 90, 160)).save(folder / f"img{i}.png")
        if captions:
            (folder / f"img{i}.txt").write_text(f"a test image number {i}")


def _metadata(folder: Path, rows: list[dict]) -> None:
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def dataset_case(case: str, root: Path) -> tuple[Path, list[str]]:
    """A bad dataset folder and the words its error must contain."""
    folder = root / "data"
    if case == "no images":
        folder.mkdir(parents=True)
        return folder, [str(folder)]
    if case == "all images corrupt":
        folder.mkdir(parents=True)
        for i in range(4):
            (folder / f"img{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
            (folder / f"img{i}.txt").write_text("a caption")
        return folder, [str(folder)]
    if case == "missing captions":
        _images(folder, 4, captions=False)
        return folder, [str(folder)]
    if case == "metadata with wrong columns":
        _images(folder, 4, captions=False)
        _metadata(folder, [{"file": f"img{i}.png", "caption": "x"} for i in range(4)])
        return folder, [str(folder)]
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["no images", "all images corrupt", "missing captions", "metadata with wrong columns"])
def test_bad_dataset_is_named(case, tmp_path, capsys):
    """In this process (the data is read after torch loads; a subprocess each would cost its imports)."""
    folder, names = dataset_case(case, tmp_path)
    code = relay_main(train_args(tmp_path / "s", tmp_path / "w", steps=2, extra=(f"data.source={folder}",)))
    out = capsys.readouterr()
    done = subprocess.CompletedProcess([], code, out.out, out.err)
    assert code == 2, f"exit {code} (a bad dataset is bad input):\n{out.err[-3000:]}"
    assert_clear(done, code, *names)
    assert "ended: bad input (exit 2)" in out.out, f"the printed end disagrees with the exit code:\n{out.out[-2000:]}"
    assert not [p for p in (tmp_path / "s").rglob("*")], "a refused new run left files in storage"


# ---------------------------------------------------------------- storage and credentials


@pytest.mark.parametrize(
    "url, names",
    [
        pytest.param("s3://bucket/runs", ["s3://bucket/runs"], id="unsupported scheme"),
        pytest.param("gdrive://", ["gdrive://"], id="gdrive without folder"),
        pytest.param("gdrive://abc?token=x", ["gdrive://"], id="gdrive with parameters"),
    ],
)
def test_bad_storage_url_is_named(url, names, tmp_path):
    args = ["train", "--profile", "tiny", "--storage", url, "--workdir", str(tmp_path / "w")]
    done = relay(args)
    assert_clear(done, 2, *names)
    assert "token=x" not in done.stderr or "?" not in url, "a URL parameter (maybe a secret) was echoed"


@pytest.mark.parametrize("what", ["garbage file", "missing file", "garbage value", "service account without key"])
def test_bad_drive_credentials_are_named_without_secrets(what, tmp_path):
    secret = "SUPERSECRET-refresh-1234567890"
    cred = tmp_path / "cred.json"
    if what == "garbage file":
        cred.write_text("this is { not json " + secret)
        value, names = str(cred), [str(cred)]
    elif what == "missing file":
        value, names = str(tmp_path / "nowhere.json"), ["nowhere.json"]
    elif what == "garbage value":
        value, names = '{"type": "authorized_user", "refresh_token": "' + secret + '"}', ["RELAY_GDRIVE_CREDENTIALS"]
    else:
        cred.write_text(json.dumps({"type": "service_account", "client_email": "x@y", "private_key_id": secret}))
        value, names = str(cred), [str(cred)]
    env = relay_env({"RELAY_GDRIVE_CREDENTIALS": value, "HOME": str(tmp_path / "home")})
    args = ["train", "--profile", "tiny", "--storage", "gdrive://1AbCdEfGhIjKlMnOpQrStUvWxYz012345", "--workdir",
            str(tmp_path / "w")]  # fmt: skip
    done = relay(args, env=env)
    assert done.returncode in (EXIT_USAGE, EXIT_REFUSED), (
        f"exit {done.returncode}:\n{done.stderr[-3000:]}"
    )  # never restarted
    assert_clear(done, done.returncode, *names)
    assert secret not in done.stderr + done.stdout, "the secret was echoed in an error"


# ---------------------------------------------------------------- one exit-code rule, printed and returned alike


def ended_line(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in done.stdout.splitlines() if "ended: " in line]
    assert lines, f"no end line printed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return lines[-1].split("ended: ", 1)[1]


def test_a_lease_held_by_a_live_session_refuses_with_the_printed_code(tmp_path):
    from runner.clock import SystemClock, iso

    wall = SystemClock().wall()
    lease = {"holder": "kaggle:othervm:pid7:abc", "token": "t", "since": iso(wall), "heartbeat_wall": wall,
             "timeout_s": 300.0}  # fmt: skip
    (tmp_path / "s" / "tiny").mkdir(parents=True)
    (tmp_path / "s" / "tiny" / "lease.json").write_text(json.dumps(lease))
    done = relay(["train", "--profile", "tiny", "--storage", str(tmp_path / "s"), "--workdir", str(tmp_path / "w"),
                  "--plain"])  # fmt: skip
    assert_clear(done, 3, "another session is training this run", "--take-over")
    assert ended_line(done) == "refused: another session holds the lease (exit 3)"


def test_a_refused_resume_prints_the_code_it_returns(tmp_path):
    from runner.clock import iso
    from runner.profile import fingerprint, fingerprint_fields, load_profile
    from runner.state import RunInfo, write_run_info
    from runner.storage.local import LocalStorage

    other = load_profile("tiny", ["lora.rank=8"])  # the stored run was trained with another rank
    write_run_info(LocalStorage(tmp_path / "s"), RunInfo(
        run="tiny", profile=other.to_dict(), fingerprint=fingerprint(other),
        fingerprint_fields=fingerprint_fields(other), target=40, created=iso(0.0),
    ))  # fmt: skip
    done = relay(["train", "--profile", "tiny", "--storage", str(tmp_path / "s"), "--workdir", str(tmp_path / "w"),
                  "--plain"])  # fmt: skip
    assert_clear(done, 2, "lora.rank", "--force")
    assert ended_line(done) == "refused: settings differ from the stored run (exit 2)"


def test_a_storage_folder_that_cannot_be_created_is_bad_input(tmp_path):
    done = relay(["train", "--profile", "tiny", "--storage", "/proc/relay-x", "--workdir", str(tmp_path / "w")])
    assert_clear(done, 2, "/proc/relay-x")


def test_status_of_an_unknown_run_is_bad_input(tmp_path):
    (tmp_path / "s").mkdir()
    done = relay(["status", "--storage", str(tmp_path / "s"), "--run", "nope"])
    assert_clear(done, 2, "no run named 'nope'")


@pytest.mark.parametrize(
    ("flags", "names", "not_named"),
    [
        pytest.param(
            ["--hours", "-1"],
            ["--hours -1", "session.hours"],
            "tiny.toml",
            id="--hours",
        ),  # fmt: skip
        pytest.param(["--set", "train.lr=abc"], ["--set train.lr=abc", "train.lr"], "tiny.toml", id="--set"),
    ],
)
def test_a_bad_flag_value_is_blamed_on_the_flag_not_the_profile_file(flags, names, not_named, tmp_path):
    done = relay(["train", "--profile", "tiny", "--storage", str(tmp_path / "s"), "--workdir", str(tmp_path / "w"),
                  *flags])  # fmt: skip
    assert_clear(done, 2, *names)
    assert not_named not in done.stderr, f"the profile file was blamed for a flag's value:\n{done.stderr}"
