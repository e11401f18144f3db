"""The platforms Relay runs on, as tests can reproduce them: variables, paths, GPUs and stand-ins.

Each environment set is a module here that names the public source of every value it holds
(colab_t4, kaggle_t4x2, kaggle_p100, local). `apply()` puts one on the running test (variables,
sys.path for the stand-in packages, a fake `nvidia-smi` on PATH); `child_env()` gives the same
to a subprocess, so `python -m runner …` sees exactly what a `!python` cell would see there.

Stand-in packages live in folders that go on sys.path / PYTHONPATH, where the platform's image has
the real ones: kaggle/ (kaggle_secrets, kaggle_web_client: talk HTTP to `KaggleSecretsService`);
colab/ (google.colab, built by the notebook helper) when it exists. Paths such as /kaggle/working
cannot be faked for a subprocess: Relay checks variables before paths, so the sets need none.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
FAKE_BIN = HERE / "bin"
"""Holds a fake `nvidia-smi` that prints FAKE_NVIDIA_SMI_CSV (the query format env.py asks for)."""
FAKE_SMI_VAR = "FAKE_NVIDIA_SMI_CSV"
PLATFORM_PREFIXES = ("COLAB_", "KAGGLE_", "TBE_", "VERTEX_PRODUCT")
"""Variables of a real platform that the test machine's own environment must not leak into a set."""


@dataclass(frozen=True)
class PlatformEnv:
    """One platform as a process there sees it."""

    name: str
    platform: str
    """What runner.env.detect_platform must answer: colab, kaggle or local."""
    environ: Mapping[str, str]
    """The platform's own variables (secrets replaced by fakes)."""
    paths: frozenset[str] = frozenset()
    """Paths that exist there (for runner.env.detect_env's `exists`)."""
    nvidia_smi: str = ""
    """`nvidia-smi --query-gpu=name,memory.total,memory.free,compute_cap --format=csv,noheader,nounits`."""
    arch_list: tuple[str, ...] = ()
    """`torch.cuda.get_arch_list()` of the torch the platform ships; () for a CPU-only torch."""
    torch_version: str = ""
    stand_ins: tuple[Path, ...] = field(default_factory=tuple)
    """Folders of stand-in packages, first on sys.path."""
    source: str = ""

    def exists(self, path: str) -> bool:
        return path in self.paths

    def run(self, cmd: list[str]) -> str:
        """A command runner for runner.env.query_gpus: nvidia-smi answers as on the platform."""
        if cmd[0] != "nvidia-smi" or not self.nvidia_smi:
            raise FileNotFoundError(cmd[0])
        return self.nvidia_smi


def without_platform_vars(environ: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in environ.items() if not k.startswith(PLATFORM_PREFIXES)}


def child_env(plat: PlatformEnv, base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """The environment of a subprocess on `plat`: the set's variables over `base` (without the test
    machine's own platform variables), the stand-ins and the repository on PYTHONPATH, the fake
    nvidia-smi first on PATH (when the set has GPUs)."""
    env = without_platform_vars(os.environ if base is None else base)
    env.update(plat.environ)
    paths = [str(p) for p in plat.stand_ins] + [str(REPO)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    if plat.nvidia_smi:
        env["PATH"] = os.pathsep.join([str(FAKE_BIN), env.get("PATH", "")])
        env[FAKE_SMI_VAR] = plat.nvidia_smi
    env.update(extra)
    return env


def apply(monkeypatch, plat: PlatformEnv, **extra: str) -> PlatformEnv:
    """Make the running test see `plat` (undone by monkeypatch): variables, stand-ins on sys.path,
    the fake nvidia-smi on PATH. Returns `plat` for its `exists` and `run`."""
    for key in list(os.environ):
        if key.startswith(PLATFORM_PREFIXES):
            monkeypatch.delenv(key)
    for key, value in {**plat.environ, **extra}.items():
        monkeypatch.setenv(key, value)
    for folder in reversed(plat.stand_ins):
        monkeypatch.syspath_prepend(str(folder))
    if plat.nvidia_smi:
        monkeypatch.setenv("PATH", os.pathsep.join([str(FAKE_BIN), os.environ.get("PATH", "")]))
        monkeypatch.setenv(FAKE_SMI_VAR, plat.nvidia_smi)
    else:
        monkeypatch.setenv("PATH", os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                                                    if not (Path(p) / "nvidia-smi").exists()))  # fmt: skip
    return plat


def all_platforms() -> dict[str, PlatformEnv]:
    from tests.platforms import colab_t4, kaggle_p100, kaggle_t4x2, local

    return {m.ENV.name: m.ENV for m in (colab_t4, kaggle_t4x2, kaggle_p100, local)}
