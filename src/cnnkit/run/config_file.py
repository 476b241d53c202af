"""Training options in a YAML file: ``cnnkit train --config FILE`` reads one
(:func:`read_options_file`), ``--print-config`` writes one (:func:`to_yaml`); a run's
``config.yaml`` is one. Like :mod:`.config`, this module imports no PyTorch, and YAML is
read with ``yaml.safe_load`` (no tag constructs anything).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .config import TrainConfig

__all__ = ["read_options_file", "to_yaml"]


def read_options_file(path: str) -> dict[str, Any]:
    """The training options of a YAML file (``cnnkit train --config FILE``: any
    :class:`TrainConfig` field; a run's ``config.yaml`` is one), read with
    ``yaml.safe_load`` (no tag constructs anything). Values are checked when the config is
    built from them.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not YAML, not a mapping, or an unknown key: one line naming the key, the
            file and the valid keys.
    """
    import yaml  # lazy: cli start-up

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path!r} does not exist; give a YAML file of "
                                "training options (`cnnkit train --print-config` writes "
                                "one)") from None
    except IsADirectoryError:
        raise ValueError(f"config file {path!r} is a folder; give a YAML file (a run's "
                         "config.yaml works)") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"config file {path!r} is not valid YAML ({' '.join(str(e).split())});"
                         " fix it, or write one with `cnnkit train --print-config`") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path!r} holds a {type(data).__name__}, not a mapping "
                         "of training options (key: value lines); write one with `cnnkit "
                         "train --print-config`")
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    unknown = sorted(str(k) for k in data if k not in names)
    if unknown:
        raise ValueError(f"unknown key {', '.join(map(repr, unknown))} in config file {path!r}; "
                         f"valid keys: {', '.join(names)}")
    return data


def to_yaml(config: TrainConfig) -> str:
    """The config as the YAML text ``config.yaml`` holds (``--print-config``); reading it
    back with :func:`read_options_file` gives the same config."""
    import yaml  # lazy: cli start-up

    return yaml.safe_dump(config.to_dict(), sort_keys=False)
