"""Data sources, bad images, buckets and transforms, and the pure step → batch order."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from PIL import Image

from runner.errors import DataError
from runner.events import EventBus, Warning
from runner.profile import DataConfig
from runner.train import buckets as bucketing
from runner.train import datacheck, sources
from runner.train import order as ordering

RES = 64


def _image(path, size=(80, 60), colour=(200, 30, 30)):
    Image.new("RGB", size, colour).save(path)


def _decoded(cfg, bus=None):
    records = sources.load_records(cfg, resolution=RES)
    return [(r.name, r.caption, img.size) for r, img in datacheck.read_images(records, cfg, bus=bus)]


def test_folder_with_txt_captions(tmp_path):
    for i in range(3):
        _image(tmp_path / f"img{i}.png")
        (tmp_path / f"img{i}.txt").write_text(f"caption {i}\n")
    rows = _decoded(DataConfig(source=str(tmp_path)))
    assert [(n, c) for n, c, _ in rows] == [
        ("img0.png", "caption 0"),
        ("img1.png", "caption 1"),
        ("img2.png", "caption 2"),
    ]
    assert rows[0][2] == (80, 60)


def test_folder_image_without_caption_is_named(tmp_path):
    _image(tmp_path / "lonely.jpg")
    with pytest.raises(DataError, match="lonely.jpg"):
        sources.load_records(DataConfig(source=str(tmp_path)), resolution=RES)


def test_metadata_jsonl_with_caption_column(tmp_path):
    _image(tmp_path / "a.png")
    _image(tmp_path / "b.png", size=(40, 90))
    lines = [{"file_name": "a.png", "prompt": "first"}, {"file_name": "b.png", "prompt": "second"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    rows = _decoded(DataConfig(source=str(tmp_path), caption_column="prompt"))
    assert [(n, c, s) for n, c, s in rows] == [("a.png", "first", (80, 60)), ("b.png", "second", (40, 90))]
    with pytest.raises(DataError, match="'text'"):
        sources.load_records(DataConfig(source=str(tmp_path)), resolution=RES)


def test_generated_source_is_deterministic_with_several_aspect_ratios():
    cfg = DataConfig(source="generated", generated_count=8)
    first, second = _decoded(cfg), _decoded(cfg)
    assert first == second and len(first) == 8
    assert len({size for _, _, size in first}) >= 3
    assert all("Naruto style" in caption for _, caption, _ in first)
    records = sources.load_records(cfg, resolution=RES)
    assert records[1].open_image().tobytes() == records[1].open_image().tobytes()


def _saved_dataset(tmp_path, rows):
    import datasets

    path = tmp_path / "hf"
    datasets.Dataset.from_dict(rows).save_to_disk(str(path))
    return path


def test_hf_dataset_saved_to_disk(tmp_path):
    images = [Image.new("RGB", (64, 48), (i * 40, 0, 0)) for i in range(3)]
    path = _saved_dataset(tmp_path, {"image": images, "text": ["x", "y", "z"]})
    rows = _decoded(DataConfig(source=str(path), limit=2))
    assert [(c, s) for _, c, s in rows] == [("x", (64, 48)), ("y", (64, 48))]


def test_hf_dataset_missing_column_and_non_text_caption(tmp_path):
    images = [Image.new("RGB", (8, 8))] * 2
    path = _saved_dataset(tmp_path, {"image": images, "label": [1, 2]})
    with pytest.raises(DataError, match="data.caption_column") as info:
        sources.load_records(DataConfig(source=str(path)), resolution=RES)
    assert str(path) in str(info.value)
    with pytest.raises(DataError, match="not text"):
        sources.load_records(DataConfig(source=str(path), caption_column="label"), resolution=RES)


def test_empty_dataset_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no examples") as info:
        sources.load_records(DataConfig(source=str(tmp_path)), resolution=RES)
    assert str(tmp_path) in str(info.value)


def _folder_with_bad(tmp_path, good, bad):
    for i in range(good):
        _image(tmp_path / f"good{i}.png")
        (tmp_path / f"good{i}.txt").write_text("ok")
    for i in range(bad):
        full = tmp_path / "good0.png"
        (tmp_path / f"bad{i}.png").write_bytes(full.read_bytes()[:40] if i % 2 else b"not an image at all")
        (tmp_path / f"bad{i}.txt").write_text("broken")


def test_bad_images_are_skipped_counted_and_reported(tmp_path):
    _folder_with_bad(tmp_path, good=8, bad=2)
    bus, seen = EventBus(), []
    bus.subscribe(seen.append)
    rows = _decoded(DataConfig(source=str(tmp_path), max_bad_fraction=0.25), bus=bus)
    assert len(rows) == 8
    warnings = [e for e in seen if isinstance(e, Warning)]
    assert len(warnings) == 1 and warnings[0].kind == "skipped-images"
    assert "2 of 10" in warnings[0].message and "bad0.png" in warnings[0].message


def test_too_many_bad_images_is_a_data_error(tmp_path):
    _folder_with_bad(tmp_path, good=8, bad=2)
    with pytest.raises(DataError, match="max_bad_fraction"):
        _decoded(DataConfig(source=str(tmp_path), max_bad_fraction=0.1))


def test_buckets_have_target_area_and_aligned_sides():
    for resolution, step in ((1024, 64), (512, 64), (64, 8)):
        buckets = bucketing.make_buckets(resolution)
        assert (resolution, resolution) in buckets
        for w, h in buckets:
            assert w % step == 0 and h % step == 0
            assert w * h <= resolution * resolution and w * h > 0.8 * resolution * resolution
            assert max(w / h, h / w) <= bucketing.MAX_ASPECT


def test_prepare_buckets_crops_and_flips_with_size_conditioning():
    buckets = bucketing.make_buckets(RES)
    image = Image.new("RGB", (120, 60))
    image.paste((255, 0, 0), (0, 0, 10, 60))  # a red stripe on the left edge
    record = sources.Record("r", "c", lambda: image)
    plain = bucketing.prepare(record, image, resolution=RES, buckets=buckets, flip=False)
    flipped = bucketing.prepare(record, image, resolution=RES, buckets=buckets, flip=True)
    w, h = buckets[plain.bucket]
    assert plain.pixels.shape == (3, h, w) and w > h
    assert plain.time_ids[:2] == (60, 120) and plain.time_ids[4:] == (h, w)
    assert plain.pixels[0, h // 2, 0] > 0.9 and flipped.pixels[0, h // 2, -1] > 0.9
    square = bucketing.prepare(record, image, resolution=RES, buckets=None, flip=False)
    assert square.pixels.shape == (3, RES, RES) and square.time_ids[3] > 0  # center crop from the left


def test_epoch_batches_are_single_bucket_full_and_cover_every_example():
    buckets = [0, 0, 0, 1, 1, 2, 0, 1, 2, 2, 2]
    batches = ordering.epoch_batches(buckets, 4, seed=7, epoch=0)
    assert len(batches) == ordering.batches_per_epoch(buckets, 4)
    assert all(len(b) == 4 and len({buckets[i] for i in b}) == 1 for b in batches)
    assert set().union(*batches) == set(range(len(buckets)))
    assert batches == ordering.epoch_batches(buckets, 4, seed=7, epoch=0)
    assert batches != ordering.epoch_batches(buckets, 4, seed=7, epoch=1)


def test_step_order_is_a_pure_function_of_the_step_and_shards_ranks():
    buckets = [i % 3 for i in range(30)]
    one = ordering.StepOrder(buckets, micro_batch=2, grad_accum=2, world=2, seed=1)
    fresh = ordering.StepOrder(buckets, micro_batch=2, grad_accum=2, world=2, seed=1)
    for step in (0, 5, 17, 3):  # any order, any step: same answer without replaying earlier steps
        assert one.micro(step, 1, rank=1) == fresh.micro(step, 1, rank=1)
    step_batch = one.step_batch(9)
    shards = [one.micro(9, m, r) for m in range(2) for r in range(2)]
    assert sorted(sum(shards, [])) == sorted(step_batch)
    # the fit may split the same effective batch differently: the step still consumes the same examples
    split = ordering.StepOrder(buckets, micro_batch=1, grad_accum=8, world=1, seed=1)
    assert sorted(sum((split.micro(9, m) for m in range(8)), [])) == sorted(step_batch)


def test_every_epoch_is_a_permutation_and_consecutive_epochs_differ():
    """What the data holds, not just that it repeats: each epoch shows every example exactly once (one
    bucket, a batch that divides the set), and no two consecutive epochs show them in the same order."""
    count, batch = 24, 4
    order = ordering.StepOrder([0] * count, micro_batch=2, grad_accum=2, world=1, seed=42)
    per_epoch = ordering.batches_per_epoch([0] * count, batch)
    epochs = [sum((order.step_batch(e * per_epoch + i) for i in range(per_epoch)), []) for e in range(6)]
    for seen in epochs:
        assert sorted(seen) == list(range(count))
    for before, after in zip(epochs, epochs[1:], strict=False):
        assert before != after
    # with buckets, each epoch still covers every example (a bucket's last batch is filled up by wrapping)
    buckets = [i % 3 for i in range(20)]
    order = ordering.StepOrder(buckets, micro_batch=1, grad_accum=4, world=1, seed=42)
    per_epoch = ordering.batches_per_epoch(buckets, 4)
    firsts = []
    for epoch in range(4):
        seen = sum((order.step_batch(epoch * per_epoch + i) for i in range(per_epoch)), [])
        assert set(seen) == set(range(20))
        firsts.append(seen)
    assert all(a != b for a, b in zip(firsts, firsts[1:], strict=False))


def test_validation_split_is_seeded_and_disjoint():
    train, val = ordering.split_validation(40, 4, seed=3)
    assert len(val) == 4 and not set(train) & set(val) and len(train) == 36
    assert (train, val) == ordering.split_validation(40, 4, seed=3)
    with pytest.raises(DataError, match="validation_count = 0"):
        ordering.split_validation(1, 4, seed=3)


@pytest.mark.parametrize(("count", "held"), [(1221, 4), (36, 4), (24, 3), (8, 1), (6, 1), (5, 1), (3, 1)])
def test_the_hold_out_scales_with_the_dataset(count, held):
    train, val = ordering.split_validation(count, 4, seed=3)
    assert len(val) == held == ordering.held_out_count(count, 4) and len(train) == count - held
    assert ordering.split_validation(count, 0, seed=3) == (list(range(count)), [])


def test_the_minimum_counts_the_images_left_after_the_hold_out(tmp_path):
    _folder_with_bad(tmp_path, good=3, bad=0)
    with pytest.raises(DataError, match="1 held out for validation leave 2 to train") as raised:
        datacheck.validate_dataset(DataConfig(source=str(tmp_path)), resolution=RES)
    assert "data.validation_count = 0" in raised.value.hint
    for i in range(3, 6):
        _image(tmp_path / f"good{i}.png")
        (tmp_path / f"good{i}.txt").write_text("ok")
    assert datacheck.validate_dataset(DataConfig(source=str(tmp_path)), resolution=RES).good == 6  # 1 held, 5 trained


def test_limit_applies_to_every_source():
    cfg = replace(DataConfig(source="generated", generated_count=10), limit=3)
    assert len(sources.load_records(cfg, resolution=RES)) == 3


# --- instance prompt, trigger word, the fast check before the model loads -------------------


def _captioned_folder(folder, sizes, *, captions=True):
    for i, size in enumerate(sizes):
        _image(folder / f"img{i}.png", size=size)
        if captions:
            (folder / f"img{i}.txt").write_text(f"caption {i}")


def test_trigger_word_is_prepended_and_the_instance_prompt_replaces_every_caption(tmp_path):
    _captioned_folder(tmp_path, [(80, 60)] * 2)
    triggered = DataConfig(source=str(tmp_path), trigger_word="nrt")
    assert [c for _, c, _ in _decoded(triggered)] == ["nrt, caption 0", "nrt, caption 1"]
    instance = DataConfig(source=str(tmp_path), instance_prompt="Naruto style anime character")
    assert {c for _, c, _ in _decoded(instance)} == {"Naruto style anime character"}
    both = replace(instance, trigger_word="nrt")
    assert {c for _, c, _ in _decoded(both)} == {"nrt, Naruto style anime character"}
    assert sources.training_caption("", DataConfig(trigger_word="nrt")) == "nrt"


def test_an_instance_prompt_needs_no_caption_files_or_column(tmp_path):
    _captioned_folder(tmp_path, [(80, 60)] * 3, captions=False)
    with pytest.raises(DataError, match="instance_prompt"):  # the hint names the way out
        sources.load_records(DataConfig(source=str(tmp_path)), resolution=RES)
    cfg = DataConfig(source=str(tmp_path), instance_prompt="a photo of sks dog")
    assert [r.caption for r in sources.load_records(cfg, resolution=RES)] == ["a photo of sks dog"] * 3
    lines = [{"file_name": f"img{i}.png"} for i in range(3)]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    assert [r.caption for r in sources.load_records(cfg, resolution=RES)] == ["a photo of sks dog"] * 3


def test_instance_prompt_and_trigger_word_change_the_fingerprints():
    from runner.profile import Profile, diff_fields, fingerprint, fingerprint_fields
    from runner.train.cache import cache_fingerprint

    plain = Profile()
    for changed in (replace(plain.data, trigger_word="nrt"), replace(plain.data, instance_prompt="x")):
        other = replace(plain, data=changed)
        assert fingerprint(other) != fingerprint(plain) and cache_fingerprint(other) != cache_fingerprint(plain)
    older = {
        k: v for k, v in fingerprint_fields(plain).items() if k not in ("data.trigger_word", "data.instance_prompt")
    }
    assert diff_fields(older, fingerprint_fields(plain)) == {}  # a run.json from before these keys still resumes
    triggered = replace(plain, data=replace(plain.data, trigger_word="nrt"))
    assert diff_fields(older, fingerprint_fields(triggered)) == {"data.trigger_word": ("", "nrt")}


def test_validation_reports_the_bucket_histogram(tmp_path):
    _captioned_folder(tmp_path, [(1024, 1024)] * 3 + [(832, 1216)] * 2 + [(1344, 768)])
    check = datacheck.validate_dataset(DataConfig(source=str(tmp_path), validation_count=0), resolution=1024)
    assert check.total == check.good == 6 and check.bad == ()
    assert check.histogram == {"1024x1024": 3, "832x1216": 2, "1344x768": 1}
    assert check.describe() == "6 images in 3 bucket(s): 1024x1024 ×3, 832x1216 ×2, 1344x768 ×1"


def test_one_unreadable_image_among_nine_is_skipped_with_a_warning(tmp_path):
    _folder_with_bad(tmp_path, good=8, bad=1)
    bus, seen = EventBus(), []
    bus.subscribe(seen.append)
    check = datacheck.validate_dataset(DataConfig(source=str(tmp_path)), resolution=RES, bus=bus)
    assert check.good == 8 and check.bad == ("bad0.png",)
    warned = [e.message for e in seen if isinstance(e, Warning) and e.kind == "skipped-images"]
    assert warned == ["1 of 9 unreadable images skipped: bad0.png"]
    assert len(_decoded(DataConfig(source=str(tmp_path)))) == 8  # the cache pass skips it too


def test_too_many_unreadable_images_fail_fast_naming_every_one(tmp_path):
    _folder_with_bad(tmp_path, good=8, bad=3)
    with pytest.raises(DataError) as raised:
        datacheck.validate_dataset(DataConfig(source=str(tmp_path)), resolution=RES)
    assert raised.value.exit_code == 2
    assert "3 of 11 images are unreadable: bad0.png, bad1.png, bad2.png" in str(raised.value)
    assert "data.max_bad_fraction" in str(raised.value)


def test_too_few_readable_images_fail_fast(tmp_path):
    _folder_with_bad(tmp_path, good=2, bad=1)
    with pytest.raises(DataError, match="only 2 readable image"):
        datacheck.validate_dataset(DataConfig(source=str(tmp_path), validation_count=0), resolution=RES)
    _image(tmp_path / "good2.png")
    (tmp_path / "good2.txt").write_text("ok")
    with pytest.raises(DataError, match="1 held out for validation leave 2 to train"):
        datacheck.validate_dataset(DataConfig(source=str(tmp_path)), resolution=RES)
    assert datacheck.validate_dataset(DataConfig(source=str(tmp_path), validation_count=0), resolution=RES).good == 3


def test_empty_captions_are_named_in_a_warning(tmp_path):
    _captioned_folder(tmp_path, [(80, 60)] * 3)
    (tmp_path / "img1.txt").write_text("  \n")
    bus, seen = EventBus(), []
    bus.subscribe(seen.append)
    datacheck.validate_dataset(DataConfig(source=str(tmp_path), validation_count=0), resolution=RES, bus=bus)
    assert any("img1.png" in e.message and "empty caption" in e.message for e in seen if isinstance(e, Warning))
