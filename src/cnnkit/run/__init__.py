"""Run folders: what a run writes and how it is read back, below every library.

A run folder (``runs/<name>/``) is the unit every command works on: ``cnnkit train``
writes one, ``eval``, ``predict``, ``explain``, ``compress``, ``export`` and ``serve`` read
one (:func:`load_run`), and ``compress`` writes a new one. This package holds its parts:
the resolved configuration (:class:`TrainConfig`, ``config.yaml``), the layout and its
claims and locks (:mod:`.folder`), pickle-free weights and training state
(:mod:`.checkpoint`), the checks a weights file must pass (:mod:`.weights`), reading a
run back (:mod:`.load`) and ``report.html`` (:mod:`.report`). It sits above ``models``,
``data`` and ``tasks`` and below the libraries (``train``, ``explain``, ``compress``,
``analysis``), which all read and write runs through it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cnnkit._lazy import lazy_attributes

# The names are imported on first use, as the top-level package does: the CLI reads the
# PyTorch-free TrainConfig (config.py) to build `cnnkit train --help` without PyTorch,
# which the other modules import.
_EXPORTS = {"TrainConfig": "config", "RESUME_OPTIONS": "config", "run_test_data": "data",
            "run_test_split": "data", "RunFolder": "folder", "RunPaths": "folder",
            "claim_run_folder": "folder", "is_unstarted": "folder", "open_run_folder": "folder",
            "read_config": "folder", "resolve_run": "folder", "write_json": "folder",
            "write_yaml": "folder", "Preprocess": "load", "Run": "load", "load_run": "load",
            "read_summary": "load"}

__all__ = ["TrainConfig", "RESUME_OPTIONS", "RunPaths", "RunFolder", "claim_run_folder",
           "open_run_folder", "is_unstarted", "read_config", "resolve_run", "write_json",
           "write_yaml", "Preprocess", "Run", "load_run", "read_summary", "run_test_data",
           "run_test_split"]

if TYPE_CHECKING:
    from .config import RESUME_OPTIONS, TrainConfig
    from .data import run_test_data, run_test_split
    from .folder import (
        RunFolder,
        RunPaths,
        claim_run_folder,
        is_unstarted,
        open_run_folder,
        read_config,
        resolve_run,
        write_json,
        write_yaml,
    )
    from .load import Preprocess, Run, load_run, read_summary


__getattr__ = lazy_attributes(__name__, _EXPORTS, globals())
