"""Build and train the built-in demo model from scratch (CPU, one thread).

    python -m trainer.models.demo.train_demo [--out DIR] [--vae-steps N] [--unet-steps N]

Writes a diffusers ``StableDiffusionPipeline`` folder (model_index.json, unet/,
vae/, text_encoder/, tokenizer/, scheduler/; safetensors) to
``trainer/models/demo/weights/`` unless ``--out`` says otherwise.

Steps: word-level CLIP tokenizer -> random frozen tiny CLIP text encoder ->
tiny AutoencoderKL trained until every colour reconstructs -> tiny
UNet2DConditionModel trained on precomputed latents / text embeddings ->
DDIM scheduler with trailing timestep spacing.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from trainer.models.demo.shapes import BACKGROUNDS, COLOURS, SHAPES, all_combinations, caption, draw

DEFAULT_OUT = Path(__file__).resolve().parent / "weights"
MAX_LEN = 16
SEED = 1234

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
WORDS = ["a", "on", "background", *COLOURS, *SHAPES, *BACKGROUNDS]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- tokenizer
def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Plain BPE (same algorithm as CLIP's / the tokenizers library)."""
    word = list(symbols)
    while len(word) > 1:
        pairs = [(ranks.get((word[i], word[i + 1]), math.inf), i) for i in range(len(word) - 1)]
        best, i = min(pairs)
        if best == math.inf:
            break
        a, b = word[i], word[i + 1]
        out, j = [], 0
        while j < len(word):
            if j < len(word) - 1 and word[j] == a and word[j + 1] == b:
                out.append(a + b)
                j += 2
            else:
                out.append(word[j])
                j += 1
        word = out
    return word


def build_vocab_and_merges(words: list[str]) -> tuple[dict[str, int], list[str]]:
    """Vocab + merges so that every word becomes the single token ``word</w>``.

    Words are added one after the other: the existing merges are applied to
    the new word's characters, then merges joining the resulting pieces left
    to right are appended (lower priority, so earlier words are unaffected).
    """
    vocab: dict[str, int] = {}

    def add(tok: str) -> None:
        if tok not in vocab:
            vocab[tok] = len(vocab)

    add(BOS)
    add(EOS)
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    # base symbols first (characters, with and without the end-of-word mark)
    for w in words:
        for ch in w[:-1]:
            add(ch)
        add(w[-1] + "</w>")
    for w in words:
        pieces = _bpe(list(w[:-1]) + [w[-1] + "</w>"], ranks)
        while len(pieces) > 1:
            a, b = pieces[0], pieces[1]
            merges.append((a, b))
            ranks[(a, b)] = len(merges) - 1
            add(a + b)
            pieces = [a + b] + pieces[2:]
        assert pieces == [w + "</w>"], (w, pieces)
    for w in words:  # sanity: the full merge table still gives one token per word
        assert _bpe(list(w[:-1]) + [w[-1] + "</w>"], ranks) == [w + "</w>"], w
    return vocab, [f"{a} {b}" for a, b in merges]


def build_tokenizer(tmp: Path):
    from transformers import CLIPTokenizer

    vocab, merges = build_vocab_and_merges(WORDS)
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "vocab.json").write_text(json.dumps(vocab, indent=1))
    (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], model_max_length=MAX_LEN,
                        bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token=EOS)
    check_tokenizer(tok)
    return tok, vocab, merges


def check_tokenizer(tok) -> None:
    for w in WORDS:
        ids = tok(w, add_special_tokens=False).input_ids
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids)[0] == w + "</w>", (w, ids)
    ids = tok(caption("red", "circle", "white"), padding="max_length",
              max_length=MAX_LEN).input_ids
    assert ids[0] == tok.bos_token_id and len(ids) == MAX_LEN, ids
    assert ids[8] == tok.eos_token_id, ids
    log(f"tokenizer ok: vocab {len(tok)}; every caption word is one token")


# ------------------------------------------------------------- text encoder
def build_text_encoder(tok):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(SEED + 1)
    cfg = CLIPTextConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_LEN,
        projection_dim=64, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)
    te = CLIPTextModel(cfg).eval()
    te.requires_grad_(False)
    return te


# ---------------------------------------------------------------------- VAE
def build_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(SEED + 2)
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64), layers_per_block=1, latent_channels=4,
        norm_num_groups=8, sample_size=64, mid_block_add_attention=False)


def to_tensor(imgs) -> torch.Tensor:
    a = np.stack([np.asarray(im, dtype=np.float32) for im in imgs]) / 127.5 - 1.0
    return torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()


def to_pil(x: torch.Tensor):
    from PIL import Image
    a = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(v) for v in a]


def make_dataset(n_per_combo: int, seed: int):
    rng = random.Random(seed)
    imgs, caps = [], []
    for _ in range(n_per_combo):
        for c, s, b in all_combinations():
            imgs.append(draw(c, s, b, jitter=rng))
            caps.append(caption(c, s, b))
    return to_tensor(imgs), caps


@torch.no_grad()
def vae_report(vae) -> dict:
    """Reconstruct every (unjittered) combination; colour errors on 0..1 scale."""
    from trainer.models.demo import score
    combos = all_combinations()
    x = to_tensor([draw(c, s, b) for c, s, b in combos])
    rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
    recs = to_pil(rec)
    fg_err, bg_err, wrong = [], [], []
    for (c, s, b), im in zip(combos, recs):
        fg_err.append(score.colour_distance(im, COLOURS[c]))
        bg_err.append(score.background_distance(im, BACKGROUNDS[b]))
        got = (score.dominant_colour(im), score.shape_of(im), score.background_colour(im))
        if got != (c, s, b):
            wrong.append(((c, s, b), got))
    mse = F.mse_loss(rec.clamp(-1, 1), x).item()
    return dict(fg_max=max(fg_err), fg_mean=float(np.mean(fg_err)), bg_max=max(bg_err),
                mse=mse, wrong=wrong)


def train_vae(vae, steps: int, batch: int = 16, lr: float = 1e-3) -> None:
    seed_all(SEED + 3)
    data, _ = make_dataset(12, seed=SEED + 3)
    n = data.shape[0]
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    g = torch.Generator().manual_seed(SEED + 4)
    vae.train()
    t0 = time.time()
    step = 0
    while step < steps:
        idx = torch.randint(0, n, (batch,), generator=g)
        x = data[idx]
        post = vae.encode(x).latent_dist
        z = post.sample(generator=g)
        rec = vae.decode(z).sample
        l1 = (rec - x).abs().mean()
        mse = F.mse_loss(rec, x)
        kl = post.kl().mean() / (16 * 16 * 4)
        loss = l1 + mse + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        if step % 100 == 0 or step == steps:
            log(f"vae step {step}/{steps} l1 {l1.item():.4f} mse {mse.item():.5f} "
                f"kl {kl.item():.3f} ({(time.time() - t0) / step:.2f} s/step)")
        if step % 500 == 0 or step == steps:
            vae.eval()
            r = vae_report(vae)
            vae.train()
            log(f"vae recon check: colour err max {r['fg_max']:.4f} mean {r['fg_mean']:.4f}, "
                f"background err max {r['bg_max']:.4f}, mse {r['mse']:.5f}, "
                f"misclassified {len(r['wrong'])}/45 {r['wrong'][:3]}")
    vae.eval()
    vae.requires_grad_(False)


# --------------------------------------------------------------------- UNet
def build_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(SEED + 5)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4,
        # No attention at the 16x16 level (as SDXL's first level): self-attention over 256
        # tokens was a third of the sampling time and flat shapes do not need it.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64,
        attention_head_dim=8, norm_num_groups=32)


def build_train_scheduler():
    from diffusers import DDPMScheduler
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", prediction_type="epsilon",
                         clip_sample=False)


def build_sample_scheduler():
    from diffusers import DDIMScheduler
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", prediction_type="epsilon",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                         timestep_spacing="trailing")


def make_pipeline(tok, te, vae, unet):
    from diffusers import StableDiffusionPipeline
    return StableDiffusionPipeline(
        vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
        scheduler=build_sample_scheduler(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str]) -> torch.Tensor:
    """Text embeddings exactly as the pipeline computes them."""
    emb, _ = pipe.encode_prompt(prompts, "cpu", 1, do_classifier_free_guidance=False)
    return emb


def train_unet(pipe, steps: int, batch: int = 16, lr: float = 1e-3,
               n_per_combo: int = 40, drop: float = 0.1, noise_offset: float = 0.1):
    unet, vae = pipe.unet, pipe.vae
    seed_all(SEED + 6)
    # precompute latents (posterior mean; fresh posterior noise is not needed)
    t0 = time.time()
    data, caps = make_dataset(n_per_combo, seed=SEED + 6)
    with torch.no_grad():
        lat = torch.cat([vae.encode(data[i:i + 64]).latent_dist.mode()
                         for i in range(0, data.shape[0], 64)])
    std = lat.std().item()
    sf = 1.0 / std
    vae.register_to_config(scaling_factor=sf)
    lat = lat * sf
    uniq = sorted(set(caps))
    emb_table = encode_prompts(pipe, uniq)
    empty = encode_prompts(pipe, [""])[0]
    cap_idx = torch.tensor([uniq.index(c) for c in caps])
    log(f"precomputed {lat.shape[0]} latents {tuple(lat.shape[1:])}, latent std {std:.4f} "
        f"-> scaling_factor {sf:.4f}; {len(uniq)} caption embeddings ({time.time() - t0:.1f} s)")

    sched = build_train_scheduler()
    ac = sched.alphas_cumprod
    snr = ac / (1 - ac)
    ema = copy.deepcopy(unet).eval()
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2)
    warm = 200
    lrs = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    g = torch.Generator().manual_seed(SEED + 7)
    unet.train()
    t0 = time.time()
    run = 0.0
    for step in range(1, steps + 1):
        idx = torch.randint(0, lat.shape[0], (batch,), generator=g)
        x0 = lat[idx]
        cond = emb_table[cap_idx[idx]].clone()
        dmask = torch.rand(batch, generator=g) < drop
        cond[dmask] = empty
        noise = torch.randn(x0.shape, generator=g)
        noise = noise + noise_offset * torch.randn((batch, 4, 1, 1), generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        xt = sched.add_noise(x0, noise, t)
        pred = unet(xt, t, encoder_hidden_states=cond).sample
        # min-SNR-5 weighting (epsilon prediction)
        w = torch.clamp(snr[t], max=5.0) / snr[t]
        loss = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
        loss = (loss * w).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lrs.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.mul_(decay).add_(p.detach(), alpha=1 - decay)
        run = loss.item() if step == 1 else 0.98 * run + 0.02 * loss.item()
        if step % 100 == 0 or step == steps:
            el = time.time() - t0
            log(f"unet step {step}/{steps} loss {run:.4f} lr {lrs.get_last_lr()[0]:.2e} "
                f"({el / step:.3f} s/step, eta {el / step * (steps - step) / 60:.1f} min)")
    unet.eval()
    return ema


@torch.no_grad()
def sample_check(pipe, steps: int = 30, guidance: float = 5.0, seed: int = 0, grid: str | None = None):
    from trainer.models.demo import score
    combos = all_combinations()
    prompts = [caption(*c) for c in combos]
    imgs = []
    for i in range(0, len(prompts), 15):
        gen = [torch.Generator().manual_seed(seed + j) for j in range(i, min(i + 15, len(prompts)))]
        imgs += pipe(prompts[i:i + 15], num_inference_steps=steps, guidance_scale=guidance,
                     height=64, width=64, generator=gen).images
    ok_c = ok_s = ok_b = 0
    for (c, s, b), im in zip(combos, imgs):
        ok_c += score.dominant_colour(im) == c
        ok_s += score.shape_of(im) == s
        ok_b += score.background_colour(im) == b
    n = len(combos)
    log(f"sample check ({n} prompts, {steps} DDIM steps, cfg {guidance}): colour {ok_c}/{n}, "
        f"shape {ok_s}/{n}, background {ok_b}/{n}")
    if grid:
        from PIL import Image
        g = Image.new("RGB", (64 * 9, 64 * 5))
        for k, im in enumerate(imgs):
            g.paste(im, ((k % 9) * 64, (k // 9) * 64))
        g.save(grid)
    return ok_c, ok_s, ok_b


def save(pipe, out: Path, tok_dir: Path) -> None:
    import shutil
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        shutil.rmtree(out / sub, ignore_errors=True)
    pipe.save_pretrained(out, safe_serialization=True)
    # keep the plain BPE files so older (slow) tokenizers can load it too
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(tok_dir / f, out / "tokenizer" / f)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log(f"saved pipeline to {out} ({total / 1e6:.2f} MB)")


def continue_training(args) -> int:
    """More UNet steps on a saved model: the cheap way to improve prompt following."""
    from trainer.models.demo import load_pipeline

    torch.set_num_threads(1)
    t_start = time.time()
    pipe = load_pipeline(path=args.continue_from)
    pipe.set_progress_bar_config(disable=True)
    tok_dir = Path(tempfile.mkdtemp(prefix="demo_tok_"))
    for f in ("vocab.json", "merges.txt"):
        (tok_dir / f).write_bytes((args.continue_from / "tokenizer" / f).read_bytes())
    sample_check(pipe)
    _warm_start_new_architecture(pipe)
    return train_check_save(pipe, args, tok_dir, t_start)


def _warm_start_new_architecture(pipe) -> None:
    """If ``build_unet`` changed since the saved model, start the new UNet from every saved
    tensor that still fits (same name and shape) instead of from scratch."""
    new = build_unet()
    old = pipe.unet.state_dict()
    own = new.state_dict()
    if {k: v.shape for k, v in old.items()} == {k: v.shape for k, v in own.items()}:
        return
    kept = {k: v for k, v in old.items() if k in own and own[k].shape == v.shape}
    new.load_state_dict(kept, strict=False)
    log(f"new UNet architecture: warm start from {len(kept)}/{len(own)} saved tensors "
        f"({len(old) - len(kept)} saved tensors dropped)")
    pipe.unet = new
    pipe.register_modules(unet=new)


def train_check_save(pipe, args, tok_dir: Path, t_start: float) -> int:
    """Train the UNet (its EMA becomes the model's), check the samples, save the pipeline."""
    t0 = time.time()
    ema = train_unet(pipe, args.unet_steps, batch=args.unet_batch, lr=args.unet_lr,
                     noise_offset=args.noise_offset)
    log(f"UNet trained in {(time.time() - t0) / 60:.1f} min")
    pipe.unet = ema
    pipe.register_modules(unet=ema)
    sample_check(pipe, grid=args.grid)
    save(pipe, args.out, tok_dir)
    log(f"total {(time.time() - t_start) / 60:.1f} min")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--vae-steps", type=int, default=3000)
    ap.add_argument("--unet-steps", type=int, default=4000)
    ap.add_argument("--unet-batch", type=int, default=16)
    ap.add_argument("--vae-batch", type=int, default=16)
    ap.add_argument("--vae-ckpt", type=Path, default=None,
                    help="reuse a trained VAE (.safetensors state dict, as written to /tmp/demo_vae.safetensors; skips VAE training)")
    ap.add_argument("--grid", type=str, default="/tmp/demo_samples.png")
    ap.add_argument("--continue-from", type=Path, default=None,
                    help="continue training the UNet of a saved demo model (keeps its tokenizer, text encoder, VAE)")
    ap.add_argument("--unet-lr", type=float, default=1e-3)
    ap.add_argument("--noise-offset", type=float, default=0.1,
                    help="per-channel noise offset; lets the model draw flat white/black backgrounds")
    args = ap.parse_args(argv)
    if args.continue_from:
        return continue_training(args)

    torch.set_num_threads(1)
    seed_all(SEED)
    torch.use_deterministic_algorithms(True, warn_only=True)
    t_start = time.time()

    tmp = Path(tempfile.mkdtemp(prefix="demo_tok_"))
    tok, _, _ = build_tokenizer(tmp)
    te = build_text_encoder(tok)
    vae = build_vae()
    unet = build_unet()
    log("params: text_encoder %.2fM, vae %.2fM, unet %.2fM" % tuple(
        sum(p.numel() for p in m.parameters()) / 1e6 for m in (te, vae, unet)))

    if args.vae_ckpt and args.vae_ckpt.exists():
        vae.load_state_dict(load_file(str(args.vae_ckpt)))   # safetensors: no pickle, as everywhere
        vae.eval().requires_grad_(False)
        log(f"loaded VAE from {args.vae_ckpt}")
    else:
        t0 = time.time()
        train_vae(vae, args.vae_steps, batch=args.vae_batch)
        log(f"VAE trained in {(time.time() - t0) / 60:.1f} min")
        save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, "/tmp/demo_vae.safetensors")
    r = vae_report(vae)
    log(f"VAE final: colour err max {r['fg_max']:.4f} mean {r['fg_mean']:.4f}, "
        f"background err max {r['bg_max']:.4f}, mse {r['mse']:.5f}, misclassified {len(r['wrong'])}/45")
    if r["fg_max"] > 0.08 or r["wrong"]:
        log("WARNING: VAE does not reconstruct all colours/shapes well")

    pipe = make_pipeline(tok, te, vae, unet)
    pipe.set_progress_bar_config(disable=True)
    return train_check_save(pipe, args, tmp, t_start)


if __name__ == "__main__":
    sys.exit(main())
