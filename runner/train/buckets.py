"""Aspect-ratio buckets and the image transform into one: resize to cover, center crop, optional flip,
and the SDXL size conditioning (original size, crop corner, target size) that goes with it.

Must not: read sources, touch the model, the cache files or storage.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from runner.train.sources import Record

MAX_ASPECT = 4.0  # widest bucket is 4:1, tallest 1:4


@dataclass(frozen=True)
class Prepared:
    """One transformed example: pixels in [-1, 1] and the SDXL size conditioning."""

    name: str
    caption: str
    pixels: torch.Tensor  # [3, H, W] float32
    time_ids: tuple[int, int, int, int, int, int]  # original h, w; crop top, left; target h, w
    bucket: int


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
