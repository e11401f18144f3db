"""One process per GPU: start the ranks of a session and collect their exit codes.

Owns: launching `python -m runner ARGS` once per GPU with the rendezvous and a
fair share of CPU threads in each rank's environment, passing SIGTERM/SIGINT on
to every rank, and ending the others when one fails. Must not: train, read the
profile or touch storage; each rank runs the ordinary session.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping

from runner.secretfile import hand_over

log = logging.getLogger(__name__)


def launch_distributed(gpus: int) -> int:
    """Run this same command once per GPU (rank 0 leads, the others follow) and return rank 0's exit code.

    Not torchrun: its agent turns any non-zero exit (75 included) into a failure report. Signals that
    reach this parent (SIGTERM, SIGINT) are passed on to every rank, which stop after the current step."""
    with socket.socket() as sock:  # a free port for the process group's rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "runner", *sys.argv[1:]]
    envs = [
        hand_over(rank_env(os.environ, r, gpus, port, os.cpu_count() or 1)) for r in range(gpus)
    ]  # runner.secretfile
    procs = [subprocess.Popen(cmd, env=env) for env in envs]

    def forward(signum, _frame) -> None:
        for proc in procs:
            proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        codes = wait_all(procs)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("ranks exited with %s", codes)
    return codes[0] if codes[0] != 0 or all(c == 0 for c in codes) else max(codes, key=abs)


def rank_env(env: Mapping[str, str], rank: int, world: int, port: int, cpus: int) -> dict[str, str]:
    """The environment of one rank: the rendezvous, and the CPU cores shared out between the ranks.

    Each torch process otherwise sizes its CPU thread pool to the whole machine; several ranks then
    oversubscribe the cores (a Kaggle 2×T4 VM has 4), and spinning worker threads delay the ranks
    unevenly, when every step waits for the slowest one. A value the user set is kept."""
    threads = env.get("OMP_NUM_THREADS") or str(max(1, cpus // world))
    return {**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
            "RANK": str(rank), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": threads}  # fmt: skip


def wait_all(procs, poll_s: float = 0.5, grace_s: float = 30.0) -> list[int]:
    """Wait for every rank; when one fails, the others would wait for it forever in a collective, so they
    are terminated (after a grace period to finish on their own) and then killed."""
    while any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0) for p in procs):
            for p in procs:
                if p.poll() is None:
                    try:
                        p.wait(timeout=grace_s)
                    except subprocess.TimeoutExpired:
                        p.kill()
            break
        time.sleep(poll_s)
    return [p.wait() for p in procs]
