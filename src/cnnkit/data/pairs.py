"""User data for dense prediction: image/mask folder pairs and plain folders of images.

Segmentation (``cnnkit train --task segment --data FOLDER``) reads ``FOLDER/images/``
and ``FOLDER/masks/``: each image is paired with the mask of the same file stem
(``images/a.jpg`` with ``masks/a.png``; subfolders are matched by their relative
path). A mask is a single-channel image whose pixel values are class indices: an
8-bit grayscale ("L") PNG, or a palette ("P") PNG, whose indices are used and whose
colours are ignored, as in Pascal VOC. Value 255 marks unlabelled pixels, which
training and scoring ignore. An optional ``FOLDER/classes.txt`` names the classes,
one per line, line ``k`` naming value ``k``.

Super-resolution (``--task superres``) reads every image under a folder, whatever
its subfolders; the low-resolution inputs are made from them during training.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ._decode import (
    _DECODE_ERRORS,
    ImageTooLarge,
    default_size,
    image_files,
    open_image,
    read_images,
)
from ._types import IGNORE_INDEX, ImageData, convert_channels, to_size

__all__ = ["is_pair_folder", "load_pairs", "load_images"]

_MASK_MODES = ("L", "P", "1", "I", "I;16", "I;16B", "I;16L")


def is_pair_folder(path: Path) -> bool:
    """True when ``path`` has both an ``images/`` and a ``masks/`` subfolder."""
    return (path / "images").is_dir() and (path / "masks").is_dir()


def _by_stem(root: Path, files: list[Path]) -> dict[str, Path]:
    keyed: dict[str, Path] = {}
    for f in files:
        key = str(f.relative_to(root).with_suffix(""))
        if key in keyed:
            raise ValueError(f"'{keyed[key]}' and '{f}' have the same name; pairs are matched "
                             "by file name without extension, so rename one of them")
        keyed[key] = f
    return keyed


def read_mask(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """A mask file as uint8 ``[H, W]`` class indices, resized (nearest) to ``size`` if given.

    Raises:
        ValueError: the file cannot be read, is an RGB(A) image or has indices outside 0..255.
    """
    a = None
    try:
        with open_image(path) as im:
            im.load()
            mode = im.mode
            if mode in _MASK_MODES:
                a = np.asarray(im, dtype=np.uint8) if mode == "1" else np.asarray(im)
    except ImageTooLarge:
        raise
    except _DECODE_ERRORS as e:  # a mask is a label: never skipped, even when strict=False
        raise ValueError(f"cannot read mask '{path}' ({' '.join(str(e).split())}); fix the "
                         "file, or delete it and its image") from e
    if a is None:
        raise ValueError(f"mask '{path}' is a {mode} image; save masks as 8-bit grayscale "
                         "(L) or palette (P) PNGs whose pixel values are class indices")
    if a.min(initial=0) < 0 or a.max(initial=0) > 255:
        bad = int(a.min()) if a.min() < 0 else int(a.max())
        raise ValueError(f"mask '{path}' has class index {bad}; mask values are class indices "
                         "0..254 (255 marks ignored pixels, so at most 255 classes): remap them")
    im = Image.fromarray(a.astype(np.uint8))
    if size is not None and im.size != (size[1], size[0]):
        # The same cover-and-crop as the images (decode's ImageOps.fit), but nearest.
        im = ImageOps.fit(im, (size[1], size[0]), method=Image.Resampling.NEAREST)
    return np.array(im)


def load_pairs(path: Path, *, name: str | None = None,
               image_size: int | tuple[int, int] | None = None, channels: int | None = None,
               strict: bool = False, num_workers: int | None = None,
               progress: bool | None = None) -> ImageData:
    """Read a segmentation folder ``path/images/`` + ``path/masks/`` (see the module docstring).

    Images and masks are resized to one size (``image_size``, default as for class
    folders) with the same cover-and-centre-crop, images bilinearly and masks by
    nearest neighbour. ``ImageData.labels`` holds each mask's most frequent
    non-background class (for the stratified split).

    Raises:
        ValueError: an image without a mask or a mask without an image, an image and
            its mask of different sizes, an RGB mask, or a class index beyond
            ``classes.txt``.
    """
    root, name = Path(path), name or str(path)
    img_dir, mask_dir = root / "images", root / "masks"
    images_by = _by_stem(img_dir, image_files(img_dir))
    masks_by = _by_stem(mask_dir, image_files(mask_dir))
    if not images_by:
        raise ValueError(f"'{img_dir}' contains no images; put the input images there and their "
                         "masks, with the same file names, in masks/")
    lonely = sorted(set(images_by) - set(masks_by))
    orphans = sorted(set(masks_by) - set(images_by))
    for what, keys, where in (("image", lonely, "masks"), ("mask", orphans, "images")):
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise ValueError(f"{what} '{keys[0]}'{more} in '{name}' has no partner in {where}/; "
                             "every image needs a mask with the same file name")
    keys = sorted(images_by)
    for k in keys:  # headers only: a mismatch is an error even when it could be resized away
        try:
            with Image.open(images_by[k]) as a, Image.open(masks_by[k]) as b:
                if a.size != b.size:
                    raise ValueError(
                        f"image '{images_by[k]}' is {a.width}x{a.height} but its mask "
                        f"'{masks_by[k]}' is {b.width}x{b.height}; a mask must have its image's "
                        "size")
        except _DECODE_ERRORS as e:
            if isinstance(e, ValueError) and "a mask must have" in str(e):
                raise
            continue  # an unreadable image is reported (skipped or raised) below
    paths = [images_by[k] for k in keys]
    size = to_size(image_size) if image_size is not None else default_size(paths)
    images, kept = read_images(paths, size, name=name, strict=strict, num_workers=num_workers,
                               progress=progress)
    masks = torch.from_numpy(np.stack([read_mask(masks_by[keys[i]], size) for i in kept]))
    mask_classes = _mask_classes(root, masks, name)
    labels = _dominant_class(masks)
    return ImageData(convert_channels(images, channels), labels, list(mask_classes), name,
                     masks=masks, augment="flip_crop", skipped=len(paths) - len(kept),
                     sources=[str(paths[i]) for i in kept], mask_classes=mask_classes)


def _mask_classes(root: Path, masks: torch.Tensor, name: str) -> list[str]:
    values = torch.unique(masks).tolist()
    used = [v for v in values if v != IGNORE_INDEX]
    top = max(used, default=0)
    names_file = root / "classes.txt"
    if not names_file.is_file():
        if len(used) < 2:
            only = ", ".join(map(str, values))
            hint = (" (255 marks ignored pixels: a 0/255 mask ignores its whole foreground; "
                    "save binary masks as 0/1)") if IGNORE_INDEX in values else ""
            raise ValueError(f"the masks in '{name}' hold only the value(s) {only}{hint}; mask "
                             "pixels are class indices 0..K-1 and segmentation needs at least "
                             "two classes")
        if top + 1 > 2 * len(used):  # 0/200 masks would make 201 classes, 199 never seen
            raise ValueError(f"the masks in '{name}' use the values {', '.join(map(str, used))}, "
                             f"which would make {top + 1} classes with {top + 1 - len(used)} "
                             "never seen; mask pixels are class indices 0..K-1: remap them "
                             "(e.g. 0/200 to 0/1), or name every class in classes.txt")
        return [str(k) for k in range(max(top + 1, 2))]
    try:
        text = names_file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"'{names_file}' is not UTF-8 text (byte {e.object[e.start]:#04x} at "
                         f"offset {e.start}); save it as UTF-8, one class name per line") from None
    names = [s.strip() for s in text.splitlines() if s.strip()]
    if top >= len(names):
        raise ValueError(f"masks in '{name}' use class index {top} but classes.txt names only "
                         f"{len(names)} classes (0..{len(names) - 1}); add the missing names")
    if len(names) < 2:
        raise ValueError(f"classes.txt in '{name}' names {len(names)} class; segmentation needs "
                         "at least two (e.g. background and the object)")
    return names


def _dominant_class(masks: torch.Tensor) -> torch.Tensor:
    """Each mask's most frequent class other than 0 and 255 (0 if it has none)."""
    flat = masks.reshape(len(masks), -1).long()
    counts = torch.zeros(len(masks), 256, dtype=torch.long)
    counts.scatter_add_(1, flat, torch.ones_like(flat))
    counts[:, 0] = counts[:, IGNORE_INDEX] = 0
    has = counts.sum(1) > 0
    return torch.where(has, counts.argmax(1), torch.zeros_like(has, dtype=torch.long))


def load_images(path: Path, *, name: str | None = None,
                image_size: int | tuple[int, int] | None = None, channels: int | None = None,
                strict: bool = False, num_workers: int | None = None,
                progress: bool | None = None) -> ImageData:
    """Every image under ``path`` (any subfolders), one size, for super-resolution.

    Labels are the first-level subfolder of each file (0 for files at the top), only
    so the split can stratify; the images are the targets.

    Raises:
        ValueError: the folder holds no images.
    """
    root, name = Path(path), name or str(path)
    paths = image_files(root)
    if not paths:
        raise ValueError(f"folder '{name}' contains no images; give a folder of image files")
    groups = [p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else ""
              for p in paths]
    classes = sorted(set(groups))
    size = to_size(image_size) if image_size is not None else default_size(paths)
    images, kept = read_images(paths, size, name=name, strict=strict, num_workers=num_workers,
                               progress=progress)
    index = {c: k for k, c in enumerate(classes)}
    labels = torch.tensor([index[groups[i]] for i in kept])
    counts = Counter(labels.tolist())
    if min(counts.values()) < 3:  # too few to stratify: treat the folder as one group
        labels = torch.zeros_like(labels)
        classes = ["image"]
    return ImageData(convert_channels(images, channels), labels, [c or "image" for c in classes],
                     name, augment="flip_crop", skipped=len(paths) - len(kept),
                     sources=[str(paths[i]) for i in kept])
