"""Images from disk: EXIF-oriented RGB on white, resized and centre-cropped to a bucket, as tensors."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageOps


from trainer.data.dataset import EXIF_ORIENTATION


def resize_and_crop(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale to cover ``size`` (w, h) and crop the centre, in one resampling step."""
    w, h = size
    iw, ih = img.size
    if iw * h > ih * w:              # wider than the bucket: crop left and right
        crop_w = ih * w / h
        box = ((iw - crop_w) / 2, 0, (iw + crop_w) / 2, ih)
    else:                            # taller: crop top and bottom
        crop_h = iw * h / w
        box = (0, (ih - crop_h) / 2, iw, (ih + crop_h) / 2)
    return img.resize((w, h), Image.Resampling.LANCZOS, box=box)


def open_rgb(path: str | Path) -> Image.Image:
    """The image as trained: EXIF orientation applied, transparency composited on white, RGB."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I", "I;16", "I;16B", "I;16L"):
            # 16-bit greyscale PNG: convert("RGB") would clip everything above 255 to white.
            img = img.convert("F").point(lambda v: v / 256).convert("L")
        has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
        if has_alpha:
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return img.convert("RGB")


def load_image_tensor(path: str | Path, size: tuple[int, int], flip: bool = False) -> torch.Tensor:
    """[3, h, w] float32 in [-1, 1]: the image resized and centre-cropped to bucket ``size`` (w, h)."""
    img = resize_and_crop(open_rgb(path), size)
    if flip:
        img = ImageOps.mirror(img)
    w, h = size
    pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(h, w, 3)
    return pixels.permute(2, 0, 1).float() / 127.5 - 1.0
