"""Setup work rank 0 does for every rank, handed over through the shared work folder, not a collective.

Owns: the marker files by which rank 0 says "the latent cache (or the compile cache) is ready" to the
other ranks of the same launch, and the wait for them: the other ranks poll the work folder, logging
their progress, and never sit in a collective (barrier, broadcast) while rank 0 downloads or encodes.
A collective times out (NCCL's default is 10 minutes, torch.distributed.constants.default_pg_nccl_timeout)
and a first latent cache on a T4 takes 20-40 minutes: a rank waiting in one would die, and the launcher
would end rank 0 with it (issue 14, item 5b). Must not: import torch, or decide what the setup is.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

log = logging.getLogger(__name__)
POLL_S = 0.5
REPORT_EVERY_S = 60.0


def launch_id(environ: Mapping[str, str] | None = None) -> str:
    """What the ranks of one launch share and no other launch does: the launcher's process id (their
    parent: runner.launch or torchrun's agent) and the rendezvous port it chose. A port alone may come
    back in a later launch on the same VM, whose ranks must not take this launch's markers for theirs."""
    environ = os.environ if environ is None else environ
    return f"{os.getppid()}-{environ.get('MASTER_PORT', '0')}"


class Handoff:
    """Markers under WORKDIR/setup/LAUNCH/: rank 0 `mark`s a piece of setup done, the others `wait` for it."""

    def __init__(self, workdir: Path, launch: str, *, sleep: Callable[[float], None] = time.sleep,
                 monotonic: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.folder = Path(workdir) / "setup" / launch
        self.sleep, self.monotonic = sleep, monotonic

    def mark(self, what: str, payload: str = "") -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{what}.tmp"
        tmp.write_text(payload)
        os.replace(tmp, self.folder / what)  # whole or absent: a reader never sees half of it

    def wait(self, what: str, *, poll_s: float = POLL_S, report_every_s: float = REPORT_EVERY_S) -> str:
        """The payload rank 0 marked `what` with, once it has (polling; rank 0's launcher ends this rank if
        rank 0 fails, so no timeout is needed here)."""
        marker, started = self.folder / what, self.monotonic()
        reported = started
        while not marker.is_file():
            if self.monotonic() - reported >= report_every_s:
                reported = self.monotonic()
                log.info("waiting for rank 0 to finish the %s (%.0f s so far)", what, reported - started)
            self.sleep(poll_s)
        return marker.read_text()
