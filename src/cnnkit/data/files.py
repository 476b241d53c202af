"""User data: a folder with one subfolder per class, a ``.csv`` of ``path,label`` rows (an
``.npz`` of arrays: :mod:`cnnkit.data.npz`).

Use these through :func:`cnnkit.data.load_data`, which picks the reader by the
path. Images are decoded once into one uint8 tensor (see :mod:`cnnkit.data._decode`).

Default ``image_size`` for folders and csv files: the most common image size in
the data when its longer side is at most 64 pixels (an MNIST or CIFAR export keeps
its resolution), else 64x64. Images of another size are scaled so they cover the
target and centre cropped. Colour: RGB when any image has colour (any pixel with
unequal R, G, B), else grayscale; ``channels=`` forces 1 or 3.
"""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

import torch

from ._decode import default_size, image_files, read_images
from ._types import ImageData, convert_channels, to_size

__all__ = ["load_folder", "load_csv"]

_PATH_COLUMNS = {"path", "file", "filename", "filepath", "file_path", "image", "image_path",
                 "img", "images"}
_LABEL_COLUMNS = {"label", "labels", "class", "class_name", "target", "y", "category"}


def load_folder(path: Path, *, name: str | None = None,
                image_size: int | tuple[int, int] | None = None, channels: int | None = None,
                strict: bool = False, num_workers: int | None = None,
                progress: bool | None = None) -> ImageData:
    """Read ``path/<class>/**/<image>``: one subfolder per class, classes in sorted name order.

    Args:
        path: the root folder.
        name: name of the data in messages and in :attr:`ImageData.name` (default: the path).
        image_size: output size; see the module docstring for the default.
        channels: force 1 or 3 channels.
        strict: raise on the first unreadable image instead of skipping it.
        num_workers: decoding threads (default ``min(4, cpu_count)``).
        progress: show a progress bar; by default only on a terminal.

    Raises:
        ValueError: no images, fewer than two class subfolders, or (strict) a corrupt file.
    """
    root, name = Path(path), name or str(path)
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    per_class = {d.name: image_files(d) for d in subdirs}
    classes = [c for c, f in per_class.items() if f]
    if not classes:
        loose = len(image_files(root))
        if loose:
            raise ValueError(f"folder '{name}' has {loose} images but no class subfolders; "
                             f"move them into one subfolder per class ({name}/<class>/*.png)")
        raise ValueError(f"folder '{name}' contains no images; put each class's images in "
                         f"its own subfolder ({name}/<class>/*.png)")
    if len(classes) < 2:
        raise ValueError(f"folder '{name}' has one class subfolder ('{classes[0]}'); a "
                         "classifier needs at least two class subfolders, one per class")
    empty = [c for c, f in per_class.items() if not f]
    if empty:
        warnings.warn(f"ignored {len(empty)} class folder(s) without images in '{name}': "
                      f"{', '.join(empty[:5])}", stacklevel=3)
    paths = [p for c in classes for p in per_class[c]]
    labels = [k for k, c in enumerate(classes) for _ in per_class[c]]
    return _from_files(paths, labels, classes, name, image_size, channels, strict, num_workers,
                       progress)


def load_csv(path: Path, *, name: str | None = None,
             image_size: int | tuple[int, int] | None = None, channels: int | None = None,
             strict: bool = False, num_workers: int | None = None,
             progress: bool | None = None, values: bool = False) -> ImageData:
    """Read a csv of ``path,label`` rows; relative paths are resolved against the csv's folder.

    A first row whose columns are named (``path``/``file``/``image``...,
    ``label``/``class``/``target``...) is a header; then those columns are used,
    else the first two. Blank lines are ignored. Labels are class names; when every
    label is an integer the classes are those integers in numeric order (so labels
    0..K-1 keep their values). Options as in :func:`load_folder`.

    Raises:
        ValueError: a malformed row or a missing file (naming the line), fewer than
            two classes, or (strict) a corrupt file.
    """
    csv_path, name = Path(path), name or str(path)
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            rows = [(i, r) for i, r in enumerate(csv.reader(f), start=1)
                    if any(s.strip() for s in r)]
    except (UnicodeDecodeError, csv.Error) as e:
        reason = f"byte {e.object[e.start]:#04x} at offset {e.start} is not UTF-8 text" \
            if isinstance(e, UnicodeDecodeError) else str(e)
        raise ValueError(f"csv '{name}' is not a text file of path,label rows ({reason}); give "
                         "a UTF-8 .csv (or a folder / .npz)") from None
    pcol, lcol, value_name = 0, 1, "value"
    if rows:
        head = [s.strip().lower() for s in rows[0][1]]
        if any(h in _PATH_COLUMNS for h in head) or any(h in _LABEL_COLUMNS for h in head):
            pcol = next((j for j, h in enumerate(head) if h in _PATH_COLUMNS), 0)
            lcol = next((j for j, h in enumerate(head) if h in _LABEL_COLUMNS),
                        1 if pcol == 0 else 0)  # else: the first column that is not the path
            value_name = rows[0][1][lcol].strip() if lcol < len(rows[0][1]) else value_name
            rows = rows[1:]
    if not rows:
        raise ValueError(f"csv '{name}' has no data rows; write one 'path,label' row per image")
    paths, names, missing = [], [], []
    for line, row in rows:
        fields = [s.strip() for s in row]
        if len(fields) <= max(pcol, lcol) or not fields[pcol] or not fields[lcol]:
            raise ValueError(f"csv '{name}' line {line}: expected 'path,label', got "
                             f"{','.join(row)!r}; fix or delete the row")
        p = _row_path(fields[pcol], csv_path.parent)
        if not _is_file(p):
            missing.append((line, fields[pcol], p))
        paths.append(p)
        names.append(fields[lcol])
    if missing:
        line, given, p = missing[0]
        more = f" ({len(missing) - 1} more rows name missing files)" if len(missing) > 1 else ""
        hint = " (if line 1 is a header, name its columns path,label)" if line == 1 else ""
        # repr: a quoted field may hold a line break, and the message is one line
        raise ValueError(f"csv '{name}' line {line}: image {given!r} not found at {str(p)!r}"
                         f"{more}; fix the path (relative paths are read from the csv's folder)"
                         f"{hint}")
    if values:  # regression: the label column holds numbers
        return _csv_values(paths, names, name, value_name, image_size, channels, strict,
                           num_workers, progress)
    try:
        classes = [str(v) for v in sorted({int(s) for s in names})]
        index = {c: k for k, c in enumerate(classes)}
        labels = [index[str(int(s))] for s in names]
    except ValueError:  # not all integers: class names in sorted order
        classes = sorted(set(names))
        index = {c: k for k, c in enumerate(classes)}
        labels = [index[s] for s in names]
    if len(classes) < 2:
        raise ValueError(f"csv '{name}' has one class ({classes[0]!r}); a classifier needs at "
                         "least two classes")
    return _from_files(paths, labels, classes, name, image_size, channels, strict, num_workers,
                       progress)


def _csv_values(paths, texts, name, value_name, image_size, channels, strict, num_workers,
                progress) -> ImageData:
    numbers = []
    for i, s in enumerate(texts):
        try:
            numbers.append(float(s))
        except ValueError:
            raise ValueError(f"csv '{name}': value {s!r} (row {i + 1} of data) is not a number; "
                             "regression needs a number in every row's label column") from None
        if not math.isfinite(numbers[-1]):
            raise ValueError(f"csv '{name}': value {s!r} (row {i + 1} of data) is not finite; "
                             "fix or drop the row")
    return _from_files(paths, [0] * len(paths), [value_name], name, image_size, channels,
                       strict, num_workers, progress, values=numbers)


def _row_path(given: str, folder: Path) -> Path:
    """A csv row's path: ``~`` expanded (left as is for an unknown user), relative paths
    read from the csv's folder."""
    try:
        p = Path(given).expanduser()
    except RuntimeError:  # "~nosuchuser/a.png": no home directory to expand to
        p = Path(given)
    return p if p.is_absolute() else folder / p


def _is_file(p: Path) -> bool:
    try:
        return p.is_file()
    except OSError:  # a name too long, or otherwise impossible: no such file
        return False


def _from_files(paths, labels, classes, name, image_size, channels, strict, num_workers,
                progress, values: list[float] | None = None) -> ImageData:
    size = to_size(image_size) if image_size is not None else default_size(paths)
    images, kept = read_images(paths, size, name=name, strict=strict, num_workers=num_workers,
                               progress=progress)
    return ImageData(convert_channels(images, channels), torch.tensor([labels[i] for i in kept]),
                     list(classes), name, augment="flip_crop", skipped=len(paths) - len(kept),
                     sources=[str(paths[i]) for i in kept],
                     values=None if values is None else torch.tensor([values[i] for i in kept]))
