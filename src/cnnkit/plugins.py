"""Plugins: the user's modules that register models, data sets, tasks or loggers.

A plugin is an importable module whose import registers things (``@register_model``,
``@register_dataset``, ``@register_task`` ...). cnnkit imports it before a command runs,
from three places:

- ``cnnkit --plugin MODULE`` (repeatable, or ``MODULE,MODULE``), on any command;
- the environment: ``CNNKIT_PLUGINS=mod1,mod2``;
- installed packages declaring the entry point group ``cnnkit.plugins``
  (``[project.entry-points."cnnkit.plugins"] mine = "my_package.cnn"``).

A run records the plugins it needed in its ``config.yaml`` (``plugins:``), and every
reader of that file (``cnnkit eval/predict/explain/serve RUN``, ``cnnkit.load_run``,
``--resume``, ``--config``) imports them first, so a run trained with ``--plugin`` is
used without it. A layer-0 module: it imports the user's modules, nothing of cnnkit.

Example:
    >>> from cnnkit.plugins import load_plugins
    >>> load_plugins(["json"])  # any importable module
    ('json',)
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
from collections.abc import Iterable, Mapping

__all__ = ["ENV", "ENTRY_POINTS", "load_plugins", "env_plugins", "entry_point_plugins",
           "split_names"]

ENV = "CNNKIT_PLUGINS"
ENTRY_POINTS = "cnnkit.plugins"
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def split_names(values: Iterable[str]) -> tuple[str, ...]:
    """``["a,b", "c"]`` -> ``("a", "b", "c")``: comma lists flattened, blanks and repeats
    dropped, order kept."""
    names = (n.strip() for v in values for n in str(v).split(","))
    return tuple(dict.fromkeys(n for n in names if n))


def env_plugins(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The modules named by ``CNNKIT_PLUGINS`` (comma-separated)."""
    return split_names([(os.environ if environ is None else environ).get(ENV, "")])


def load_plugins(names: Iterable[str], source: str = "--plugin") -> tuple[str, ...]:
    """Import each module of ``names`` (already imported ones cost nothing).

    Args:
        names: dotted module names, found on ``sys.path`` (``PYTHONPATH``).
        source: where the names came from, for the error (``--plugin``, ``config.yaml``).

    Returns:
        The names imported, in order.

    Raises:
        ValueError: a name that is not a module name, or a module that cannot be imported
            (the message names it, where it was given and the fix).
    """
    names = split_names(names)
    for name in names:
        if not _MODULE.fullmatch(name):
            raise ValueError(f"plugin {name!r} ({source}) is not a module name; give a dotted "
                             "Python module name such as my_models or my_package.cnn")
        try:
            importlib.import_module(name)  # lazy: optional dependency
        except ModuleNotFoundError as e:
            if e.name is None or not (name == e.name or name.startswith(f"{e.name}.")):
                raise ValueError(f"plugin module {name!r} ({source}) needs module {e.name!r}, "
                                 "which is not installed; install it") from e
            raise ValueError(f"plugin module {name!r} ({source}) cannot be imported: no module "
                             f"named {e.name!r}; put its folder on PYTHONPATH or install it "
                             "(pip install -e PATH)") from None
    return names


def entry_point_plugins() -> tuple[str, ...]:
    """Import the installed plugins of the entry point group ``cnnkit.plugins``; returns
    their module names."""
    found = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINTS):
        ep.load()
        found.append(ep.module)
    return tuple(found)
