"""The torch side of the GPU capability check: which kernels the installed torch ships.

Owns: reading `torch.cuda.get_arch_list()` and raising `env.UnsupportedGpu` before anything loads
when a visible GPU cannot run them (a P100, sm_60, under a cu128 torch: Kaggle/kaggle-cli #1151).
The decision itself is `env.gpu_unsupported_reason`, a pure function. Must not touch CUDA: the
arch list is compiled into torch and reading it initialises no device.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

from runner.env import UnsupportedGpu, detect_platform, gpu_unsupported_reason, query_gpus


def torch_arch_list() -> tuple[tuple[str, ...], str]:
    """(`torch.cuda.get_arch_list()`, torch's version); ((), "") when torch is missing."""
    try:
        import torch
    except ImportError:
        return (), ""
    return tuple(torch.cuda.get_arch_list()), torch.__version__


def ensure_gpus_supported(
    *,
    environ: Mapping[str, str] | None = None,
    exists: Callable[[str], bool] = os.path.exists,
    run: Callable[[list[str]], str] | None = None,
    arch: Callable[[], tuple[Sequence[str], str]] | None = None,
) -> None:
    """Raise UnsupportedGpu (exit 2) when a visible GPU cannot run the installed torch.

    No GPU (nvidia-smi missing or silent): nothing to check, and torch is not imported."""
    gpus = query_gpus(run)
    if not gpus:
        return
    arch_list, version = (arch or torch_arch_list)()
    platform = detect_platform(os.environ if environ is None else environ, exists)
    reason = gpu_unsupported_reason(gpus, arch_list, platform, version)
    if reason:
        raise UnsupportedGpu(reason)
