"""Argument types of the ``cnnkit`` parser: each turns one command-line word into a
checked value, or raises :class:`argparse.ArgumentTypeError` with what was expected, which
argparse prints as one line (exit code 2)."""

from __future__ import annotations

import argparse
import math

__all__ = ["kv", "size", "number", "positive_int", "positive_float", "nonnegative_float",
           "fraction", "lowrank", "ratio_list", "method_option"]


def kv(text: str) -> tuple[str, object]:
    """``key=value`` with the value parsed as YAML (numbers, booleans, lists)."""
    import yaml  # lazy: cli start-up

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError:
        return key, value


def size(text: str) -> tuple[int, ...]:
    """``3x224x224`` -> (3, 224, 224): channels, then 1 to 3 spatial sizes (``CxL`` for
    sequences, ``CxHxW`` for images, ``CxDxHxW`` for volumes)."""
    try:
        values = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        values = ()
    if len(values) not in (2, 3, 4):
        msg = (f"expected CxHxW such as 3x224x224 (CxL for sequences, CxDxHxW for volumes), "
               f"got {text!r}")
        raise argparse.ArgumentTypeError(msg) from None
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return values


def number(text: str, kind: type, low: float, low_ok: bool, high: float = math.inf):
    """Parse ``text`` as ``kind`` within ``low..high`` (``low`` itself allowed when ``low_ok``)."""
    what = "an integer" if kind is int else "a finite number"
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not (math.isfinite(value) and (value >= low if low_ok else value > low) and value < high):
        bound = f"{'at least' if low_ok else 'above'} {low:g}"
        bound += f" and below {high:g}" if math.isfinite(high) else ""
        raise argparse.ArgumentTypeError(f"must be {what} {bound}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return number(text, int, 1, True)


def positive_float(text: str) -> float:
    return number(text, float, 0, False)


def nonnegative_float(text: str) -> float:
    return number(text, float, 0, True)


def fraction(text: str) -> float:
    return number(text, float, 0, True, 1)


def lowrank(text: str) -> str | float:
    """``energy:F`` with F in (0, 1], or a parameter-reduction factor above 1."""
    if text.startswith("energy:"):
        number(text[7:], float, 0, False, 1.000001)
        return text
    return number(text, float, 1, False)


def ratio_list(text: str) -> tuple[float, ...]:
    """Comma-separated fractions in (0, 1), such as ``0.25,0.5``."""
    return tuple(number(part.strip(), float, 0, False, 1) for part in text.split(","))


def method_option(text: str) -> tuple[str, object]:
    """``--opt KEY=VALUE`` of ``cnnkit explain``: :func:`kv`'s YAML values (int, float,
    bool, str, ``[2, 3]``), with lists and comma-separated numbers (``2,3``, ``(2, 3)``) as
    tuples, for sizes per axis.

    Example:
        >>> from cnnkit.cli.options import method_option
        >>> method_option("window=3"), method_option("window=2,3"), method_option("abs=false")
        (('window', 3), ('window', (2, 3)), ('abs', False))
    """
    key, value = kv(text)
    if not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY an option name such as "
                                         f"window, got {text!r}")
    if isinstance(value, str) and "," in value:
        parts = value.strip().strip("()[]").split(",")
        try:
            value = tuple(float(v) if any(c in v for c in ".eE") else int(v)
                          for v in (part.strip() for part in parts))
        except ValueError:
            pass
    if isinstance(value, str) and any(c.isdigit() for c in value):
        try:
            value = float(value)  # YAML 1.1 reads 1e-3 as a string
        except ValueError:
            pass
    if isinstance(value, list):
        value = tuple(value)
    return key, value
