"""Experiments: the variants of one profile, each a run of its own, trained one after another.

Owns: EXP/experiment.json in the store (the variants in declared order with their runs, and the variants
that failed with bad input, with the error), choosing the variant a session trains next (pure), whether a
variant is complete (its final/ is committed), where the variants share their latent cache (EXP/cache/FP,
one cache for every variant with the same data, resolution and VAE), and listing a store's experiments.

A variant that fails with bad input is recorded and skipped while other variants are left to train; once
nothing else is left, it is tried again (once per `relay train`), so a fixed profile or data set is picked up
without a crash loop: a failure that remains ends the command with exit 2.

Must not: train (commands.py runs one Session per variant), import torch, or print.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

from runner.checkpoint.manifest import COMMIT
from runner.profile import Profile
from runner.storage import Storage
from runner.storage.blobs import read_bytes, write_bytes

EXPERIMENT_FILE = "experiment.json"


@dataclass(frozen=True)
class ExperimentRecord:
    """EXP/experiment.json: the variants (name → run, in declared order) and the failures (name → error)."""

    name: str
    variants: tuple[tuple[str, str], ...] = ()
    failed: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> bytes:
        data = {"experiment": self.name, "variants": [{"name": n, "run": r} for n, r in self.variants],
                "failed": self.failed}  # fmt: skip
        return json.dumps(data, indent=2).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> ExperimentRecord:
        data = json.loads(raw)
        variants = tuple((str(v["name"]), str(v["run"])) for v in data.get("variants", []))
        return cls(
            str(data.get("experiment", "")), variants, {str(k): str(v) for k, v in data.get("failed", {}).items()}
        )

    def runs(self) -> list[str]:
        return [run for _, run in self.variants]


def variant_runs(profile: Profile, run: str | None = None) -> list[tuple[str, str]]:
    """(variant, run) in declared order; `run` (--run) renames the experiment, and so every variant's run."""
    if run is None:
        return [(v.variant, v.run_name) for v in profile.variants]
    return [(v.variant, f"{run}--{v.variant}") for v in profile.variants]


def read_record(storage: Storage, experiment: str) -> ExperimentRecord | None:
    raw = read_bytes(storage, f"{experiment}/{EXPERIMENT_FILE}")
    if raw is None:
        return None
    try:
        return ExperimentRecord.from_json(raw)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None  # unreadable: rewritten from the profile by the next session


def open_record(storage: Storage, experiment: str, variants: list[tuple[str, str]]) -> ExperimentRecord:
    """The stored record brought up to the profile's variants (failures of variants still declared kept)."""
    old = read_record(storage, experiment)
    names = {n for n, _ in variants}
    failed = {k: v for k, v in (old.failed if old else {}).items() if k in names}
    record = ExperimentRecord(experiment, tuple(variants), failed)
    if record != old:
        write_bytes(storage, f"{experiment}/{EXPERIMENT_FILE}", record.to_json())
    return record


def record_failure(storage: Storage, record: ExperimentRecord, variant: str, error: str) -> ExperimentRecord:
    record = replace(record, failed={**record.failed, variant: error})
    write_bytes(storage, f"{record.name}/{EXPERIMENT_FILE}", record.to_json())
    return record


def clear_failure(storage: Storage, record: ExperimentRecord, variant: str) -> ExperimentRecord:
    if variant not in record.failed:
        return record
    record = replace(record, failed={k: v for k, v in record.failed.items() if k != variant})
    write_bytes(storage, f"{record.name}/{EXPERIMENT_FILE}", record.to_json())
    return record


def is_complete(storage: Storage, run: str) -> bool:
    """A variant is complete once its final/ is committed (its COMMIT.json is written last)."""
    return storage.exists(f"{run}/final/{COMMIT}")


def next_variant(order: list[str], complete: set[str], failed: set[str], tried: set[str]) -> str | None:
    """The variant to train next: the first in declared order that is neither complete nor tried in this
    command; one that failed before only when every other one is complete or failed. Pure."""
    pending = [v for v in order if v not in complete and v not in tried]
    fresh = [v for v in pending if v not in failed]
    return (fresh or pending or [None])[0]


def shared_cache_profile(profile: Profile) -> Profile:
    """The settings the shared latent cache is keyed by: a variant's, with the text-encoder switch on, since
    every cache holds the captions' token ids and a variant that trains the encoders reads them; variants with
    the same data, resolution and VAE then share one cache whatever their LoRA settings."""
    return replace(profile, lora=replace(profile.lora, text_encoder=True))


def list_experiments(storage: Storage) -> list[str]:
    return sorted({key.split("/")[0] for key in storage.list("") if key.endswith(f"/{EXPERIMENT_FILE}")})


def summary(record: ExperimentRecord, complete: set[str]) -> dict[str, Any]:
    """JSON-able: which variants are complete, failed, still to train."""
    return {
        "experiment": record.name,
        "complete": [n for n, _ in record.variants if n in complete],
        "failed": dict(record.failed),
        "left": [n for n, _ in record.variants if n not in complete and n not in record.failed],
    }
