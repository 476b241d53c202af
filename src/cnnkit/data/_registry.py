"""The data set registry and :func:`load_data`, the one entry point to all data.

A built-in data set is a function ``name(*, image_size, channels, seed, **options)
-> ImageData`` decorated with :func:`register_dataset`. Anything that is not a
registered name is read as a path: a folder with one subfolder per class, a
``.csv`` of ``path,label`` rows (:mod:`cnnkit.data.files`) or an ``.npz`` of arrays
(:mod:`cnnkit.data.npz`).
"""

from __future__ import annotations

import difflib
import inspect
import os
from collections.abc import Callable
from pathlib import Path

from . import files, npz, pairs, volumes
from ._decode import quiet_bomb_warnings
from ._types import ImageData
from .arrays import IN_MEMORY, in_memory_error

__all__ = ["register_dataset", "list_datasets", "dataset_info", "dataset_recipe",
           "dataset_targets", "load_data",
           "TARGETS", "RECIPE_KEYS"]

# Filled by the package's __init__, which imports every built-in module and which Python
# runs to its end before code outside the package can call this module's functions.
_DATASETS: dict[str, Callable[..., ImageData]] = {}
_HOLDS: dict[str, tuple[str, ...]] = {}  # the targets each built-in data set holds
_RECIPES: dict[str, dict[str, dict]] = {}  # per data set: task -> training settings
# The training settings a data set's recipe may give (the fields a task's defaults give).
RECIPE_KEYS = ("epochs", "batch_size", "optimizer", "lr", "weight_decay")
# What a data set may be read for: a class per sample, a mask per sample, the inputs
# themselves (super-resolution) or real values per sample (regression).
TARGETS = ("labels", "masks", "images", "values")


def register_dataset(fn: Callable[..., ImageData] | None = None, *,
                     targets: tuple[str, ...] = ("labels",),
                     recipes: dict[str, dict] | None = None):
    """Register a built-in data set under its function name.

    Use it bare (``@register_dataset``) for a data set of labelled inputs, or say what
    else it holds (``@register_dataset(targets=("labels", "masks", "images"))``). The
    function is called as ``fn(image_size=..., channels=..., seed=..., **options)`` and
    returns an :class:`ImageData`; its first docstring line is the description.

    ``recipes`` maps a task name to the training settings that data set needs beyond the
    task's defaults (:data:`RECIPE_KEYS`: epochs, batch size, optimizer, learning rate,
    weight decay), as ``shapes3d`` does for volumes; a setting given by the user wins.

    Raises:
        ValueError: a data set of that name is registered already, unknown targets or
            recipe keys.
    """
    unknown = sorted(set(targets) - set(TARGETS))
    bad = sorted({k for r in (recipes or {}).values() for k in r} - set(RECIPE_KEYS))
    if bad:
        raise ValueError(f"unknown recipe settings {', '.join(bad)}; choose from "
                         f"{', '.join(RECIPE_KEYS)}")
    if unknown:
        raise ValueError(f"unknown targets {', '.join(unknown)}; choose from "
                         f"{', '.join(TARGETS)}")

    def deco(fn: Callable[..., ImageData]) -> Callable[..., ImageData]:
        name = fn.__name__
        if name in _DATASETS:
            raise ValueError(f"data set {name!r} is registered twice ({fn.__module__} and "
                             f"{_DATASETS[name].__module__}); rename one of them")
        _DATASETS[name] = fn
        _HOLDS[name] = tuple(targets)
        _RECIPES[name] = {task: dict(r) for task, r in (recipes or {}).items()}
        return fn

    return deco if fn is None else deco(fn)


def list_datasets() -> list[str]:
    """Names of the built-in data sets, sorted.

    Example:
        >>> from cnnkit.data import list_datasets
        >>> list_datasets()
        ['digits', 'shapes', 'shapes3d']
    """
    return sorted(_DATASETS)


def dataset_info(name: str) -> str:
    """One-line description of a built-in data set.

    Example:
        >>> from cnnkit.data import dataset_info
        >>> dataset_info("digits")
        'Handwritten digits 0-9: 1797 real 8x8 grayscale images (Alpaydin & Kaynak 1998).'
    """
    if name not in _DATASETS:
        raise ValueError(f"unknown data set {name!r}{_suggest(name)}; "
                         f"built-in data sets: {', '.join(sorted(_DATASETS))}")
    return (inspect.getdoc(_DATASETS[name]) or "").split("\n")[0]


def dataset_targets(name: str) -> tuple[str, ...]:
    """What built-in data set ``name`` holds targets for (:data:`TARGETS`); the inputs
    themselves (``"images"``) always.

    Example:
        >>> from cnnkit.data import dataset_targets
        >>> dataset_targets("shapes")
        ('labels', 'masks', 'images')
    """
    dataset_info(name)  # an unknown name raises, naming the nearest
    return (*_HOLDS[name], "images")


def dataset_recipe(name: str, task: str) -> dict:
    """The training settings built-in data set ``name`` gives for ``task`` (empty for a
    path, or when the task's defaults serve it).

    Example:
        >>> from cnnkit.data import dataset_recipe
        >>> dataset_recipe("shapes3d", "segment")["optimizer"]
        'adamw'
        >>> dataset_recipe("digits", "classify"), dataset_recipe("my_folder/", "classify")
        ({}, {})
    """
    return dict(_RECIPES.get(name, {}).get(task, {}))


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name, sorted(_DATASETS), n=3, cutoff=0.5)
    return f" (did you mean: {', '.join(close)}?)" if close else ""


def _looks_like_path(spec: str) -> bool:
    # A bare word ("digts") is a misspelt name; anything with a separator, a suffix or
    # a home/relative prefix was meant as a path.
    return (os.sep in spec or "/" in spec or spec.startswith(("~", "."))
            or Path(spec).suffix != "")


def load_data(spec: str | os.PathLike, *, image_size: int | tuple[int, int] | None = None,
              channels: int | None = None, strict: bool = False, seed: int = 0,
              targets: str = "labels", **options) -> ImageData:
    """Load a built-in data set or the user data at a path.

    Args:
        spec: a built-in name (:func:`list_datasets`), or a path to a folder (one
            subfolder per class), a ``.csv`` (``path,label`` rows) or an ``.npz``.
            A built-in name wins over a folder of the same name: write ``./digits``.
        image_size: output ``H = W`` or ``(H, W)``; the data set's native size when None
            (for folders and csv files: see :func:`cnnkit.data.files.load_folder`).
        channels: force 1 (grayscale) or 3 (RGB) channels; native when None.
        strict: raise on an unreadable image instead of skipping and counting it.
        seed: seed of procedural data sets.
        targets: what the data must hold beside its inputs (a task's ``data_targets``):
            ``"labels"`` (class indices); ``"masks"`` (``shapes``, or a folder with
            ``images/`` and ``masks/``, see :mod:`cnnkit.data.pairs`); ``"images"`` (every
            image of a folder, whatever its subfolders: the inputs are the targets);
            ``"values"`` (real values: an npz whose ``y`` holds numbers, a csv whose label
            column does).
        **options: options of the data set (``shapes``: ``n``, ``count`` ...).

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: an unknown name, unknown option or malformed data, with the fix.

    Example:
        >>> from cnnkit.data import load_data
        >>> d = load_data("digits")
        >>> d.input_size, d.classes[:3], d.augment
        ((1, 8, 8), ['0', '1', '2'], 'digits')
        >>> d.images.shape, d.images.dtype, d.labels[:5].tolist()
        (torch.Size([1797, 1, 8, 8]), torch.uint8, [0, 1, 2, 3, 4])
        >>> from pathlib import Path
        >>> from PIL import Image
        >>> for label, colour in [("cat", "red"), ("dog", "blue")]:  # one folder per class
        ...     Path("pets", label).mkdir(parents=True)
        ...     for i in range(3):
        ...         Image.new("RGB", (20, 16), colour).save(f"pets/{label}/{i}.png")
        >>> pets = load_data("pets", image_size=12)  # any size: resized
        >>> pets.images.shape, pets.classes, pets.labels.tolist(), pets.sources[0]
        (torch.Size([6, 3, 12, 12]), ['cat', 'dog'], [0, 0, 0, 1, 1, 1], 'pets/cat/0.png')
    """
    if channels not in (None, 1, 3):
        raise ValueError(f"channels={channels} is not supported; give 1 (grayscale) or 3 (RGB)")
    if targets not in TARGETS:
        raise ValueError(f"unknown targets {targets!r}; choose from {', '.join(TARGETS)}")
    spec_str = os.fspath(spec)
    if spec_str == IN_MEMORY:  # a run trained on arrays: they were not saved
        raise in_memory_error()
    if spec_str in _DATASETS:
        fn = _DATASETS[spec_str]
        _check_options(spec_str, fn, options)
        data = fn(image_size=image_size, channels=channels, seed=seed, **options)
        if targets in ("masks", "values") and targets not in _HOLDS[spec_str]:
            have = sorted(n for n, held in _HOLDS.items() if targets in held)
            raise ValueError(f"data set {spec_str!r} has no {targets}; use "
                             f"{', '.join(have) or 'your own data'} or "
                             + ("a folder with images/ and masks/" if targets == "masks"
                                else "an .npz whose y holds numbers"))
        return data

    path = Path(spec_str).expanduser()
    if not path.exists():
        if not _looks_like_path(spec_str):
            raise ValueError(f"unknown data set {spec_str!r}{_suggest(spec_str)}; built-in data "
                             f"sets: {', '.join(sorted(_DATASETS))}, or give a folder/.csv/.npz "
                             "path")
        raise FileNotFoundError(f"data path {spec_str!r} does not exist; give a built-in data set "
                                f"({', '.join(sorted(_DATASETS))}) or a folder/.csv/.npz path")
    reads = {}  # what the reader is asked to read, beside the user's options
    if targets in ("masks", "images") and not path.is_dir():
        raise ValueError(f"{targets} are read from a folder, not {spec_str!r}: "
                         + ("a folder with images/ and masks/" if targets == "masks"
                            else "a folder of images"))
    if path.is_dir() and volumes.has_volumes(path):  # NIfTI volumes: 3D samples
        if targets not in ("labels", "masks"):
            raise ValueError(f"folder {spec_str!r} holds NIfTI volumes, which are read for "
                             "classification (one subfolder per class) or segmentation "
                             f"(images/ and masks/), not for {targets}")
        if targets == "masks" and not pairs.is_pair_folder(path):
            raise ValueError(f"folder {spec_str!r} has no images/ and masks/ subfolders; "
                             "volume segmentation data is images/<name>.nii.gz with "
                             "masks/<name>.nii.gz")
        fn = volumes.load_volume_pairs if targets == "masks" else volumes.load_volume_folder
    elif targets == "masks":
        if not pairs.is_pair_folder(path):
            raise ValueError(f"folder {spec_str!r} has no images/ and masks/ subfolders; "
                             "segmentation data is images/<name>.png with masks/<name>.png")
        fn = pairs.load_pairs
    elif targets == "images":
        fn = pairs.load_images
    elif path.is_dir() and targets == "labels":
        fn = files.load_folder
    elif path.suffix.lower() in (".csv", ".npz"):
        fn = files.load_csv if path.suffix.lower() == ".csv" else npz.load_npz
        reads["values"] = targets == "values"
    else:
        raise ValueError(f"cannot read data from {spec_str!r}: give a folder (one subfolder per "
                         "class), a .csv of path,label rows or an .npz of images and "
                         + ("values" if targets == "values" else "labels"))
    _check_options(spec_str, fn, options, skip=1)
    with quiet_bomb_warnings():  # open_image checks every file's pixels from its header
        return fn(path, name=spec_str, image_size=image_size, channels=channels,
                  strict=strict, **reads, **options)


def _check_options(name: str, fn: Callable, options: dict, skip: int = 0) -> None:
    fixed = {"name", "image_size", "channels", "seed", "strict", "values"}
    params = list(inspect.signature(fn).parameters)[skip:]
    allowed = [p for p in params if p not in fixed]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"data {name!r} has no option {', '.join(unknown)}; its options: "
                         f"{', '.join(allowed) or 'none'}")
