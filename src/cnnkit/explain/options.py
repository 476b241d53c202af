"""The options of the explanation methods: what ``--opt KEY=VALUE`` of ``cnnkit explain``
may set, read from each method's constructor, and handed to the methods that take them.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from ._base import method_class

__all__ = ["method_options", "split_options"]


def method_options(name: str) -> list[str]:
    """The options of method ``name``: its constructor's keyword arguments but ``model``
    and ``layer`` (``--opt KEY=VALUE`` of ``cnnkit explain``).

    Example:
        >>> from cnnkit.explain.options import method_options
        >>> method_options("occlusion")
        ['window', 'stride', 'baseline', 'internal_batch_size', 'masking']
    """
    params = inspect.signature(method_class(name).__init__).parameters
    return [p for p in params if p not in ("self", "model", "layer")
            and params[p].kind in (params[p].POSITIONAL_OR_KEYWORD, params[p].KEYWORD_ONLY)]


def split_options(methods: Sequence[str], options: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``options`` handed to each of ``methods`` that takes them (``--opt window=3`` goes to
    occlusion, not to saliency).

    Raises:
        ValueError: an option no method takes, with each method's valid options.

    Example:
        >>> from cnnkit.explain.options import split_options
        >>> split_options(["saliency", "occlusion"], {"window": 3})
        {'saliency': {}, 'occlusion': {'window': 3}}
    """
    valid = {m: method_options(m) for m in methods}
    unknown = [k for k in options if not any(k in v for v in valid.values())]
    if unknown:
        choices = "; ".join(f"{m}: {', '.join(v) or 'none'}" for m, v in valid.items())
        raise ValueError(f"unknown option {unknown[0]!r} for {', '.join(methods)}; valid "
                         f"options are {choices}")
    return {m: {k: v for k, v in options.items() if k in valid[m]} for m in methods}
