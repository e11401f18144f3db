"""Where the training examples come from, and the caption each trains with.

Owns: reading examples from a HF dataset (hub name or a folder written by
`Dataset.save_to_disk`), a local folder (same-name .txt captions or a
metadata.jsonl) or the "generated" source (deterministic coloured shapes), in
a stable order, limited by data.limit; the caption each example trains with
(data.instance_prompt, data.trigger_word); and refusing a source without
examples or captions (DataError, naming the file or column and what to set).
Images are opened lazily: a `Record` says how, decoding is runner.train.datacheck's.

Must not: decode images, touch the model, the cache files or storage.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from runner.errors import DataError
from runner.profile import DataConfig

GENERATED = "generated"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_FILE = "metadata.jsonl"
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
ASPECTS = ((1, 1), (3, 2), (2, 3), (2, 1))  # width:height of generated images


@dataclass(frozen=True)
class Record:
    """One example before decoding: a name for messages, a caption and a way to open the image."""

    name: str
    caption: str
    open_image: Callable[[], Image.Image]


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
