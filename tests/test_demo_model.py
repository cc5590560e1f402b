"""Tests for the built-in demo model (trainer/models/demo)."""
from __future__ import annotations

import json
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from trainer.models import demo
from trainer.models.demo import score
from trainer.models.demo.shapes import (BACKGROUNDS, COLOURS, SHAPES, all_combinations,
                                        caption, draw)

STEPS = 30
GUIDANCE = 5.0
MAX_SECONDS_PER_IMAGE = 1.0   # one 64 px image, 30 steps with CFG, one CPU thread, best of 5. Measured
# 0.50-0.86 s on the shared 2-core machines here: the same code varies that much with the host's load
# (CPU time equals wall time, so it is the core's speed, not waiting); a CI run saw 0.85 s.
#: Every 5th of the 45 (colour, shape, background) combinations: 9 prompts that cover each colour, shape
#: and background; chosen by rule, not by result.
FEW = all_combinations()[::5]


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    return demo.load_pipeline()


def test_pipeline_loads_offline(pipe):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    assert isinstance(pipe, StableDiffusionPipeline)
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == demo.SIZE
    assert pipe.text_encoder.config.max_position_embeddings == pipe.tokenizer.model_max_length
    assert pipe.text_encoder.config.eos_token_id == pipe.tokenizer.eos_token_id
    assert pipe.text_encoder.config.bos_token_id == pipe.tokenizer.bos_token_id
    index = json.loads((demo.DEMO_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert not list(demo.DEMO_DIR.rglob("*.bin")), "weights must be safetensors"
    total = sum(p.stat().st_size for p in demo.DEMO_DIR.rglob("*") if p.is_file())
    assert total <= 20 * 1024 * 1024, f"weights are {total / 1e6:.1f} MB"


def test_missing_weights_give_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_demo"):
        demo.load_pipeline(path=tmp_path)


def _sample(pipe, combos, seeds):
    images = []
    for i in range(0, len(combos), 15):
        gens = [torch.Generator().manual_seed(seed) for seed in seeds[i:i + 15]]
        images += pipe([caption(*p) for p in combos[i:i + 15]], num_inference_steps=STEPS,
                       guidance_scale=GUIDANCE, height=64, width=64, generator=gens).images
    return images


def _read(img) -> tuple[str, str, str]:
    return score.dominant_colour(img), score.shape_of(img), score.background_colour(img)


def test_each_prompt_is_drawn_with_its_colour_shape_and_background(pipe):
    assert {c for c, _, _ in FEW} == set(COLOURS) and {s for _, s, _ in FEW} == set(SHAPES)
    assert {b for _, _, b in FEW} == set(BACKGROUNDS)
    for seed in (0, 1):
        images = _sample(pipe, FEW, [seed] * len(FEW))
        wrong = [(caption(*combo), _read(img)) for combo, img in zip(FEW, images) if _read(img) != combo]
        assert not wrong, f"seed {seed}: drawn wrong (asked, read as colour/shape/background): {wrong}"


def test_samples_follow_prompt(pipe):
    """All 45 prompts (seed = prompt index), 30 DDIM steps, CFG 5. Measured: 45 / 45 / 45 for colour /
    shape / background (also with seeds 100+ and 1000+); one miss each is tolerated so that a different
    CPU's rounding cannot fail the suite."""
    combos = all_combinations()
    images = _sample(pipe, combos, list(range(len(combos))))
    read = [_read(img) for img in images]
    colour_ok = sum(r[0] == c[0] for r, c in zip(read, combos))
    shape_ok = sum(r[1] == c[1] for r, c in zip(read, combos))
    bg_ok = sum(r[2] == c[2] for r, c in zip(read, combos))
    assert min(colour_ok, shape_ok, bg_ok) >= 44, f"colour {colour_ok}, shape {shape_ok}, background {bg_ok} of 45"


def test_sampling_is_fast(pipe):
    torch.set_num_threads(1)
    kw = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=64, width=64)
    pipe("a red circle on a white background", generator=torch.Generator().manual_seed(0), **kw)
    times = []
    for i in range(5):
        t0 = time.perf_counter()
        pipe("a blue square on a gray background",
             generator=torch.Generator().manual_seed(i), **kw)
        times.append(time.perf_counter() - t0)
    assert min(times) < MAX_SECONDS_PER_IMAGE, f"seconds per image: {times}"


def test_tokenizer_one_token_per_word(pipe):
    tok = pipe.tokenizer
    words = sorted({w for combo in all_combinations() for w in caption(*combo).split()})
    for w in words:
        ids = tok(w, add_special_tokens=False).input_ids
        assert len(ids) == 1, (w, ids)
        assert tok.convert_ids_to_tokens(ids) == [w + "</w>"]
    ids = tok(caption("red", "circle", "white"), padding="max_length",
              max_length=tok.model_max_length).input_ids
    assert len(ids) == tok.model_max_length == 16
    assert ids[0] == tok.bos_token_id and ids[8:] == [tok.eos_token_id] * 8


def test_tokenizer_files_work_for_slow_bpe():
    """vocab.json + merges.txt alone (what older, slow CLIPTokenizers read)
    also give one token per word."""
    from trainer.models.demo.train_demo import _bpe

    tdir = demo.DEMO_DIR / "tokenizer"
    vocab = json.loads((tdir / "vocab.json").read_text())
    lines = (tdir / "merges.txt").read_text().strip().split("\n")
    assert lines[0].startswith("#version")
    ranks = {tuple(m.split()): i for i, m in enumerate(lines[1:])}
    for w in {w for combo in all_combinations() for w in caption(*combo).split()}:
        assert _bpe(list(w[:-1]) + [w[-1] + "</w>"], ranks) == [w + "</w>"]
        assert w + "</w>" in vocab


def test_score_helpers_on_training_images():
    rng = random.Random(7)
    n = wrong = 0
    for k in range(4):
        for c, s, b in all_combinations():
            img = draw(c, s, b, jitter=rng if k else None)
            n += 1
            got = (score.dominant_colour(img), score.shape_of(img), score.background_colour(img))
            wrong += got != (c, s, b)
            assert score.colour_distance(img, COLOURS[c]) < 0.05
    assert wrong == 0, f"{wrong}/{n} training images misclassified"
    assert len(COLOURS) == 5 and len(SHAPES) == 3 and len(BACKGROUNDS) == 3
    assert not set(map(tuple, BACKGROUNDS.values())) & set(map(tuple, COLOURS.values()))
