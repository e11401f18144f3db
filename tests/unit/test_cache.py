"""The latent / text-embedding cache: what is written, what training reads back, and reuse without encoders."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from runner.errors import CheckpointCorrupt
from runner.events import CacheProgress, EventBus
from runner.profile import load_profile
from runner.train import cache as cache_mod
from runner.train.cache import build_cache, cache_fingerprint, encode_prompts, open_cache
from runner.train.testmodels import build_tiny

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_parts():
    return build_tiny(0)


def _profile(*overrides):
    return load_profile("tiny", ["data.generated_count=6", *overrides])


def test_build_writes_shards_and_index_and_reports_progress(tmp_path, tiny_parts):
    bus, seen = EventBus(), []
    bus.subscribe(seen.append)
    files = build_cache(_profile(), tmp_path, parts=tiny_parts, bus=bus)
    assert files == ["latents-00000.safetensors", "embeds-00000.safetensors", "index.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)  # no COMMIT.json: the checkpoint layer commits
    progress = [e for e in seen if isinstance(e, CacheProgress)]
    assert [(e.done, e.total) for e in progress] == [(i, 6) for i in range(1, 7)]
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["fingerprint"] == cache_fingerprint(_profile()) and len(index["examples"]) == 6


def test_cached_tensors_match_sdxl_conditioning(tmp_path, tiny_parts):
    build_cache(_profile(), tmp_path, parts=tiny_parts)
    data = open_cache(tmp_path)
    assert len(data) == 6
    assert data.prompt_embeds.shape == (6, 77, 64)  # [77, 2048] on full SDXL: both encoders concatenated
    assert data.pooled.shape == (6, 32)
    assert data.empty_prompt.shape == (77, 64)
    for i in range(6):
        assert data.latents[i].shape[0] == 4
        assert data.latents_flip[i].shape == data.latents[i].shape
        assert not torch.equal(data.latents_flip[i], data.latents[i])
        h, w = data.time_ids[i, 4:].tolist()
        assert data.latents[i].shape[1:] == (h // 8, w // 8)
    prompt, pooled = encode_prompts(tiny_parts, ["a red circle, Naruto style"], "cpu")
    assert torch.allclose(data.prompt_embeds[0].float(), prompt[0], atol=1e-2)  # stored as fp16
    assert len(set(data.buckets)) > 1  # the generated source fills several buckets


def test_no_flip_and_no_buckets(tmp_path, tiny_parts):
    build_cache(_profile("data.flip=false", "data.buckets=false"), tmp_path, parts=tiny_parts)
    data = open_cache(tmp_path)
    assert data.latents_flip is None and data.time_ids_flip is None
    assert {tuple(t.shape) for t in data.latents} == {(4, 8, 8)}


def test_shards_are_split_when_large(tmp_path, tiny_parts, monkeypatch):
    monkeypatch.setattr(cache_mod, "SHARD_BYTES", 3_000)
    files = build_cache(_profile(), tmp_path, parts=tiny_parts)
    assert len([f for f in files if f.startswith("embeds-")]) > 1
    assert len([f for f in files if f.startswith("latents-")]) > 1
    assert all((tmp_path / f).stat().st_size < 3_000 + 13_000 for f in files)  # one example over at most
    data = open_cache(tmp_path)
    assert len(data) == 6 and data.latents[5].shape[0] == 4


def test_second_run_with_the_cache_present_loads_no_encoder(tmp_path, tiny_parts):
    """What a session does (runner.checkpoint.store.ensure_latent_cache): build once, then reuse."""
    from runner.checkpoint.store import FolderStore, ensure_latent_cache
    from runner.events import EventBus
    from runner.storage.local import LocalStorage

    store = FolderStore(LocalStorage(tmp_path / "storage"), "run", tmp_path / "work")

    def ensure(profile, parts):
        build = lambda d: build_cache(profile, d, parts=parts)  # noqa: E731
        return open_cache(ensure_latent_cache(store, cache_fingerprint(profile), build, EventBus()))

    profile = _profile()
    first = ensure(profile, tiny_parts)

    def must_not_load():
        raise AssertionError("the cache is present: no VAE or text encoder may be loaded")

    second = ensure(profile, must_not_load)
    assert torch.equal(second.latents[3], first.latents[3])
    with pytest.raises(AssertionError, match="cache is present"):  # another resolution is another cache
        ensure(_profile("train.resolution=96"), must_not_load)


def test_fingerprint_covers_what_changes_the_tensors():
    base = cache_fingerprint(_profile())
    for override in ("train.resolution=96", "data.flip=false", "data.buckets=false", "model.vae=x", "data.limit=2"):
        assert cache_fingerprint(_profile(override)) != base, override
    for override in ("train.lr=0.01", "lora.rank=8", "data.caption_dropout=0.1", "data.validation_count=1"):
        assert cache_fingerprint(_profile(override)) == base, override


def test_damaged_cache_is_reported(tmp_path, tiny_parts):
    build_cache(_profile(), tmp_path, parts=tiny_parts)
    (tmp_path / "latents-00000.safetensors").write_bytes(b"truncated")
    with pytest.raises(CheckpointCorrupt):
        open_cache(tmp_path)
    with pytest.raises(CheckpointCorrupt):
        open_cache(tmp_path / "missing")


def test_shard_files_are_plain_safetensors(tmp_path, tiny_parts):
    build_cache(_profile(), tmp_path, parts=tiny_parts)
    embeds = load_file(str(tmp_path / "embeds-00000.safetensors"))
    assert embeds["empty.prompt"].dtype == torch.float16
    assert "0.prompt" in embeds and "0.pooled" in embeds


def test_caption_token_ids_are_cached_for_training_the_text_encoders(tmp_path, tiny_parts):
    profile = _profile("lora.text_encoder=true")
    assert cache_fingerprint(profile) != cache_fingerprint(_profile())  # a cache without token ids is not reused
    assert cache_fingerprint(_profile("lora.text_encoder_lr=1e-5")) == cache_fingerprint(_profile())
    build_cache(profile, tmp_path, parts=tiny_parts)
    data = open_cache(tmp_path)
    assert data.ids.shape == (6, 2, 77) and data.empty_ids.shape == (2, 77)
    caption = "a red circle, Naruto style"  # the first generated example's caption
    assert torch.equal(data.ids[0], cache_mod.tokenize(tiny_parts, [caption])[0])
    assert torch.equal(data.empty_ids, cache_mod.tokenize(tiny_parts, [""])[0])
    assert not torch.equal(data.ids[0], data.empty_ids)


def test_a_cache_built_in_pieces_reads_back_as_the_whole_cache(tmp_path, tiny_parts):
    profile = _profile()
    build_cache(profile, tmp_path / "whole", parts=tiny_parts)
    bus, seen = EventBus(), []
    bus.subscribe(seen.append)
    ranges = cache_mod.piece_ranges(profile, per_piece=4)
    assert ranges == [(0, 4), (4, 6)]
    builder = cache_mod.PieceBuilder(profile, total=6, bus=bus, parts=tiny_parts)
    pieces = []
    for k, (start, stop) in enumerate(ranges):
        pieces.append(f"piece-{k:05d}")
        builder(start, stop, tmp_path / "pieces" / pieces[-1])
    builder.close()
    cache_mod.merge_pieces(tmp_path / "pieces", pieces)
    whole, merged = open_cache(tmp_path / "whole"), open_cache(tmp_path / "pieces")
    assert merged.names == whole.names and merged.buckets == whole.buckets
    for field in ("latents", "latents_flip"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(merged, field), getattr(whole, field), strict=True))
    for field in ("time_ids", "time_ids_flip", "prompt_embeds", "pooled", "empty_prompt", "empty_pooled"):
        assert torch.equal(getattr(merged, field), getattr(whole, field)), field
    progress = [(e.done, e.total) for e in seen if isinstance(e, CacheProgress)]
    assert progress == [(i, 6) for i in range(1, 7)]  # counted over the dataset, not the piece
