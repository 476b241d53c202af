"""Every CLI hint speaks CLI (issue 14, point 7): every option of every subcommand has help,
and output into a pipe closed early ends quietly."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from cnnkit.cli.main import build_parser


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {"cnnkit": parser, **sub.choices}


@pytest.mark.parametrize("command", list(_subparsers()))
def test_every_option_has_help(command):
    parser = _subparsers()[command]
    missing = [(a.option_strings or [a.dest])[0] for a in parser._actions
               if not isinstance(a, argparse._SubParsersAction)
               and a.help is not argparse.SUPPRESS and not (a.help or "").strip()]
    assert not missing, f"cnnkit {command}: options without help: {missing}"
    parser.format_help()  # every %(default)s and %(choices)s in the help formats


@pytest.mark.parametrize("command", [c for c in _subparsers() if c != "cnnkit"])
def test_every_command_takes_plugins(command):
    flags = {s for a in _subparsers()[command]._actions for s in a.option_strings}
    assert "--plugin" in flags


def test_every_subcommand_is_listed_in_the_help_with_a_summary():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    listed = {a.dest: a.help for a in sub._choices_actions}
    assert set(listed) == set(sub.choices) and all(listed.values()), listed


def test_a_pipe_closed_early_ends_quietly():
    """`cnnkit models | head -1`: the reader goes away before cnnkit writes; Python's
    advice (signal module, "Note on SIGPIPE"): no traceback, no "Broken pipe", exit 1."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    read, write = os.pipe()
    os.close(read)  # closed before the first write: every write fails with EPIPE
    try:
        res = subprocess.run([sys.executable, "-m", "cnnkit", "summary", "resnet18"],
                             stdout=write, stderr=subprocess.PIPE, text=True, timeout=120,
                             env=env)
    finally:
        os.close(write)
    assert res.returncode == 1, res.stderr
    assert res.stderr == ""
