"""Training data: sources, image transforms and the order in which examples are seen.

Owns: reading examples from a HF dataset (hub name or a folder written by
`Dataset.save_to_disk`), a local folder (same-name .txt captions or a
metadata.jsonl) or the "generated" source (deterministic coloured shapes);
the caption each example trains with (data.instance_prompt, data.trigger_word);
the fast check of a dataset before any model loads (`validate_dataset`);
skipping and counting unreadable images; aspect-ratio buckets, square
resize + center crop, horizontal flip and the SDXL size conditioning; the
held-out validation split; and the pure step → batch order.

Order contract: every optimizer step consumes one *global* batch of
effective_batch = micro_batch × grad_accum × world examples, all from one
bucket. An epoch's global batches are built from a permutation seeded by
(seed, epoch): the permuted examples are grouped by bucket, each group is cut
into global batches and its last incomplete batch is filled up by wrapping
around to the start of the same group (so every example is seen every epoch
and every batch has the same size), and the batch list is shuffled with the
same seed. Step s uses batch s mod B of epoch s div B (B is the same for every
epoch). Rank r's micro-batch m is slice (m·world + r) of that batch. The data a
step consumes therefore depends only on (seed, step, effective batch), never on
saved RNG state nor on how the fit split the batch.

Must not: touch the model, the cache files or storage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps

from runner.errors import DataError
from runner.events import EventBus, Warning
from runner.profile import DataConfig

log = logging.getLogger(__name__)

GENERATED = "generated"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_FILE = "metadata.jsonl"
BAD_NAMES_SHOWN = 5  # unreadable files named in the warning
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # what PIL raises for a broken file
MAX_ASPECT = 4.0  # widest bucket is 4:1, tallest 1:4
VALIDATION_TAG = 2**31 - 1  # seeds the held-out permutation apart from every epoch
HOLD_OUT_ONE_IN = 10  # one example in ten (rounded up, at most data.validation_count) is held out for validation
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
ASPECTS = ((1, 1), (3, 2), (2, 3), (2, 1))  # width:height of generated images


@dataclass(frozen=True)
class Record:
    """One example before decoding: a name for messages, a caption and a way to open the image."""

    name: str
    caption: str
    open_image: Callable[[], Image.Image]


@dataclass(frozen=True)
class Prepared:
    """One transformed example: pixels in [-1, 1] and the SDXL size conditioning."""

    name: str
    caption: str
    pixels: torch.Tensor  # [3, H, W] float32
    time_ids: tuple[int, int, int, int, int, int]  # original h, w; crop top, left; target h, w
    bucket: int


@dataclass
class BadImages:
    """Unreadable images seen so far."""

    total: int
    names: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.names)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of the given integers (stable across Python runs)."""
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded by `derive_seed(*parts)`."""
    return torch.Generator().manual_seed(derive_seed(*parts))


# --- sources -------------------------------------------------------------------------------


def load_records(cfg: DataConfig, *, resolution: int) -> list[Record]:
    """The examples of `cfg.source` (images not yet decoded), in a stable order, limited by cfg.limit.

    Raises DataError when the source is empty, lacks the caption column or has non-text captions."""
    source = cfg.source
    if source == GENERATED:
        records = generated_records(cfg.generated_count, resolution)
    elif Path(source).expanduser().is_dir() and _is_saved_dataset(Path(source).expanduser()):
        records = _hf_records(cfg, _load_hf(source, cfg, from_disk=True))
    elif Path(source).expanduser().is_dir():
        records = _folder_records(Path(source).expanduser(), cfg)
    else:
        records = _hf_records(cfg, _load_hf(source, cfg, from_disk=False))
    if cfg.limit:
        records = records[: cfg.limit]
    if cfg.instance_prompt or cfg.trigger_word:
        records = [replace(r, caption=training_caption(r.caption, cfg)) for r in records]
    if not records:
        raise DataError(
            "the dataset has no examples", source=source, hint="check data.source, data.split and data.limit"
        )
    return records


def training_caption(caption: str, cfg: DataConfig) -> str:
    """The caption an example trains with: data.instance_prompt in place of its own when set, after
    data.trigger_word and a comma when set ("TRIGGER, caption")."""
    text = cfg.instance_prompt or caption
    if cfg.trigger_word:
        return f"{cfg.trigger_word}, {text}" if text else cfg.trigger_word
    return text


def _is_saved_dataset(path: Path) -> bool:
    return (
        (path / "dataset_info.json").is_file()
        or (path / "state.json").is_file()
        or (path / "dataset_dict.json").is_file()
    )


def _load_hf(source: str, cfg: DataConfig, *, from_disk: bool) -> Any:
    import datasets

    try:
        if from_disk:
            loaded = datasets.load_from_disk(str(Path(source).expanduser()))
            return loaded[cfg.split] if isinstance(loaded, datasets.DatasetDict) else loaded
        return datasets.load_dataset(source, split=cfg.split)
    except (FileNotFoundError, ValueError, KeyError, ConnectionError, OSError) as exc:
        raise DataError(
            f"cannot load the dataset (split {cfg.split!r}): {type(exc).__name__}: {exc}",
            source=source,
            hint='check data.source (a HF dataset name, a local folder of images, or "generated") and data.split; '
            "for a private dataset set HF_TOKEN",
        ) from exc


def _hf_records(cfg: DataConfig, dataset: Any) -> list[Record]:
    columns = list(dataset.column_names)
    needed = [(cfg.image_column, "data.image_column"), (cfg.caption_column, "data.caption_column")]
    if cfg.instance_prompt and cfg.caption_column not in columns:
        needed, captions = needed[:1], [""] * len(dataset)  # every image trains with the instance prompt
    for column, key in needed:
        if column not in columns:
            raise DataError(
                f"no column {column!r} ({key}); the dataset has {columns}", source=cfg.source, hint=f"set {key}"
            )
    if len(needed) == 2:
        captions = list(dataset[cfg.caption_column])
        _check_captions(captions, cfg.source, cfg.caption_column)

    def opener(i: int) -> Callable[[], Image.Image]:
        return lambda: _as_image(dataset[i][cfg.image_column])

    return [Record(f"{cfg.source}[{i}]", captions[i], opener(i)) for i in range(len(captions))]


def _as_image(value: Any) -> Image.Image:
    """A HF image cell (a PIL image, or {bytes|path}) as a PIL image."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict) and value.get("bytes"):
        import io

        return Image.open(io.BytesIO(value["bytes"]))
    if isinstance(value, dict) and value.get("path"):
        return Image.open(value["path"])
    raise OSError(f"not an image: {type(value).__name__}")


def _check_captions(captions: Sequence[Any], source: str, column: str) -> None:
    for i, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise DataError(
                f"caption {i} in column {column!r} is {type(caption).__name__}, not text",
                source=source,
                hint="point data.caption_column at a text column",
            )


def _folder_records(folder: Path, cfg: DataConfig) -> list[Record]:
    if (folder / METADATA_FILE).is_file():
        return _metadata_records(folder, cfg)
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    records = []
    for path in images:
        caption_file = path.with_suffix(".txt")
        if not caption_file.is_file() and cfg.instance_prompt:
            records.append(Record(path.name, "", _file_opener(path)))  # the instance prompt is its caption
            continue
        if not caption_file.is_file():
            raise DataError(
                f"image {path.name} has no caption file {caption_file.name}",
                source=str(folder),
                hint=f"add a .txt caption next to every image, or a {METADATA_FILE} with file_name and "
                f"{cfg.caption_column!r}, or set data.instance_prompt to train every image with one prompt",
            )
        records.append(Record(path.name, caption_file.read_text(encoding="utf-8").strip(), _file_opener(path)))
    return records


def _metadata_records(folder: Path, cfg: DataConfig) -> list[Record]:
    source = str(folder / METADATA_FILE)
    records = []
    for number, line in enumerate((folder / METADATA_FILE).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"line {number} is not JSON: {exc}", source=source) from exc
        if cfg.instance_prompt:
            row.setdefault(cfg.caption_column, "")
        if "file_name" not in row or cfg.caption_column not in row:
            raise DataError(
                f"line {number} lacks 'file_name' or the caption column {cfg.caption_column!r}",
                source=source,
                hint="each line needs file_name and the column named by data.caption_column",
            )
        _check_captions([row[cfg.caption_column]], source, cfg.caption_column)
        records.append(Record(row["file_name"], row[cfg.caption_column], _file_opener(folder / row["file_name"])))
    return records


def _file_opener(path: Path) -> Callable[[], Image.Image]:
    return lambda: Image.open(path)


def generated_records(count: int, resolution: int) -> list[Record]:
    """Coloured shapes on a light background, captioned, in a few aspect ratios (deterministic)."""
    records = []
    colours = list(COLOURS)
    for i in range(count):
        colour, shape = colours[i % len(colours)], SHAPES[(i // len(colours)) % len(SHAPES)]
        aspect = ASPECTS[i % len(ASPECTS)]
        records.append(
            Record(
                f"generated-{i:04d}",
                f"a {colour} {shape}, Naruto style",
                _shape_opener(i, colour, shape, aspect, resolution),
            )
        )
    return records


def _shape_opener(
    index: int, colour: str, shape: str, aspect: tuple[int, int], resolution: int
) -> Callable[[], Image.Image]:
    def draw() -> Image.Image:
        scale = resolution / math.sqrt(aspect[0] * aspect[1])
        width, height = round(aspect[0] * scale), round(aspect[1] * scale)
        image = Image.new("RGB", (width, height), (235 - index % 5 * 8, 235, 225))
        side = min(width, height) * 0.6
        left, top = (
            (width - side) / 2 + (index % 3 - 1.5) * side * 0.15,
            (height - side) / 2,
        )  # never centred: flips differ
        box = (left, top, left + side, top + side)
        pen = ImageDraw.Draw(image)
        if shape == "circle":
            pen.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            pen.rectangle(box, fill=COLOURS[colour])
        else:
            pen.polygon([(left + side / 2, top), (left, top + side), (left + side, top + side)], fill=COLOURS[colour])
        return image

    return draw


# --- decoding with bad-image accounting ----------------------------------------------------


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


# --- the fast check before any model loads -------------------------------------------------


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


# --- transforms ----------------------------------------------------------------------------


def make_buckets(resolution: int) -> list[tuple[int, int]]:
    """(width, height) buckets with area ≤ resolution², sides multiples of 64 (8 below 256 px), aspect ≤ 4."""
    step = 64 if resolution >= 256 else 8
    area = resolution * resolution
    buckets = set()
    width = step
    while width <= resolution * MAX_ASPECT:
        height = (area // width) // step * step
        if height >= step and max(width / height, height / width) <= MAX_ASPECT:
            buckets.add((width, height))
        width += step
    return sorted(buckets)


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is closest to the image's (ties: the larger area)."""
    ratio = math.log(width / height)
    return min(
        range(len(buckets)),
        key=lambda i: (abs(math.log(buckets[i][0] / buckets[i][1]) - ratio), -buckets[i][0] * buckets[i][1]),
    )


def prepare(
    record: Record, image: Image.Image, *, resolution: int, buckets: Sequence[tuple[int, int]] | None, flip: bool
) -> Prepared:
    """Resize to cover the target (a bucket, or resolution² square), center-crop, optionally flip."""
    width, height = image.size
    if buckets:
        bucket = nearest_bucket(width, height, buckets)
        target_w, target_h = buckets[bucket]
    else:
        bucket, target_w, target_h = 0, resolution, resolution
    scale = max(target_w / width, target_h / height)
    resized_w, resized_h = max(target_w, round(width * scale)), max(target_h, round(height * scale))
    image = image.resize((resized_w, resized_h), Image.Resampling.BICUBIC)
    left, top = (resized_w - target_w) // 2, (resized_h - target_h) // 2
    image = image.crop((left, top, left + target_w, top + target_h))
    if flip:
        image = ImageOps.mirror(image)
        left = resized_w - target_w - left
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0
    return Prepared(record.name, record.caption, pixels, (height, width, top, left, target_h, target_w), bucket)


# --- order ---------------------------------------------------------------------------------


def held_out_count(count: int, validation_count: int) -> int:
    """Examples held out for the validation loss: one in ten, rounded up, at most data.validation_count,
    so a small set of your own images loses one of them, not four."""
    return min(validation_count, -(-count // HOLD_OUT_ONE_IN))


def split_validation(count: int, validation_count: int, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices): `held_out_count` of them, a seeded choice; both sorted."""
    held = held_out_count(count, validation_count)
    if held >= count:
        raise DataError(
            f"{count} example(s) with {held} held out for validation leave none to train",
            hint="add images, or set data.validation_count = 0 (no validation)",
        )
    order = torch.randperm(count, generator=generator(seed, VALIDATION_TAG)).tolist()
    return sorted(order[held:]), sorted(order[:held])


def epoch_batches(buckets: Sequence[int], batch: int, seed: int, epoch: int) -> list[list[int]]:
    """The global batches of one epoch, as positions into `buckets` (one bucket id per training example)."""
    gen = generator(seed, epoch)
    order = torch.randperm(len(buckets), generator=gen).tolist()
    groups: dict[int, list[int]] = {}
    for position in order:
        groups.setdefault(buckets[position], []).append(position)
    result = []
    for bucket in sorted(groups):
        members = groups[bucket]
        for start in range(0, len(members), batch):
            result.append([members[(start + k) % len(members)] for k in range(batch)])
    shuffle = torch.randperm(len(result), generator=gen).tolist()
    return [result[i] for i in shuffle]


def batches_per_epoch(buckets: Sequence[int], batch: int) -> int:
    """B: the number of global batches in every epoch."""
    sizes: dict[int, int] = {}
    for bucket in buckets:
        sizes[bucket] = sizes.get(bucket, 0) + 1
    return sum(math.ceil(n / batch) for n in sizes.values())


@dataclass
class StepOrder:
    """Which training examples each optimizer step, micro-batch and rank consumes (a pure function of the step)."""

    buckets: Sequence[int]  # bucket id of each training example
    micro_batch: int
    grad_accum: int
    world: int
    seed: int
    _epochs: dict[int, list[list[int]]] = field(default_factory=dict, repr=False)

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world

    def step_batch(self, step: int) -> list[int]:
        """The global batch of optimizer step `step` (0-based)."""
        per_epoch = batches_per_epoch(self.buckets, self.global_batch)
        epoch, index = divmod(step, per_epoch)
        if epoch not in self._epochs:
            self._epochs = {epoch: epoch_batches(self.buckets, self.global_batch, self.seed, epoch)}
        return self._epochs[epoch][index]

    def micro(self, step: int, micro: int, rank: int = 0) -> list[int]:
        """Training-example positions of micro-batch `micro` on rank `rank` in step `step`."""
        slot = micro * self.world + rank
        return self.step_batch(step)[slot * self.micro_batch : (slot + 1) * self.micro_batch]

    def slot_offset(self, micro: int, rank: int = 0) -> int:
        """Position of that micro-batch's first example within the global batch."""
        return (micro * self.world + rank) * self.micro_batch
