"""Dataset layer: scanning, captions, buckets, caches, sampling. Fast: tiny images and a fake VAE."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from trainer.data import Batch, BatchSampler, DatasetError, DatasetOptions, LatentCache, TextEmbeddingCache, assign_buckets, bucket_for, collate, latent_key, load_image_tensor, make_buckets, process_caption, resize_and_crop, scan_dataset
from trainer.models.handle import Cond


class FakeHandle:
    """Just what the caches use: a cheap deterministic 'VAE' (avg-pool by 8 + 1x1 conv) and text encoder."""

    identity = "fake"
    arch = "sdxl"
    vae_scale = 8

    def __init__(self):
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 1)
        self.image_calls = 0
        self.images_encoded = 0
        self.prompt_calls = []

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        self.image_calls += 1
        self.images_encoded += pixels.shape[0]
        return self.conv(torch.nn.functional.avg_pool2d(pixels, 8))

    def encode_prompts(self, texts, size):
        self.prompt_calls.append(list(texts))
        lengths = torch.tensor([[float(len(t))] for t in texts])
        return Cond(lengths.view(-1, 1, 1).expand(-1, 2, 3).clone(), lengths.expand(-1, 4).clone(),
                    torch.tensor([[size[0], size[1], 0, 0, size[0], size[1]]] * len(texts), dtype=torch.float32))

    def lock(self):
        import contextlib
        return contextlib.nullcontext()


def image(path: Path, size=(64, 64), color=(200, 30, 30), mode="RGB", caption: str | None = None,
          caption_ext=".txt") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    if caption is not None:
        path.with_suffix(caption_ext).write_text(caption, encoding="utf-8")
    return path


# --- scanning ------------------------------------------------------------------------------------

def test_scan_is_recursive_reads_txt_and_caption_files_and_counts_missing_captions(tmp_path):
    image(tmp_path / "a.png", caption="cat, red")
    image(tmp_path / "sub" / "b.jpg", caption="dog", caption_ext=".caption")
    image(tmp_path / "sub" / "deeper" / "c.webp")
    ds = scan_dataset(DatasetOptions(tmp_path))
    captions = {item.path.name: item.caption for item in ds.items}
    assert captions == {"a.png": "cat, red", "b.jpg": "dog", "c.webp": ""}
    assert ds.summary() == "3 images found, 2 captions"
    assert any("1 of 3 image(s) have no caption" in w for w in ds.warnings)
    assert all(len(item.sha256) == 64 and item.width == 64 for item in ds.items)


def test_folder_named_10_x_repeats_its_images_10_times(tmp_path):
    image(tmp_path / "10_cat" / "a.png", caption="cat")
    image(tmp_path / "10_cat" / "nested" / "b.png", caption="cat, sitting")
    image(tmp_path / "plain" / "c.png", caption="dog")
    ds = scan_dataset(DatasetOptions(tmp_path, trigger_word="sks"))
    repeats = {item.path.name: item.repeats for item in ds.items}
    assert repeats == {"a.png": 10, "b.png": 10, "c.png": 1}
    assert ds.num_samples == 21
    assert ds.summary() == "3 images found, 3 captions (21 samples per epoch with repeats)"
    assert ds.tag_frequency() == {"10_cat": {"cat": 2, "sks": 2, "sitting": 1},
                                  tmp_path.name: {"dog": 1, "sks": 1}}


def test_non_image_files_are_skipped_with_a_warning(tmp_path):
    image(tmp_path / "a.png", caption="x")
    (tmp_path / "notes.md").write_text("hello")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    ds = scan_dataset(DatasetOptions(tmp_path))
    assert len(ds.items) == 1
    assert len(ds.warnings) == 1 and "notes.md" in ds.warnings[0] and "not images" in ds.warnings[0]


def test_corrupt_zero_byte_and_truncated_images_are_skipped_with_a_warning_naming_them(tmp_path):
    image(tmp_path / "good.png", size=(64, 64))
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "garbage.jpg").write_bytes(b"this is not a jpeg at all")
    whole = image(tmp_path / "full.jpg", size=(256, 256)).read_bytes()
    (tmp_path / "full.jpg").unlink()
    (tmp_path / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    ds = scan_dataset(DatasetOptions(tmp_path))
    assert [item.path.name for item in ds.items] == ["good.png"]
    warning = next(w for w in ds.warnings if "corrupt" in w)
    assert "zero.png" in warning and "garbage.jpg" in warning and "truncated.jpg" in warning


def test_a_folder_of_only_corrupt_images_is_a_dataset_error(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DatasetError) as e:
        scan_dataset(DatasetOptions(tmp_path))
    assert e.value.field == "dataset_dir" and "bad.png" in str(e.value)


def test_an_empty_or_missing_folder_is_a_dataset_error_naming_the_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError) as e:
        scan_dataset(DatasetOptions(tmp_path / "empty"))
    assert str(e.value) == f"dataset folder '{tmp_path / 'empty'}' has no images (looked for .png .jpg .jpeg .webp)"
    assert e.value.field == "dataset_dir"
    with pytest.raises(DatasetError, match="does not exist"):
        scan_dataset(DatasetOptions(tmp_path / "missing"))


def test_exif_orientation_swaps_the_trained_sides(tmp_path):
    img = Image.new("RGB", (80, 40), (10, 20, 30))
    exif = img.getexif()
    exif[0x0112] = 6   # rotate 90 degrees when shown
    img.save(tmp_path / "rotated.jpg", exif=exif)
    item = scan_dataset(DatasetOptions(tmp_path)).items[0]
    assert (item.width, item.height) == (40, 80)
    assert load_image_tensor(item.path, (40, 80)).shape == (3, 80, 40)


def test_alpha_is_composited_on_white(tmp_path):
    image(tmp_path / "clear.png", size=(16, 16), color=(255, 0, 0, 0), mode="RGBA")
    pixels = load_image_tensor(tmp_path / "clear.png", (16, 16))
    assert pixels.shape == (3, 16, 16) and torch.allclose(pixels, torch.ones_like(pixels))


# --- captions ------------------------------------------------------------------------------------

def test_shuffle_keeps_the_trigger_word_first_and_the_first_keep_tokens_tags_in_place():
    options = DatasetOptions(".", trigger_word="sks", shuffle_captions=True, keep_tokens=2)
    caption = "a woman, red hair, smiling, outdoors, bokeh, sks, sunset, dress"
    rng = random.Random(0)
    seen_orders = set()
    for _ in range(50):
        tags = process_caption(caption, options, rng).split(", ")
        assert tags[:3] == ["sks", "a woman", "red hair"]
        assert sorted(tags[3:]) == sorted(["smiling", "outdoors", "bokeh", "sunset", "dress"])
        seen_orders.add(tuple(tags[3:]))
    assert len(seen_orders) > 10


def test_without_shuffle_the_caption_is_kept_as_written_behind_the_trigger_word():
    options = DatasetOptions(".", trigger_word="sks")
    assert process_caption("a photo of a dog, on grass", options, random.Random(0)) == "sks, a photo of a dog, on grass"
    assert process_caption("", options, random.Random(0)) == "sks"
    assert process_caption("sks, dog", options, random.Random(0)) == "sks, dog"


def test_caption_dropout_empties_about_p_of_the_captions_and_is_deterministic():
    options = DatasetOptions(".", trigger_word="sks", caption_dropout=0.2)
    rng = random.Random(1)
    draws = [process_caption("cat", options, rng) for _ in range(5000)]
    assert abs(draws.count("") / len(draws) - 0.2) < 0.02
    rng = random.Random(1)
    assert [process_caption("cat", options, rng) for _ in range(5000)] == draws


# --- buckets -------------------------------------------------------------------------------------

def test_buckets_are_multiples_of_64_within_the_area_and_side_limits():
    buckets = make_buckets(512, 256, 1024, 64)
    assert (512, 512) in buckets and (768, 320) in buckets and (320, 768) in buckets
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0
        assert w * h <= 512 * 512
        assert 256 <= w <= 1024 and 256 <= h <= 1024


def test_two_aspect_ratios_land_in_two_buckets_and_crop_to_them(tmp_path):
    image(tmp_path / "wide.png", size=(300, 150))
    image(tmp_path / "tall.png", size=(150, 300))
    image(tmp_path / "wide2.png", size=(400, 200))
    ds = scan_dataset(DatasetOptions(tmp_path, resolution=256, min_bucket_reso=128, max_bucket_reso=512))
    buckets = dict(zip((i.path.name for i in ds.items), assign_buckets(ds)))
    assert buckets["wide.png"] == buckets["wide2.png"] != buckets["tall.png"]
    w, h = buckets["wide.png"]
    assert (w, h) == (320, 192) and buckets["tall.png"] == (h, w)
    assert resize_and_crop(Image.open(tmp_path / "wide.png"), (w, h)).size == (w, h)
    ds_square = scan_dataset(DatasetOptions(tmp_path, resolution=256, enable_buckets=False))
    assert set(assign_buckets(ds_square)) == {(256, 256)}


def test_no_upscale_gives_small_images_a_bucket_no_larger_than_themselves():
    buckets = make_buckets(512, 256, 1024, 64)
    assert bucket_for(200, 150, buckets) == (576, 448)                   # upscaled to the nearest-ratio bucket
    assert bucket_for(200, 150, buckets, no_upscale=True, resolution=512) == (192, 128)
    assert bucket_for(300, 300, buckets, no_upscale=True, resolution=512) == (256, 256)
    # A large image still uses the shared bucket: covering it needs no enlargement.
    assert bucket_for(2000, 1500, buckets, no_upscale=True, resolution=512) == (576, 448)


# --- latent cache --------------------------------------------------------------------------------

def _dataset(tmp_path, **kw):
    image(tmp_path / "data" / "a.png", size=(64, 64), color=(255, 0, 0))
    image(tmp_path / "data" / "b.png", size=(64, 64), color=(0, 255, 0))
    image(tmp_path / "data" / "c.png", size=(128, 64), color=(0, 0, 255))
    options = DatasetOptions(tmp_path / "data", resolution=128, min_bucket_reso=64, max_bucket_reso=256, **kw)
    ds = scan_dataset(options)
    buckets = assign_buckets(ds)
    assert buckets == [(128, 128), (128, 128), (192, 64)]
    return ds, buckets


def test_latents_are_cached_on_disk_and_a_second_cache_encodes_nothing(tmp_path):
    ds, buckets = _dataset(tmp_path)
    handle = FakeHandle()
    first = LatentCache(tmp_path / "cache")
    latents = first.get_latents(list(zip(ds.items, buckets)), handle, batch_size=4)
    assert first.encoded == 3 and first.hits == 0
    assert handle.image_calls == 2          # one batch per bucket: (128, 128) for a and b, (192, 64) for c
    second = LatentCache(tmp_path / "cache")
    again = second.get_latents(list(zip(ds.items, buckets)), handle, batch_size=4)
    assert second.encoded == 0 and second.hits == 3 and handle.images_encoded == 3
    assert again.keys() == latents.keys()
    assert all(torch.equal(again[k], latents[k]) for k in latents)
    key = latent_key(ds.items[0].sha256, "fake", buckets[0])
    expected = handle.encode_images(load_image_tensor(ds.items[0].path, buckets[0])[None])[0]
    assert torch.allclose(latents[key], expected.detach(), atol=1e-6)


def test_changing_one_image_re_encodes_exactly_that_one(tmp_path):
    ds, buckets = _dataset(tmp_path)
    handle = FakeHandle()
    LatentCache(tmp_path / "cache").get_latents(list(zip(ds.items, buckets)), handle)
    image(tmp_path / "data" / "b.png", size=(64, 64), color=(9, 9, 9))
    ds2 = scan_dataset(ds.options)
    cache = LatentCache(tmp_path / "cache")
    cache.get_latents(list(zip(ds2.items, assign_buckets(ds2))), handle)
    assert cache.encoded == 1 and cache.hits == 2


def test_flip_caches_an_encoded_mirror_image_and_a_damaged_file_is_re_encoded(tmp_path):
    ds, buckets = _dataset(tmp_path)
    handle = FakeHandle()
    cache = LatentCache(tmp_path / "cache")
    latents = cache.get_latents(list(zip(ds.items, buckets)), handle, flip=True)
    assert cache.encoded == 6 and len(latents) == 6
    item, bucket = ds.items[2], buckets[2]
    flipped = latents[latent_key(item.sha256, "fake", bucket, True)]
    expected = handle.encode_images(load_image_tensor(item.path, bucket, flip=True)[None])[0].detach()
    assert torch.allclose(flipped, expected, atol=1e-6)
    cache.path_for(latent_key(item.sha256, "fake", bucket, True)).write_bytes(b"broken")
    again = LatentCache(tmp_path / "cache")
    again.get_latents(list(zip(ds.items, buckets)), handle, flip=True)
    assert again.encoded == 1 and again.hits == 5


# --- text embeddings -----------------------------------------------------------------------------

def test_text_embeddings_are_encoded_once_per_caption_and_size():
    handle, cache = FakeHandle(), TextEmbeddingCache()
    cond = cache.get(["a", "bb", "a"], (64, 64), handle)
    assert handle.prompt_calls == [["a", "bb"]] and len(cond) == 3
    assert cond.crossattn[:, 0, 0].tolist() == [1.0, 2.0, 1.0]
    cache.get(["bb", "ccc"], (64, 64), handle)
    assert handle.prompt_calls[-1] == ["ccc"]
    sdxl = cache.get(["bb"], (128, 64), handle)          # another size: new time ids, encoded again
    assert handle.prompt_calls[-1] == ["bb"] and sdxl.time_ids[0, 0].item() == 128


# --- sampling ------------------------------------------------------------------------------------

def test_batches_share_a_bucket_and_cover_each_item_repeats_times_per_epoch():
    buckets = [(64, 64)] * 5 + [(128, 64)] * 4
    repeats = [1, 2, 1, 1, 3, 1, 1, 1, 2]
    sampler = BatchSampler(repeats, buckets, batch_size=2, seed=7)
    seen = []
    for batch in [next(sampler) for _ in range(len(sampler))]:
        assert {buckets[i] for i in batch.indices} == {batch.bucket}
        seen += batch.indices
    assert sorted(seen) == sorted(i for i, r in enumerate(repeats) for _ in range(r))
    assert sampler.epoch_batches(0) != sampler.epoch_batches(1)       # reshuffled each epoch
    assert BatchSampler(repeats, buckets, 2, seed=7).epoch_batches(3) == sampler.epoch_batches(3)


def test_a_resumed_sampler_continues_the_uninterrupted_order_exactly():
    buckets = [(64, 64)] * 6 + [(128, 64)] * 5
    uninterrupted = BatchSampler([1] * 11, buckets, batch_size=3, seed=3)
    expected = [next(uninterrupted) for _ in range(20)]               # crosses several epochs
    first = BatchSampler([1] * 11, buckets, batch_size=3, seed=3)
    got = [next(first) for _ in range(7)]
    state = first.state_dict()
    resumed = BatchSampler([1] * 11, buckets, batch_size=3, seed=3)
    resumed.load_state_dict(state)
    got += [next(resumed) for _ in range(13)]
    assert got == expected
    assert [b.random().random() for b in got] == [b.random().random() for b in expected]


def test_collate_stacks_cached_latents_and_processes_captions(tmp_path):
    ds, buckets = _dataset(tmp_path, trigger_word="sks", flip_horizontal=True)
    handle = FakeHandle()
    latents = LatentCache(tmp_path / "cache").get_latents(list(zip(ds.items, buckets)), handle, flip=True)
    batch = Batch([0, 1], (128, 128), epoch=0, position=0, seed=1)
    stacked, captions = collate(batch, ds, latents, "fake")
    assert stacked.shape == (2, 4, 16, 16) and captions == ["sks", "sks"]


def test_a_link_loop_in_the_dataset_is_followed_once_and_the_scan_ends(tmp_path):
    import os
    import threading

    folder = tmp_path / "set"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (64, 64), "red").save(folder / "a.png")
    (folder / "a.txt").write_text("a")
    os.symlink(folder, folder / "sub" / "loop")          # a link back up the tree
    os.symlink(folder / "sub", folder / "again")          # the same folder under two names
    found = []
    scan = threading.Thread(target=lambda: found.append(scan_dataset(DatasetOptions(folder=folder))), daemon=True)
    scan.start()
    scan.join(20)
    assert not scan.is_alive(), "the scan never ended"
    assert [item.path.name for item in found[0].items] == ["a.png"]
