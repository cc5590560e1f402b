"""The card tables of docs/vram-budget.md, from ``trainer.train.budget.estimate``: ``python bench/vram_cards.py``.

Rank 16 on attention + MLP, four captions, bf16 autocast; SD1.5 with fp16 weights and VAE, SDXL with fp16
weights and its fp16 VAE encoding in fp32. "yes": the job's peak fits the card less 0.3 GiB for the desktop.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.train import budget  # noqa: E402

CARDS_GB = (8, 12, 16, 24)
DESKTOP = 0.3 * budget.GIB
HOSTS = {"sd1": budget.Host(weight_bytes=2, vae_bytes=2),
         "sdxl": budget.Host(weight_bytes=2, vae_bytes=2, vae_upcast=True)}
TITLES = {"sd1": "SD1.5 (fp16 weights, bf16 autocast, rank 16 attn+MLP)",
          "sdxl": "SDXL (fp16 weights, fp32 VAE for caching, bf16 autocast, rank 16 attn+MLP)"}
CK = dict(gradient_checkpointing=True)
ROWS = {
    "sd1": [("512 px, batch 1, AdamW", dict(resolution=512)),
            ("512 px, batch 1, AdamW, checkpointing", dict(resolution=512, **CK)),
            ("512 px, batch 4, AdamW", dict(resolution=512, batch_size=4)),
            ("512 px, batch 4, AdamW, checkpointing", dict(resolution=512, batch_size=4, **CK)),
            ("512 px, batch 1, AdamW, text encoder too", dict(resolution=512, train_text_encoder=True)),
            ("768 px, batch 1, AdamW", dict(resolution=768)),
            ("768 px, batch 2, AdamW, checkpointing", dict(resolution=768, batch_size=2, **CK)),
            ("1024 px, batch 1, AdamW", dict(resolution=1024)),
            ("1024 px, batch 1, AdamW, checkpointing", dict(resolution=1024, **CK))],
    "sdxl": [("1024 px, batch 1, AdamW", dict(resolution=1024)),
             ("1024 px, batch 1, AdamW, checkpointing", dict(resolution=1024, **CK)),
             ("1024 px, batch 1, AdamW8bit, checkpointing", dict(resolution=1024, optimizer="AdamW8bit", **CK)),
             ("1024 px, batch 2, AdamW, checkpointing", dict(resolution=1024, batch_size=2, **CK)),
             ("1024 px, batch 4, AdamW, checkpointing", dict(resolution=1024, batch_size=4, **CK)),
             ("1024 px, batch 1, AdamW, checkpointing, text encoders too",
              dict(resolution=1024, train_text_encoder=True, **CK)),
             ("1024 px, batch 1, Prodigy, checkpointing", dict(resolution=1024, optimizer="Prodigy", **CK)),
             ("768 px, batch 1, AdamW", dict(resolution=768)),
             ("768 px, batch 1, AdamW, checkpointing", dict(resolution=768, **CK)),
             ("512 px, batch 1, AdamW, checkpointing", dict(resolution=512, **CK))],
}


def table(arch: str) -> str:
    lines = [f"| {TITLES[arch]} | training GiB | caching GiB | " + " | ".join(f"{c} GB" for c in CARDS_GB) + " |",
             "|---|---|---|" + "---|" * len(CARDS_GB)]
    for label, settings in ROWS[arch]:
        e = budget.estimate(arch, budget.Settings(captions=4, **settings), HOSTS[arch])
        fits = ["yes" if e.peak <= c * 1e9 - DESKTOP else "no" for c in CARDS_GB]
        lines.append(f"| {label} | {e.training_peak / budget.GIB:.2f} | {e.caching_peak / budget.GIB:.2f} | "
                     + " | ".join(fits) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table("sd1"), "", table("sdxl"), sep="\n")
