"""Lazy package attributes (PEP 562), shared by the packages whose ``__init__`` must not
import PyTorch: the CLI reads their PyTorch-free config modules for ``--help``."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["lazy_attributes"]


def lazy_attributes(package: str, exports: dict[str, str],
                    namespace: dict[str, Any]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``name`` is read from the submodule
    ``exports[name]`` on first use and cached in ``namespace`` (the package's globals).

    Example:
        >>> from cnnkit._lazy import lazy_attributes
        >>> ns = {}
        >>> get = lazy_attributes("cnnkit", {"parse_bytes": "_limits"}, ns)
        >>> get("parse_bytes")("2KB"), "parse_bytes" in ns
        (2000, True)
    """

    def __getattr__(name: str) -> Any:
        if name in exports:
            module = importlib.import_module(f"{package}.{exports[name]}")  # lazy: PEP 562
            value = namespace[name] = getattr(module, name)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
