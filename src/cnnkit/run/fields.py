"""Typed config fields: what each field of a config dataclass says about itself.

Every config dataclass (:class:`~cnnkit.run.config.TrainConfig`,
:class:`~cnnkit.workflows.bench.BenchConfig`) is the one definition of its options: a
field's annotation is its type, checked for every value (:func:`check_types`, so a
hand-edited ``config.yaml`` fails with the key and the type), and its :class:`Option` is
how it appears on the command line (help, flags, choices, bounds), read by
:mod:`cnnkit.cli.generate`. Nothing here imports PyTorch.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Option", "option", "field_option", "check_types", "check_choices"]


@dataclass(frozen=True)
class Option:
    """How a config field appears on the command line, kept in the field's metadata
    (``dataclasses.field(metadata={"option": Option(...)})``, or :func:`option`) and read by
    :mod:`cnnkit.cli.generate`. The type, default and name come from the field itself.

    Attributes:
        help: the option's help; the field's entry in its class's ``Attributes:`` docstring
            when None. The default is appended unless it is None or a bool. For a bool that
            defaults to True the option is ``--no-NAME``, and the help says what that does.
        flags: the option strings when they are not ``--field-name`` (aliases after it).
        choices: the values the field takes (checked by the config and the parser).
        metavar: the value's name in the help (``--early-stopping PATIENCE``).
        bounds: ``"positive"``, ``"non-negative"`` or ``"fraction"`` ([0, 1)): checked as the
            command line is parsed, with the value in the one-line error.
        cli: False keeps the field off the command line (config.yaml and Python only).
    """

    help: str | None = None
    flags: tuple[str, ...] = ()
    choices: tuple[Any, ...] | None = None
    metavar: str | None = None
    bounds: str | None = None
    cli: bool = True


def option(default: Any = dataclasses.MISSING, help: str | None = None, *,
           default_factory: Any = dataclasses.MISSING, **cli: Any) -> Any:
    """A dataclass field with its command-line :class:`Option`.

    Example:
        >>> import dataclasses
        >>> from dataclasses import dataclass
        >>> from cnnkit.run.fields import option
        >>> @dataclass
        ... class Config:
        ...     depth: int = option(4, "slices per volume", bounds="positive")
        >>> dataclasses.fields(Config)[0].metadata["option"].bounds
        'positive'
    """
    return field(default=default, default_factory=default_factory,
                 metadata={"option": Option(help, **cli)})


def field_option(f: dataclasses.Field) -> Option:
    """The field's command-line :class:`Option` (the plain one if it has none)."""
    return f.metadata.get("option", Option())


def _kind(hint: Any) -> str:
    """What a type hint accepts, in words."""
    if hint is Any:
        return "anything"
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_kind(a) for a in args)
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is dict:
        return "a mapping of names to values (KEY: VALUE lines)"
    if typing.get_origin(hint) is tuple:
        count = "" if args[-1] is Ellipsis else f"{len(args)} "
        return f"a list of {count}{_kind(args[0]).split(' ', 1)[1]}s"
    return {bool: "true or false", int: "an integer", float: "a finite number",
            str: "a string"}[hint]


def _coerce(hint: Any, value: Any) -> tuple[bool, Any]:
    """``(accepted, value)``: whether ``value`` fits ``hint``, and the value converted
    (an integer where a float is expected, a list where a tuple is)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for a in args:
            ok, v = _coerce(a, value)
            if ok:
                return True, v
        return False, value
    if hint is Any:
        return True, value
    if hint is type(None):
        return value is None, value
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value), value
    if origin is tuple:
        if args[-1] is Ellipsis and isinstance(value, (list, tuple)):  # tuple[X, ...]
            args = (args[0],) * len(value)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            return False, value
        items = [_coerce(a, v) for a, v in zip(args, value, strict=True)]
        return all(ok for ok, _ in items), tuple(v for _, v in items)
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and \
            math.isfinite(value)
        return ok, float(value) if ok else value
    return isinstance(value, hint), value


def check_types(config: Any) -> None:
    """Check every field of the dataclass instance ``config`` against its type annotation
    (converting ints to floats and lists to tuples), so a hand-edited ``config.yaml``
    (``epochs: .inf``, ``model_kwargs: 5``) or a wrong Python value fails with the key and
    the expected type, for every field, including fields added later.

    Raises:
        ValueError: naming the key, the expected type and the value found.
    """
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        ok, converted = _coerce(hints[f.name], value)
        if not ok:
            raise ValueError(f"key {f.name!r} must be {_kind(hints[f.name])}, got "
                             f"{value!r} ({type(value).__name__})")
        setattr(config, f.name, converted)


def check_choices(config: Any) -> None:
    """Check every field that has :attr:`Option.choices` (None stays allowed).

    Raises:
        ValueError: naming the key, the choices and the value found.
    """
    for f in dataclasses.fields(config):
        choices, value = field_option(f).choices, getattr(config, f.name)
        if choices is not None and value is not None and value not in choices:
            raise ValueError(f"{f.name} must be one of {', '.join(map(str, choices))}, "
                             f"got {value!r}")
