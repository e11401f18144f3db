"""The latent and text-embedding cache.

Owns: encoding every training image once with the VAE (both flips when
data.flip) and every caption once with both text encoders (plus the empty
caption, used by caption dropout), and keeping each caption's token ids for
both tokenizers (what a run that trains the text encoders encodes at every
step, since its embeddings change as it trains); writing them as safetensors shards of at
most ~32 MB (`latents-00000.safetensors`, `embeds-00000.safetensors`, …) and
an `index.json`; reading them back for training without any encoder; and the
cache fingerprint that says when a cache can be reused.

Must not: write COMMIT.json, know about storage or uploads (the checkpoint
layer commits and uploads the folder), or keep the VAE and text encoders alive
after building.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from runner.errors import CheckpointCorrupt, ModelError
from runner.events import CacheProgress, EventBus
from runner.profile import Profile
from runner.train.buckets import make_buckets, prepare
from runner.train.datacheck import read_images, validate_dataset
from runner.train.loading import load_parts
from runner.train.lora import TextEncoders, text_conditioning
from runner.train.model import SDXLParts
from runner.train.sources import load_records

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the layout or the encoding changes
INDEX_FILE = "index.json"
SHARD_BYTES = 32 * 2**20  # an interrupted upload of one shard loses at most this much
EMPTY = "empty"  # key prefix of the empty-caption embedding
EMBED_DTYPE = torch.float16  # embeddings are stored in fp16: half the upload, the UNet sees fp16 on GPU anyway

PartsSource = SDXLParts | Callable[[], SDXLParts] | None


@dataclass
class CachedData:
    """Everything training needs, in CPU memory, indexed by example."""

    names: list[str]
    buckets: list[int]  # bucket id per example (same shape latents share a bucket)
    latents: list[torch.Tensor]  # [4, h, w] float32, scaled by the VAE scaling factor
    latents_flip: list[torch.Tensor] | None  # the mirrored image's latents; None without data.flip
    time_ids: torch.Tensor  # [N, 6] SDXL size conditioning
    time_ids_flip: torch.Tensor | None
    prompt_embeds: torch.Tensor  # [N, 77, 2048 on SDXL]
    pooled: torch.Tensor  # [N, 1280 on SDXL]
    empty_prompt: torch.Tensor  # [77, 2048]
    empty_pooled: torch.Tensor  # [1280]
    fingerprint: str
    ids: torch.Tensor | None = None  # [N, 2, 77] token ids for each tokenizer; None in caches built before them
    empty_ids: torch.Tensor | None = None  # [2, 77] the empty caption's

    def __len__(self) -> int:
        return len(self.names)


def cache_fingerprint(profile: Profile) -> str:
    """A short hash of every setting that changes the cached tensors."""
    d, m = profile.data, profile.model
    fields = {
        "format": CACHE_FORMAT,
        "model": [m.base, m.vae, m.revision, m.variant],
        "data": [d.source, d.image_column, d.caption_column, d.split, d.limit, d.generated_count, d.buckets, d.flip]
        + ([d.instance_prompt, d.trigger_word] if d.instance_prompt or d.trigger_word else []),
        "resolution": profile.train.resolution,
    }
    if profile.lora.text_encoder:  # needs the token ids, which older caches lack; others keep their fingerprint
        fields["token_ids"] = True
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


class _ShardWriter:
    """Collects tensors and writes `PREFIX-NNNNN.safetensors` files of at most SHARD_BYTES."""

    def __init__(self, out_dir: Path, prefix: str) -> None:
        self.out_dir, self.prefix = out_dir, prefix
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[str] = []

    @property
    def current(self) -> str:
        return f"{self.prefix}-{len(self.files):05d}.safetensors"

    def add(self, tensors: dict[str, torch.Tensor]) -> str:
        """Queue tensors; returns the shard file they will land in."""
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.pending and self.pending_bytes + size > SHARD_BYTES:
            self.flush()
        # clone: a row of a batch is a view of the whole batch's storage, which safetensors would write out
        self.pending.update(
            {k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}
        )
        self.pending_bytes += size
        return self.current

    def flush(self) -> None:
        if self.pending:
            save_file(self.pending, str(self.out_dir / self.current))
            self.files.append(self.current)
            self.pending, self.pending_bytes = {}, 0


def tokenize(parts: SDXLParts, captions: list[str]) -> torch.Tensor:
    """[B, 2, 77] token ids of each caption for the first and second tokenizer (padded, truncated)."""
    ids = [
        tokenizer(
            captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        for tokenizer in (parts.tokenizer, parts.tokenizer_2)
    ]
    return torch.stack(ids, dim=1)


@torch.no_grad()
def encode_prompts(parts: SDXLParts, captions: list[str], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL text conditioning: ([B, 77, D1+D2] penultimate hidden states of both encoders, [B, P] pooled)."""
    ids = tokenize(parts, captions).to(device)
    encoders = TextEncoders(parts.text_encoder, parts.text_encoder_2)
    prompt, pooled = text_conditioning(encoders, ids[:, 0], ids[:, 1])
    return prompt.float(), pooled.float()


@torch.no_grad()
def encode_images(vae: Any, pixels: torch.Tensor, device: str) -> torch.Tensor:
    """Scaled latents (the mean of the VAE posterior, so the cache is deterministic), float32 on CPU."""
    pixels = pixels.to(device=device, dtype=vae.dtype)
    latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
    if not torch.isfinite(latents).all():
        raise ModelError(
            "the VAE produced non-finite latents (the stock SDXL VAE overflows in fp16)",
            hint='set model.vae = "madebyollin/sdxl-vae-fp16-fix", or encode on CPU',
        )
    return latents.float().cpu().contiguous()


def _resolve_parts(profile: Profile, parts: PartsSource, device: str) -> SDXLParts:
    if isinstance(parts, SDXLParts):
        return parts
    if callable(parts):
        return parts()
    on_gpu = device.startswith("cuda")
    loaded = load_parts(profile.model, unet=False, device=device, dtype=torch.float16 if on_gpu else None)
    if on_gpu and not profile.model.vae:
        loaded.vae.to(torch.float32)  # the stock SDXL VAE overflows in fp16; the fp16-fix VAE does not
    return loaded


def build_cache(
    profile: Profile, out_dir: Path, *, parts: PartsSource = None, bus: EventBus | None = None, device: str = "cpu",
    records_range: tuple[int, int] | None = None,
) -> list[str]:  # fmt: skip
    """Encode the dataset into `out_dir` (shards + index.json) and return the file names written.

    `parts` is an SDXLParts, a function returning one, or None (load from profile.model). Encoders are
    dropped before returning. `records_range` (start, stop): only those records, one piece of a cache
    built in pieces (see merge_pieces); their tensors are keyed from `start` so pieces never collide."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg, resolution = profile.data, profile.train.resolution
    if records_range is None:  # built in pieces, PieceBuilder checks the whole dataset once, before the first
        validate_dataset(cfg, resolution=resolution, bus=bus)  # a bad folder fails here, before the model loads
    records = load_records(cfg, resolution=resolution)
    first = 0
    if records_range is not None:
        first, stop = records_range
        records = records[first:stop]
    buckets = make_buckets(resolution) if cfg.buckets else None
    model = _resolve_parts(profile, parts, device)
    latents, embeds = _ShardWriter(out_dir, "latents"), _ShardWriter(out_dir, "embeds")
    prompt, pooled = encode_prompts(model, [""], device)
    embeds.add(
        {
            f"{EMPTY}.prompt": prompt[0].to(EMBED_DTYPE),
            f"{EMPTY}.pooled": pooled[0].to(EMBED_DTYPE),
            f"{EMPTY}.ids": tokenize(model, [""])[0],
        }
    )
    examples = []
    for record, image in read_images(records, cfg):  # validate_dataset warned about the bad files
        i = first + len(examples)
        views = [prepare(record, image, resolution=resolution, buckets=buckets, flip=False)]
        if cfg.flip:
            views.append(prepare(record, image, resolution=resolution, buckets=buckets, flip=True))
        encoded = encode_images(model.vae, torch.stack([v.pixels for v in views]), device)
        tensors = {f"{i}.latent": encoded[0], f"{i}.time_ids": torch.tensor(views[0].time_ids)}
        if cfg.flip:
            tensors.update({f"{i}.latent_flip": encoded[1], f"{i}.time_ids_flip": torch.tensor(views[1].time_ids)})
        prompt, pooled = encode_prompts(model, [record.caption], device)
        examples.append(
            {
                "name": record.name,
                "key": i,
                "bucket": views[0].bucket,
                "latents": latents.add(tensors),
                "embeds": embeds.add(
                    {
                        f"{i}.prompt": prompt[0].to(EMBED_DTYPE),
                        f"{i}.pooled": pooled[0].to(EMBED_DTYPE),
                        f"{i}.ids": tokenize(model, [record.caption])[0],
                    }
                ),
            }
        )
        if bus is not None:
            bus.emit(CacheProgress(done=len(examples), total=len(records)))
    latents.flush()
    embeds.flush()
    del model
    _free_memory()
    index = {"format": CACHE_FORMAT, "fingerprint": cache_fingerprint(profile), "flip": cfg.flip, "examples": examples}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=1))
    log.info("cache built: %d examples, %d files in %s", len(examples), len(latents.files) + len(embeds.files), out_dir)
    return [*latents.files, *embeds.files, INDEX_FILE]


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def read_index(cache_dir: Path) -> dict[str, Any] | None:
    """The cache's index.json, or None when there is none (or it is unreadable)."""
    try:
        return json.loads((cache_dir / INDEX_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def open_cache(cache_dir: Path) -> CachedData:
    """Load a built cache for training (no VAE or text encoder needed).

    Raises CheckpointCorrupt when index.json or a shard is missing or incomplete."""
    index = read_index(cache_dir)
    if index is None or index.get("format") != CACHE_FORMAT:
        raise CheckpointCorrupt(f"no readable cache index (format {CACHE_FORMAT}) in {cache_dir}", path=str(cache_dir))
    shards: dict[str, dict[str, torch.Tensor]] = {}
    try:
        for entry in index["examples"]:
            for name in (entry["latents"], entry["embeds"]):
                if name not in shards:
                    shards[name] = load_file(str(cache_dir / name))
        empty = index.get("empty", "embeds-00000.safetensors")  # the shard holding the empty caption's embedding
        first_embeds = shards.get(empty) or load_file(str(cache_dir / empty))
        return _assemble(index, shards, first_embeds)
    except (OSError, KeyError, ValueError, RuntimeError, SafetensorError) as exc:
        raise CheckpointCorrupt(f"cache in {cache_dir} is incomplete or damaged: {exc}", path=str(cache_dir)) from exc


def _assemble(
    index: dict[str, Any], shards: dict[str, dict[str, torch.Tensor]], first: dict[str, torch.Tensor]
) -> CachedData:
    examples, flip = index["examples"], index["flip"]

    def get(i: int, key: str, kind: str) -> torch.Tensor:
        return shards[examples[i][kind]][f"{examples[i].get('key', i)}.{key}"]

    count = len(examples)
    has_ids = f"{EMPTY}.ids" in first
    return CachedData(
        names=[e["name"] for e in examples],
        buckets=[e["bucket"] for e in examples],
        latents=[get(i, "latent", "latents") for i in range(count)],
        latents_flip=[get(i, "latent_flip", "latents") for i in range(count)] if flip else None,
        time_ids=torch.stack([get(i, "time_ids", "latents") for i in range(count)]) if count else torch.zeros(0, 6),
        time_ids_flip=torch.stack([get(i, "time_ids_flip", "latents") for i in range(count)])
        if flip and count
        else None,
        prompt_embeds=torch.stack([get(i, "prompt", "embeds") for i in range(count)]),
        pooled=torch.stack([get(i, "pooled", "embeds") for i in range(count)]),
        empty_prompt=first[f"{EMPTY}.prompt"],
        empty_pooled=first[f"{EMPTY}.pooled"],
        fingerprint=index["fingerprint"],
        ids=torch.stack([get(i, "ids", "embeds") for i in range(count)]) if has_ids and count else None,
        empty_ids=first[f"{EMPTY}.ids"] if has_ids else None,
    )


# --- a cache built in pieces ------------------------------------------------------------------

PIECE_RECORDS = 64  # records per piece: a killed first session loses at most one piece of encoding


def piece_ranges(profile: Profile, per_piece: int = PIECE_RECORDS) -> list[tuple[int, int]]:
    """(start, stop) record ranges of the pieces the latent cache is built in (loads no image)."""
    count = len(load_records(profile.data, resolution=profile.train.resolution))
    return [(start, min(start + per_piece, count)) for start in range(0, count, per_piece)]


class PieceBuilder:
    """`build_cache` of one record range at a time (store.ensure_latent_cache_in_pieces calls it per
    piece), loading the encoders once, at the first piece it builds; `close()` frees them. Progress
    events count over the whole dataset, not the piece."""

    def __init__(self, profile: Profile, *, total: int, bus: EventBus | None = None, device: str = "cpu",
                 parts: PartsSource = None) -> None:  # fmt: skip
        self.profile, self.total, self.bus, self.device, self.parts = profile, total, bus, device, parts
        self._loaded: SDXLParts | None = None
        self._start = 0
        self._validated = False

    def _encoders(self) -> SDXLParts:
        if self._loaded is None:
            self._loaded = _resolve_parts(self.profile, self.parts, self.device)
        return self._loaded

    def _validate_once(self) -> None:
        """The whole dataset, checked in seconds before the first piece loads a model (not once per piece)."""
        if not self._validated:
            validate_dataset(self.profile.data, resolution=self.profile.train.resolution, bus=self.bus)
            self._validated = True

    def emit(self, event: Any) -> None:
        if isinstance(event, CacheProgress):
            event = CacheProgress(done=self._start + event.done, total=self.total)
        if self.bus is not None:
            self.bus.emit(event)

    def __call__(self, start: int, stop: int, folder: Path) -> None:
        self._validate_once()
        self._start = start
        build_cache(self.profile, folder, parts=self._encoders, bus=self, device=self.device,  # type: ignore[arg-type]
                    records_range=(start, stop))  # fmt: skip

    def close(self) -> None:
        self._loaded = None
        _free_memory()


def merge_pieces(out_dir: Path, pieces: list[str]) -> None:
    """Write out_dir/index.json over the pieces (sub-folders of out_dir, each a cache of a record range
    with its own index.json), in order: open_cache(out_dir) then reads them as one cache."""
    indexes = [read_index(out_dir / piece) for piece in pieces]
    if not indexes or any(index is None for index in indexes):
        raise CheckpointCorrupt(f"a piece of the cache in {out_dir} has no readable index", path=str(out_dir))
    examples = [
        {**e, "latents": f"{piece}/{e['latents']}", "embeds": f"{piece}/{e['embeds']}"}
        for piece, index in zip(pieces, indexes, strict=True)
        for e in index["examples"]
    ]
    first = indexes[0]
    index = {"format": CACHE_FORMAT, "fingerprint": first["fingerprint"], "flip": first["flip"],
             "empty": f"{pieces[0]}/{first.get('empty', 'embeds-00000.safetensors')}", "examples": examples}  # fmt: skip
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=1))
