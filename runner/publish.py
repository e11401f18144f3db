"""Publishing a finished run's final/ to a Hugging Face model repo, as one commit.

Owns: `publish_final` (fetch the committed final/ from the run's storage, verify it against its
COMMIT.json, push its files — both LoRA files, the model card README.md, the sample grid — to
USER/NAME in ONE commit, creating the repo public or private), `publish_at_completion` (the
same, when the profile's [publish] section asks for it) and the `relay publish` command.

Must not: train or export (final/ must already be committed: `relay train` to the target or
`relay export` writes it); print or store the token (the Hub backend handles it); publish
Relay's own bookkeeping (COMMIT.json stays behind).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from runner.checkpoint.manifest import COMMIT, fetch_folder
from runner.clock import Clock
from runner.errors import CheckpointCorrupt, UsageError
from runner.profile import PublishConfig
from runner.storage import Storage

log = logging.getLogger(__name__)

FINAL = "final"


@dataclass(frozen=True)
class Published:
    repo_id: str
    files: tuple[str, ...]
    """Files pushed (COMMIT.json excluded)."""

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.repo_id}"


def publish_final(
    storage: Storage,
    run: str,
    *,
    repo_id: str = "",
    public: bool = False,
    env: Mapping[str, str] | None = None,
    clock: Clock | None = None,
) -> Published:
    """Push RUN/final/ from `storage` to the model repo `repo_id` (default YOUR_NAME/RUN) as one commit."""
    from runner.storage.hub import open_hub, token_user

    env = os.environ if env is None else env
    target = repo_id or f"{token_user(env, clock=clock)}/{run}"
    if target.count("/") != 1 or not all(target.split("/")):
        raise UsageError(f"--repo {target!r} is not USER/NAME", hint="e.g. --repo alice/naruto-lora")
    with tempfile.TemporaryDirectory(prefix="relay-publish-") as tmp:
        local = Path(tmp) / FINAL
        try:
            manifest = fetch_folder(storage, f"{run}/{FINAL}", local)
        except CheckpointCorrupt as exc:
            raise UsageError(
                f"{storage.url}/{run}/{FINAL} is not a finished export ({exc.message})",
                hint="train the run to its target (relay train) or write final/ with relay export, then publish",
            ) from None
        names = sorted(manifest["files"])
        hub = open_hub(f"hf://{target}", env=env, clock=clock, private=not public)
        hub.commit_folder(local, "", names)
    log.info("published %s/%s/%s to %s (%d files)", storage.url, run, FINAL, target, len(names))
    return Published(target, tuple(n for n in names if n != COMMIT))


def publish_at_completion(
    storage: Storage, run: str, config: PublishConfig, *, env: Mapping[str, str] | None = None
) -> Published | None:
    """What a session calls once final/ is committed: publish when [publish] enabled = true, else nothing."""
    if not config.enabled:
        return None
    return publish_final(storage, run, repo_id=config.repo, public=config.public, env=env)


def publish_command(args: argparse.Namespace) -> int:
    """`relay publish --storage URL [--run NAME] [--repo USER/NAME] [--public]`."""
    from runner.state import find_run
    from runner.storage.url import open_storage

    storage = open_storage(args.storage)
    run = find_run(storage, args.run)
    published = publish_final(storage, run, repo_id=args.repo or "", public=args.public)
    print(f"published {run}'s final/ ({', '.join(published.files)}) to {published.url}")
    return 0
