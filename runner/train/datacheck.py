"""Readable images: decoding each example with bad-image accounting, and the fast check of a dataset
before any model loads (`validate_dataset`).

Owns: skipping and counting unreadable images, refusing a dataset with more of them than
data.max_bad_fraction allows or with too few left to train (data.min_images, after the validation
hold-out), warning about empty captions, and the per-bucket histogram the user sees before training.

Must not: touch the model, the cache files or storage.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from PIL import Image, ImageOps

from runner.errors import DataError
from runner.events import EventBus, Warning
from runner.profile import DataConfig
from runner.train.buckets import make_buckets, nearest_bucket
from runner.train.order import held_out_count
from runner.train.sources import Record, load_records

log = logging.getLogger(__name__)

BAD_NAMES_SHOWN = 5  # unreadable files named in the warning
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # what PIL raises for a broken file


@dataclass
class BadImages:
    """Unreadable images seen so far."""

    total: int
    names: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.names)


def read_images(
    records: Sequence[Record], cfg: DataConfig, *, bus: EventBus | None = None
) -> Iterator[tuple[Record, Image.Image]]:
    """Decode each record's image as RGB, skipping unreadable ones.

    Emits one events.Warning naming the first few bad files at the end; raises DataError as soon as more
    than cfg.max_bad_fraction of the images are bad."""
    bad = BadImages(total=len(records))
    for record in records:
        try:
            image = _decode(record)
        except UNREADABLE as exc:
            bad.names.append(record.name)
            log.debug("skipping unreadable image %s: %s", record.name, exc)
            _check_bad(bad, cfg)
            continue
        yield record, image
    if bad.count:
        shown = ", ".join(bad.names[:BAD_NAMES_SHOWN]) + (", …" if bad.count > BAD_NAMES_SHOWN else "")
        message = f"skipped {bad.count} of {bad.total} unreadable images: {shown}"
        log.warning(message)
        if bus is not None:
            bus.emit(Warning(message, kind="skipped-images"))


def tolerated_bad(total: int, cfg: DataConfig) -> int:
    """How many unreadable images a dataset of `total` may have: data.max_bad_fraction of them, and at least
    one (one broken file among nine must not stop a run; data.min_images guards the small sets)."""
    return max(int(cfg.max_bad_fraction * total), 1)


def _decode(record: Record) -> Image.Image:
    image = record.open_image()
    image.load()  # the whole file: a truncated image fails here, not in the VAE pass
    return ImageOps.exif_transpose(image).convert("RGB")


def _check_bad(bad: BadImages, cfg: DataConfig) -> None:
    if bad.count > tolerated_bad(bad.total, cfg) or bad.count == bad.total:
        shown = ", ".join(bad.names[:BAD_NAMES_SHOWN])
        raise DataError(
            f"{bad.count} of {bad.total} images are unreadable (more than data.max_bad_fraction = "
            f"{cfg.max_bad_fraction:g}), e.g. {shown}",
            source=cfg.source,
            hint="remove or re-download the broken files, or raise data.max_bad_fraction",
        )


@dataclass(frozen=True)
class DatasetCheck:
    """What `validate_dataset` found."""

    total: int
    bad: tuple[str, ...]
    """Unreadable images (tolerated: the cache skips them)."""
    empty_captions: tuple[str, ...]
    """Images whose training caption is empty."""
    histogram: dict[str, int]
    """Readable images per bucket ("WxH" pixels), largest count first."""

    @property
    def good(self) -> int:
        return self.total - len(self.bad)

    def describe(self) -> str:
        shapes = ", ".join(f"{shape} ×{n}" for shape, n in self.histogram.items())
        skipped = f" ({len(self.bad)} unreadable skipped)" if self.bad else ""
        return f"{self.good} images{skipped} in {len(self.histogram)} bucket(s): {shapes}"


def validate_dataset(cfg: DataConfig, *, resolution: int, bus: EventBus | None = None) -> DatasetCheck:
    """Check a dataset in seconds, before any model is loaded or downloaded: captions present (the
    sources raise naming the file), every image readable, enough readable ones, and which bucket
    each falls in. Raises DataError (exit 2) naming the bad files; warns about the bad images it
    tolerates (data.max_bad_fraction, at least one) and about empty captions."""
    records = load_records(cfg, resolution=resolution)
    buckets = make_buckets(resolution) if cfg.buckets else None
    bad, empty, histogram = [], [], Counter()
    for record in records:
        try:
            width, height = _decode(record).size
        except UNREADABLE as exc:
            log.debug("unreadable image %s: %s", record.name, exc)
            bad.append(record.name)
            continue
        if not record.caption.strip():
            empty.append(record.name)
        bucket = buckets[nearest_bucket(width, height, buckets)] if buckets else (resolution, resolution)
        histogram[f"{bucket[0]}x{bucket[1]}"] += 1
    check = DatasetCheck(len(records), tuple(bad), tuple(empty), dict(histogram.most_common()))
    _refuse_unusable(check, cfg)
    _warn(bus, _names_message("unreadable images skipped", check.bad, check.total), "skipped-images")
    hint = "add captions, or set data.instance_prompt / data.trigger_word"
    _warn(bus, _names_message(f"images with an empty caption ({hint})", check.empty_captions, check.total), "data")
    log.info("dataset %s: %s; %d held out for validation", cfg.source, check.describe(),
             held_out_count(check.good, cfg.validation_count))  # fmt: skip
    return check


def _refuse_unusable(check: DatasetCheck, cfg: DataConfig) -> None:
    if check.bad and (len(check.bad) > tolerated_bad(check.total, cfg) or check.good == 0):
        raise DataError(
            _names_message("images are unreadable", check.bad, check.total, limit=len(check.bad))
            + f"; more than data.max_bad_fraction = {cfg.max_bad_fraction:g} allows",
            source=cfg.source,
            hint="remove or re-export the broken files, or raise data.max_bad_fraction",
        )
    held = held_out_count(check.good, cfg.validation_count)
    if check.good - held < cfg.min_images:  # the minimum counts the images that are trained on
        kept = f"; {held} held out for validation leave {check.good - held} to train" if held else ""
        raise DataError(
            f"only {check.good} readable image(s){kept}; data.min_images = {cfg.min_images} needed to train",
            source=cfg.source,
            hint="add images, or lower data.min_images" + (" or set data.validation_count = 0" if held else ""),
        )


def _names_message(what: str, names: Sequence[str], total: int, limit: int = BAD_NAMES_SHOWN) -> str:
    if not names:
        return ""
    shown = ", ".join(names[:limit]) + (", …" if len(names) > limit else "")
    return f"{len(names)} of {total} {what}: {shown}"


def _warn(bus: EventBus | None, message: str, kind: str) -> None:
    if message:
        log.warning(message)
        if bus is not None:
            bus.emit(Warning(message, kind=kind))
