"""The dataset scan: a folder walked once for images, captions, ``N_name`` repeats, sizes and content hashes;
broken images and missing captions are collected as warnings or refused with the file named."""
from __future__ import annotations

import hashlib
import io
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from PIL import Image, UnidentifiedImageError

from trainer.data.captions import split_tags
from trainer.data.options import DatasetOptions

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
CAPTION_FALLBACK = ".caption"
#: Files that sit next to images on purpose and are not worth a warning (captions, kohya's latent caches).
_SIDECAR_EXTENSIONS = {".txt", ".caption", ".npz", ".json", ".toml"}
#: ``10_name``: kohya's folder convention for "repeat each image of this folder 10 times per epoch".
_REPEATS_RE = re.compile(r"^(\d+)_(.*)$")


class DatasetError(ValueError):
    """The dataset cannot be used as configured; ``field`` names the job field to fix."""

    def __init__(self, message: str, field: str = "dataset_dir"):
        super().__init__(message)
        self.message, self.field = message, field


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
    not_utf8: list[str] = []

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
            width, height, digest = inspect_image(path, verify)
        except Exception as e:  # PIL raises many types for broken files; all mean "skip it"
            unreadable.append(f"{rel} ({short_reason(e)})")
            continue
        caption_file = next((p for p in (path.with_suffix(ext) for ext in caption_exts) if p.is_file()), None)
        if caption_file is None:
            missing_captions += 1
            caption = ""
        else:
            try:
                caption = read_caption(caption_file)
            except UnicodeDecodeError:
                not_utf8.append(caption_file.relative_to(root).as_posix())
                continue
        items.append(ImageItem(path, caption, repeats, width, height, digest, caption_file, group))

    if not_utf8:
        # Decoded anyway they would train as mojibake and be written into ss_tag_frequency.
        raise DatasetError(f"{len(not_utf8)} caption file(s) are not UTF-8 text: " + _name_list(not_utf8)
                           + "; save them as UTF-8 (e.g. in an editor's 'save with encoding')")
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


def _walk(root: Path, seen: set[Path] | None = None) -> Iterator[Path]:
    # Hidden files and folders are skipped: .DS_Store, editors' swap files, and a cache folder a
    # user may have put inside the dataset. A linked folder is followed once: a link back up the tree
    # (a loop) would otherwise keep the scan, and the whole queue, busy forever.
    seen = set() if seen is None else seen
    real = root.resolve()
    if real in seen:
        return
    seen.add(real)
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            yield from _walk(entry, seen)
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


def inspect_image(path: Path, verify: bool) -> tuple[int, int, str]:
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


EXIF_ORIENTATION = 0x0112


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    # Orientations 5-8 rotate by 90 degrees: the trained image has the sides swapped.
    return (img.height, img.width) if orientation in (5, 6, 7, 8) else (img.width, img.height)


def short_reason(e: Exception) -> str:
    if isinstance(e, UnidentifiedImageError):
        return "not a readable image"
    text = str(e).strip() or type(e).__name__
    return text if len(text) <= 80 else text[:77] + "..."


def _name_list(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def read_caption(path: Path) -> str:
    """A caption file's text on one line (BOM removed; several lines joined as tags)."""
    text = path.read_text(encoding="utf-8-sig")        # raises UnicodeDecodeError: see scan_dataset
    lines = [line.strip().strip(",").strip() for line in text.splitlines()]
    return ", ".join(line for line in lines if line)


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Buckets (pure)
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Latent cache (disk)
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Text embedding cache (memory)
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


