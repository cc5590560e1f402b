"""Dataset layer of the standard mode: image folders, captions, aspect buckets, latent + embedding caches.

The pieces, in the order a training run uses them:

1. ``scan_dataset(options)`` walks the folder once: images, captions, repeats, sizes, content hashes.
2. ``assign_buckets(dataset, options)`` gives every image a (width, height) bucket (pure functions
   ``make_buckets`` / ``bucket_for`` do the maths).
3. ``LatentCache.get_latents`` encodes each (image, bucket, flip) once per VAE, ever: files on disk,
   keyed by content, so a second job on the same images starts training at once.
4. ``BatchSampler`` yields same-bucket batches in a seeded order that a resumed run continues exactly.
5. ``process_caption`` turns a caption into the text of one training sample (trigger word, shuffle,
   dropout) and ``TextEmbeddingCache`` avoids re-encoding it while the text encoder is frozen.
"""
from __future__ import annotations

import hashlib
import io
import math
import random
import re
from collections import Counter, OrderedDict, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from trainer.paths import write_atomic
from trainer.models.handle import Cond, ModelHandle

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
CAPTION_FALLBACK = ".caption"
#: Files that sit next to images on purpose and are not worth a warning (captions, kohya's latent caches).
_SIDECAR_EXTENSIONS = {".txt", ".caption", ".npz", ".json", ".toml"}
#: ``10_name``: kohya's folder convention for "repeat each image of this folder 10 times per epoch".
_REPEATS_RE = re.compile(r"^(\d+)_(.*)$")
_EXIF_ORIENTATION = 0x0112


class DatasetError(ValueError):
    """The dataset cannot be used as configured; ``field`` names the job field to fix."""

    def __init__(self, message: str, field: str = "dataset_dir"):
        super().__init__(message)
        self.message, self.field = message, field


@dataclass
class DatasetOptions:
    folder: str | Path
    caption_extension: str = ".txt"          # ".caption" is tried when this one is missing
    trigger_word: str = ""
    shuffle_captions: bool = False
    keep_tokens: int = 0
    caption_dropout: float = 0.0
    flip_horizontal: bool = False
    resolution: int = 512
    enable_buckets: bool = True
    bucket_no_upscale: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_step: int = 64
    default_repeats: int = 1


@dataclass(frozen=True)
class ImageItem:
    path: Path
    caption: str
    repeats: int
    width: int                     # after EXIF orientation, i.e. as the image is trained
    height: int
    sha256: str                    # of the file's bytes; "" when scanned with verify=False
    caption_file: Path | None = None
    group: str = ""                # the folder whose name gave the repeats (ss_tag_frequency key)


@dataclass
class Dataset:
    root: Path
    options: DatasetOptions
    items: list[ImageItem]
    warnings: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def num_samples(self) -> int:
        """Samples per epoch, repeats included."""
        return sum(item.repeats for item in self.items)

    def summary(self) -> str:
        """One line for the UI, e.g. ``40 images found, 38 captions``."""
        n = len(self.items)
        m = sum(1 for item in self.items if item.caption_file is not None)
        text = f"{n} image{'s' if n != 1 else ''} found, {m} caption{'s' if m != 1 else ''}"
        if self.num_samples != n:
            text += f" ({self.num_samples} samples per epoch with repeats)"
        return text

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """kohya's ``ss_tag_frequency``: per folder, how many captions carry each comma-separated tag.

        The trigger word counts too, because every trained caption carries it and this table is what a
        user reads to find out what to prompt.
        """
        table: dict[str, Counter] = defaultdict(Counter)
        trigger = self.options.trigger_word.strip()
        for item in self.items:
            tags = set(split_tags(item.caption))
            if trigger:
                tags.add(trigger)
            table[item.group].update(tags)
        return {group: dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
                for group, counts in table.items()}


# ---------------------------------------------------------------------------------------------
# Scanning
# ---------------------------------------------------------------------------------------------

def scan_dataset(options: DatasetOptions, verify: bool = True) -> Dataset:
    """Every usable image under ``options.folder`` (recursive) with its caption and repeats.

    ``verify=False`` reads only image headers and skips hashing: cheap enough to refresh a UI
    summary while the user types, but truncated files are only caught by a full scan.
    """
    root = Path(options.folder).expanduser() if str(options.folder).strip() else None
    if root is None:
        raise DatasetError("choose a dataset folder")
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DatasetError(f"dataset folder '{root}' {what}")

    caption_exts = list(dict.fromkeys([options.caption_extension, CAPTION_FALLBACK]))
    items: list[ImageItem] = []
    warnings: list[str] = []
    not_images: list[str] = []
    unreadable: list[str] = []
    zero_repeat_folders: list[str] = []
    missing_captions = 0

    for path in sorted(_walk(root)):
        rel = path.relative_to(root).as_posix()
        suffix = path.suffix.lower()
        if suffix not in IMAGE_EXTENSIONS:
            if suffix not in _SIDECAR_EXTENSIONS and suffix not in caption_exts:
                not_images.append(rel)
            continue
        repeats, group = _repeats_for(path, root, options.default_repeats)
        if repeats <= 0:
            if group not in zero_repeat_folders:
                zero_repeat_folders.append(group)
            continue
        try:
            width, height, digest = _inspect_image(path, verify)
        except Exception as e:  # PIL raises many types for broken files; all mean "skip it"
            unreadable.append(f"{rel} ({_short_reason(e)})")
            continue
        caption_file = next((p for p in (path.with_suffix(ext) for ext in caption_exts) if p.is_file()), None)
        if caption_file is None:
            missing_captions += 1
            caption = ""
        else:
            caption = read_caption(caption_file)
        items.append(ImageItem(path, caption, repeats, width, height, digest, caption_file, group))

    looked_for = " ".join(IMAGE_EXTENSIONS)
    if not_images:
        warnings.append(f"skipped {len(not_images)} file(s) that are not images ({looked_for}): "
                        + _name_list(not_images))
    if unreadable:
        warnings.append(f"skipped {len(unreadable)} unreadable or corrupt image(s): " + _name_list(unreadable))
    many = sorted({f"{item.group} ({item.repeats}x)" for item in items if item.repeats > 100})
    if many:
        # "2023_holiday" is read as 2023 repeats by the N_name convention; say so in case it is a date.
        warnings.append("folder name(s) ask for over 100 repeats per epoch (N_name convention): "
                        + _name_list(many) + "; rename the folder if that is not meant")
    if zero_repeat_folders:
        warnings.append("skipped folder(s) asking for 0 repeats: " + _name_list(zero_repeat_folders))
    if missing_captions:
        warnings.append(f"{missing_captions} of {len(items)} image(s) have no caption file "
                        f"({' or '.join(caption_exts)}); they train with an empty caption"
                        + (" (just the trigger word)" if options.trigger_word.strip() else ""))

    if not items:
        if unreadable:
            raise DatasetError(f"dataset folder '{root}' has no readable images: " + _name_list(unreadable))
        raise DatasetError(f"dataset folder '{root}' has no images (looked for {looked_for})")
    return Dataset(root, options, items, warnings)


def _walk(root: Path) -> Iterator[Path]:
    # Hidden files and folders are skipped: .DS_Store, editors' swap files, and a cache folder a
    # user may have put inside the dataset.
    for entry in root.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            yield from _walk(entry)
        elif entry.is_file():
            yield entry


def _repeats_for(path: Path, root: Path, default: int) -> tuple[int, str]:
    """Repeats from the nearest ``N_name`` folder between the image and the root (kohya convention)."""
    for folder in path.relative_to(root).parents:
        if folder == Path("."):
            break
        match = _REPEATS_RE.match(folder.name)
        if match:
            return int(match.group(1)), folder.name
    return default, root.name


def _inspect_image(path: Path, verify: bool) -> tuple[int, int, str]:
    """(width, height as trained, sha256 of the bytes); raises on anything PIL cannot read."""
    if not verify:
        with Image.open(path) as img:
            return _oriented_size(img) + ("",)
    data = path.read_bytes()
    if not data:
        raise ValueError("empty file")
    with Image.open(io.BytesIO(data)) as img:
        img.verify()                  # structure and checksums; cheap
    with Image.open(io.BytesIO(data)) as img:
        img.load()                    # verify() misses truncated pixel data; decoding catches it
        size = _oriented_size(img)
    return size + (hashlib.sha256(data).hexdigest(),)


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    # Orientations 5-8 rotate by 90 degrees: the trained image has the sides swapped.
    return (img.height, img.width) if orientation in (5, 6, 7, 8) else (img.width, img.height)


def _short_reason(e: Exception) -> str:
    if isinstance(e, UnidentifiedImageError):
        return "not a readable image"
    text = str(e).strip() or type(e).__name__
    return text if len(text) <= 80 else text[:77] + "..."


def _name_list(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def read_caption(path: Path) -> str:
    """A caption file's text on one line (BOM removed; several lines joined as tags)."""
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    lines = [line.strip().strip(",").strip() for line in text.splitlines()]
    return ", ".join(line for line in lines if line)


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------

def split_tags(caption: str) -> list[str]:
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def process_caption(caption: str, options: DatasetOptions, rng: random.Random) -> str:
    """The text of one training sample: dropout, then trigger word first, then shuffled tags.

    ``keep_tokens`` counts the caption's leading tags, not the trigger word (which always leads).
    Without shuffling the caption text is kept as written, so prose captions are not re-punctuated.
    """
    if options.caption_dropout > 0 and rng.random() < options.caption_dropout:
        return ""
    trigger = options.trigger_word.strip()
    tags = split_tags(caption)
    if not options.shuffle_captions:
        if not trigger or trigger in tags:
            return caption.strip()
        return f"{trigger}, {caption.strip()}" if tags else trigger
    tags = [tag for tag in tags if tag != trigger]
    kept, rest = tags[:options.keep_tokens], tags[options.keep_tokens:]
    rng.shuffle(rest)
    return ", ".join(([trigger] if trigger else []) + kept + rest)


# ---------------------------------------------------------------------------------------------
# Buckets (pure)
# ---------------------------------------------------------------------------------------------

def make_buckets(resolution: int, min_reso: int = 256, max_reso: int = 1024, step: int = 64
                 ) -> list[tuple[int, int]]:
    """kohya's bucket list: (w, h) with sides multiples of ``step`` in [min, max], area <= resolution²."""
    max_area = resolution * resolution
    buckets = set()
    side = int(math.sqrt(max_area) // step) * step
    if min_reso <= side <= max_reso:
        buckets.add((side, side))
    width = min_reso
    while width <= max_reso:
        height = min(max_reso, (max_area // width) // step * step)
        if height >= min_reso:
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    if not buckets:
        # The range admits nothing at this area (e.g. min side above the resolution): fall back to
        # the largest square that fits, rather than fail mid-job.
        side = max(step, min(side, max_reso // step * step))
        buckets.add((side, side))
    return sorted(buckets)


def bucket_for(width: int, height: int, buckets: Sequence[tuple[int, int]], no_upscale: bool = False,
               resolution: int = 512, step: int = 64) -> tuple[int, int]:
    """The bucket an image of ``width`` x ``height`` trains at: the nearest aspect ratio.

    With ``no_upscale`` an image is never enlarged: when it cannot cover its bucket it gets a bucket
    of its own, its size (scaled down to the max area if larger) rounded down to ``step``.
    """
    log_ratio = math.log(width / height)
    # Distance in log space treats 2:1 and 1:2 alike; ties go to the larger bucket (more pixels kept).
    best = min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - log_ratio), -b[0] * b[1]))
    if not no_upscale or (width >= best[0] and height >= best[1]):
        return best
    scale = min(1.0, math.sqrt(resolution * resolution / (width * height)))
    w, h = width * scale, height * scale
    return max(step, int(w // step) * step), max(step, int(h // step) * step)


def assign_buckets(dataset: Dataset, options: DatasetOptions | None = None) -> list[tuple[int, int]]:
    """The (w, h) bucket of every item, in ``dataset.items`` order."""
    options = options or dataset.options
    if not options.enable_buckets:
        return [(options.resolution, options.resolution)] * len(dataset.items)
    buckets = make_buckets(options.resolution, options.min_bucket_reso, options.max_bucket_reso,
                           options.bucket_step)
    return [bucket_for(item.width, item.height, buckets, options.bucket_no_upscale, options.resolution,
                       options.bucket_step) for item in dataset.items]


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


# ---------------------------------------------------------------------------------------------
# Latent cache (disk)
# ---------------------------------------------------------------------------------------------

def latent_key(sha256: str, identity: str, bucket: tuple[int, int], flipped: bool = False) -> str:
    """File-name-safe key: image content + VAE identity + bucket + flip."""
    vae = hashlib.sha256(identity.encode()).hexdigest()[:12]
    return f"{sha256}-{vae}-{bucket[0]}x{bucket[1]}{'-flip' if flipped else ''}"


class LatentCache:
    """Latents on disk, one safetensors file per (image content, VAE, bucket, flip).

    Keyed by content, not path: renaming or moving images keeps their latents, editing one image
    re-encodes only that one, and every job on any folder shares the same cache.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.encoded = 0   # images encoded by this object
        self.hits = 0      # latents read from disk by this object

    def path_for(self, key: str) -> Path:
        # Two-character shards keep folders small for large datasets.
        return self.folder / key[:2] / f"{key}.safetensors"

    def get_latents(self, items_with_buckets: Sequence[tuple[ImageItem, tuple[int, int]]],
                    handle: ModelHandle, batch_size: int = 4, flip: bool = False) -> dict[str, torch.Tensor]:
        """{latent_key: [C, h/f, w/f] float32 on CPU (f = ``handle.vae_scale``)} for every item (and its mirror image if ``flip``).

        Only what is missing on disk is encoded, in batches that share a bucket.
        """
        identity = handle.identity
        wanted: dict[str, tuple[ImageItem, tuple[int, int], bool]] = {}
        for item, bucket in items_with_buckets:
            if not item.sha256:
                raise ValueError(f"{item.path.name}: scanned without hashing (verify=False); cannot cache")
            # A VAE is not equivariant to mirroring, so the flipped image is encoded, not the latent flipped.
            for flipped in ((False, True) if flip else (False,)):
                wanted.setdefault(latent_key(item.sha256, identity, bucket, flipped), (item, bucket, flipped))

        result: dict[str, torch.Tensor] = {}
        missing: dict[tuple[int, int], list[str]] = defaultdict(list)
        for key, (_, bucket, _) in wanted.items():
            latents = self._read(key, bucket, handle.vae_scale)
            if latents is None:
                missing[bucket].append(key)
            else:
                result[key] = latents
                self.hits += 1

        for bucket in sorted(missing):
            keys = missing[bucket]
            for start in range(0, len(keys), max(1, batch_size)):
                chunk = keys[start:start + batch_size]
                pixels = torch.stack([load_image_tensor(wanted[k][0].path, bucket, wanted[k][2]) for k in chunk])
                with torch.no_grad(), handle.lock():
                    latents = handle.encode_images(pixels).detach().float().cpu()
                for key, latent in zip(chunk, latents):
                    latent = latent.contiguous()
                    self._write(key, latent, identity)
                    result[key] = latent
                self.encoded += len(chunk)
        return result

    def _read(self, key: str, bucket: tuple[int, int], scale: int = 8) -> torch.Tensor | None:
        from safetensors import safe_open

        path = self.path_for(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("key") != key:
                    return None
                latents = f.get_tensor("latents")
        except Exception:
            # A damaged cache file (disk full, killed copy) is just a miss: it gets re-encoded.
            return None
        if latents.ndim != 3 or tuple(latents.shape[1:]) != (bucket[1] // scale, bucket[0] // scale):
            return None
        return latents

    def _write(self, key: str, latents: torch.Tensor, identity: str) -> None:
        from safetensors.torch import save

        blob = save({"latents": latents}, metadata={"key": key, "identity": identity})
        write_atomic(self.path_for(key), blob)


# ---------------------------------------------------------------------------------------------
# Text embedding cache (memory)
# ---------------------------------------------------------------------------------------------

class TextEmbeddingCache:
    """caption -> Cond while the text encoder is frozen (do not use it when training the text encoder).

    Keyed on the image size too, because SDXL's conditioning carries it (time ids). Bounded (least
    recently used out), because shuffled captions are new strings nearly every step.
    """

    def __init__(self, max_entries: int = 2048):
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, tuple[int, int]], Cond] = OrderedDict()
        self._identity: str | None = None
        self.encoded = 0
        self.hits = 0

    def clear(self) -> None:
        self._entries.clear()

    def get(self, texts: Sequence[str], size: tuple[int, int], handle: ModelHandle) -> Cond:
        """Conditioning for ``texts`` at ``size`` (height, width); misses are encoded in one batch.

        Call it while holding ``handle.lock()`` (as a training step does)."""
        if handle.identity != self._identity:
            self.clear()
            self._identity = handle.identity
        size = (int(size[0]), int(size[1]))
        misses = [t for t in dict.fromkeys(texts) if (t, size) not in self._entries]
        if misses:
            # No handle.lock() here: this runs inside a training step, which already holds the
            # (non-reentrant) model lock.
            with torch.no_grad():
                cond = handle.encode_prompts(list(misses), size).detach()
            for i, text in enumerate(misses):
                self._entries[(text, size)] = cond[i:i + 1]
            self.encoded += len(misses)
        self.hits += len(texts) - len(misses)
        rows = []
        for text in texts:
            self._entries.move_to_end((text, size))
            rows.append(self._entries[(text, size)])
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return Cond.cat(rows)


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Batch:
    indices: list[int]           # into dataset.items
    bucket: tuple[int, int]      # (w, h)
    epoch: int
    position: int                # index of this batch within its epoch
    seed: int

    def random(self) -> random.Random:
        """The per-batch RNG for flips and captions: a function of (seed, epoch, position), so a
        resumed run draws the same flips and captions without saving any RNG state."""
        return random.Random(f"{self.seed}:{self.epoch}:{self.position}")


class BatchSampler:
    """Endless iterator of same-bucket batches; each epoch's order is seeded from (seed, epoch).

    Each item appears ``repeats`` times per epoch. Within a bucket the samples are shuffled and cut
    into batches (the last one of a bucket may be smaller), then all batches are shuffled.
    """

    def __init__(self, repeats: Sequence[int], buckets: Sequence[tuple[int, int]], batch_size: int,
                 seed: int):
        if len(repeats) != len(buckets):
            raise ValueError("repeats and buckets must have one entry per item")
        if batch_size < 1:
            raise ValueError("batch size must be at least 1")
        self.repeats, self.buckets = list(repeats), [tuple(b) for b in buckets]
        self.batch_size, self.seed = batch_size, seed
        self.epoch, self.position = 0, 0
        self._plan: tuple[int, list[list[int]]] | None = None

    @classmethod
    def for_dataset(cls, dataset: Dataset, buckets: Sequence[tuple[int, int]], batch_size: int,
                    seed: int) -> "BatchSampler":
        return cls([item.repeats for item in dataset.items], buckets, batch_size, seed)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The batches of one epoch, in order (pure: depends only on the inputs and ``epoch``)."""
        if self._plan is not None and self._plan[0] == epoch:
            return self._plan[1]
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2 ** 63))
        by_bucket: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, (count, bucket) in enumerate(zip(self.repeats, self.buckets)):
            by_bucket[bucket].extend([index] * count)
        batches: list[list[int]] = []
        for bucket in sorted(by_bucket):
            samples = by_bucket[bucket]
            order = torch.randperm(len(samples), generator=generator).tolist()
            shuffled = [samples[i] for i in order]
            batches += [shuffled[i:i + self.batch_size] for i in range(0, len(shuffled), self.batch_size)]
        order = torch.randperm(len(batches), generator=generator).tolist()
        plan = [batches[i] for i in order]
        self._plan = (epoch, plan)
        return plan

    def __len__(self) -> int:
        """Batches per epoch."""
        return len(self.epoch_batches(self.epoch))

    def __iter__(self) -> "BatchSampler":
        return self

    def __next__(self) -> Batch:
        plan = self.epoch_batches(self.epoch)
        if not plan:
            raise StopIteration
        if self.position >= len(plan):
            self.epoch, self.position = self.epoch + 1, 0
            plan = self.epoch_batches(self.epoch)
        indices = plan[self.position]
        batch = Batch(list(indices), self.buckets[indices[0]], self.epoch, self.position, self.seed)
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, int | str]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "batch_size": self.batch_size, "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        """Continue where ``state`` left off. If the dataset changed meanwhile (fingerprint differs),
        the epoch is kept and the position clamped: training goes on rather than failing on resume."""
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._plan = None
        self.position = min(self.position, len(self.epoch_batches(self.epoch)))

    def fingerprint(self) -> str:
        h = hashlib.sha256(repr((self.repeats, self.buckets, self.batch_size, self.seed)).encode())
        return h.hexdigest()[:16]


def collate(batch: Batch, dataset: Dataset, latents: dict[str, torch.Tensor], identity: str,
            options: DatasetOptions | None = None) -> tuple[torch.Tensor, list[str]]:
    """(latents [B, C, h, w], captions) of one batch, flips and captions drawn from ``batch.random()``."""
    options = options or dataset.options
    rng = batch.random()
    rows, captions = [], []
    for index in batch.indices:
        item = dataset.items[index]
        flipped = options.flip_horizontal and rng.random() < 0.5
        rows.append(latents[latent_key(item.sha256, identity, batch.bucket, flipped)])
        captions.append(process_caption(item.caption, options, rng))
    return torch.stack(rows), captions
