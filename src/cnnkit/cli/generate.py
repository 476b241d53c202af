"""Command-line options generated from a config dataclass, and parsed options back into it.

Each field is an option, defined once in the dataclass: its name gives the flag
(``batch_size`` -> ``--batch-size``), its annotation the type, its default the default
shown in the help, and its :class:`~cnnkit.run.fields.Option` metadata the help (else its
``Attributes:`` docstring entry), other flags, choices, metavar and bounds, or
``cli=False``. The annotation decides the kind of option:

===========================  ==============================================================
``int``, ``float``, ``str``  one value (bounds: :mod:`.options`' checks, one-line errors)
``bool`` (default False)     ``--x``; default True: ``--no-x``; ``bool | None``: both
``tuple[T, ...]``, ``list``  a comma list, ``1,2,3``, repeatable (``--x 1,2 --x 3``);
                             ``tuple[T, T]``: exactly that many, once
``dict[str, T]``             ``--x KEY=VALUE``, repeatable (values read as YAML)
``Literal[...]``             its values are the choices
===========================  ==============================================================

``X | None`` takes X. An option not given is None in the parsed arguments, so the
dataclass's own default applies and ``--resume`` can tell what was given. A type outside
this table is refused when the parser is built, naming the field and the fix.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import re
import types
import typing
from collections.abc import Callable
from typing import Any

from cnnkit.run.fields import Option, field_option

from .options import fraction, kv, nonnegative_float, number, positive_float, positive_int

__all__ = ["add_options", "given_options", "config_from_args", "option_flag"]

_BOUNDS: dict[tuple[str, type], Callable[[str], Any]] = {
    ("positive", int): positive_int, ("positive", float): positive_float,
    ("non-negative", int): lambda t: number(t, int, 0, True),
    ("non-negative", float): nonnegative_float, ("fraction", float): fraction}


@dataclasses.dataclass(frozen=True)
class _Spec:
    """One field as an option: ``parser.add_argument(*flags, **kwargs)``, then ``convert``
    turns the parsed value (never None) into the field's value."""

    name: str
    flags: tuple[str, ...]
    dest: str
    kwargs: dict[str, Any]
    convert: Callable[[Any], Any]


def add_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type) -> None:
    """Add an option for every command-line field of the dataclass ``cls``.

    Raises:
        TypeError: a field whose type the command line cannot take (the message names the
            field and the fix).

    Example:
        >>> import argparse
        >>> import dataclasses
        >>> from cnnkit.cli.generate import add_options, config_from_args
        >>> from cnnkit.run.config import option
        >>> @dataclasses.dataclass
        ... class Config:
        ...     depth: int = option(4, "slices per volume", bounds="positive")
        >>> p = argparse.ArgumentParser()
        >>> add_options(p, Config)
        >>> config_from_args(Config, p.parse_args(["--depth", "8"]))
        Config(depth=8)
    """
    for spec in _specs(cls):
        parser.add_argument(*spec.flags, dest=spec.dest, **spec.kwargs)


def given_options(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """``{field: value}`` of the options of ``cls`` given on the command line, over those
    of a config file (``args.config_values``, set by ``cnnkit train --config``)."""
    values = ((s, getattr(args, s.dest, None)) for s in _specs(cls))
    given = {s.name: s.convert(v) for s, v in values if v is not None}
    return {**(getattr(args, "config_values", None) or {}), **given}


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """The dataclass ``cls`` from parsed arguments: the given options, else its defaults."""
    return cls(**given_options(cls, args))


def option_flag(cls: type, name: str) -> str:
    """The option string of field ``name`` of ``cls`` (``model_kwargs`` -> ``--model-opt``)."""
    return next(s.flags[0] for s in _specs(cls) if s.name == name)


def _specs(cls: type) -> tuple[_Spec, ...]:
    hints = typing.get_type_hints(cls)
    docs = _docstring_entries(cls)
    return tuple(_spec(cls, f, hints[f.name], docs.get(f.name)) for f in dataclasses.fields(cls)
                 if field_option(f).cli)


def _spec(cls: type, f: dataclasses.Field, hint: Any, doc: str | None) -> _Spec:
    opt: Option = field_option(f)
    kind, optional = _unwrap(hint)
    default = None if f.default is dataclasses.MISSING else f.default
    flags = opt.flags or (f"--{f.name.replace('_', '-')}",)
    kwargs: dict[str, Any] = {"default": None}
    convert: Callable[[Any], Any] = _same
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is bool:
        if optional:  # three states: --x, --no-x, or the default (None)
            kwargs["action"] = argparse.BooleanOptionalAction
        elif default is True:  # only turning it off is news: --no-x
            flags = opt.flags or (f"--no-{f.name.replace('_', '-')}",)
            kwargs["action"], convert = "store_true", _negate
        else:
            kwargs["action"] = "store_true"
    elif origin is dict and args[:1] == (str,):
        kwargs.update(action="append", type=kv, metavar=opt.metavar or "KEY=VALUE")
        convert = dict
    elif origin in (tuple, list) and args:
        item, length = args[0], None if args[-1] is Ellipsis or origin is list else len(args)
        if len(set(a for a in args if a is not Ellipsis)) != 1 or item not in (int, float, str):
            raise _refuse(cls, f.name, hint)
        kwargs["type"] = functools.partial(_comma_list, _value_type(item, opt.bounds), length)
        kwargs["type"].__name__ = "comma_list"  # argparse names the type in its errors
        convert = tuple if origin is tuple else list
        if length is None:  # any length: repeatable too, `--x a,b --x c` is (a, b, c)
            kwargs["action"] = "append"
            convert = functools.partial(_joined, convert)
    elif origin is typing.Literal:
        kwargs.update(type=_value_type(type(args[0]), opt.bounds), choices=args)
    elif kind in (int, float, str):
        kwargs["type"] = _value_type(kind, opt.bounds)
    else:
        raise _refuse(cls, f.name, hint)
    if opt.choices is not None:
        kwargs["choices"] = opt.choices
    if opt.metavar is not None:
        kwargs["metavar"] = opt.metavar
    if kwargs.get("type") is None:
        kwargs.pop("type", None)
    kwargs["help"] = _help(opt.help or doc, default)
    dest = flags[0].lstrip("-").replace("-", "_")
    return _Spec(f.name, flags, dest, kwargs, convert)


def _unwrap(hint: Any) -> tuple[Any, bool]:
    """``(X, optional)`` of ``X`` or ``X | None``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return hint, False


def _value_type(kind: type, bounds: str | None) -> Callable[[str], Any] | None:
    if bounds is not None:
        if (bounds, kind) not in _BOUNDS:
            valid = ", ".join(f"{b} {k.__name__}" for b, k in _BOUNDS)
            raise ValueError(f"bounds {bounds!r} do not apply to {kind.__name__}; use one of "
                             f"{valid}")
        return _BOUNDS[bounds, kind]
    return None if kind is str else kind


def _comma_list(item: Callable[[str], Any] | None, length: int | None, text: str) -> list:
    """``"1, 2,3"`` -> ``[1, 2, 3]`` with each item checked (empty items dropped)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if length is not None and len(parts) != length:
        raise argparse.ArgumentTypeError(f"expected {length} comma-separated values, got "
                                         f"{text!r}")
    try:
        return [item(p) if item else p for p in parts]
    except ValueError:  # int("x"): ArgumentTypeError (a ValueError) keeps its own message
        raise argparse.ArgumentTypeError(f"expected comma-separated {item.__name__} values, "
                                         f"got {text!r}") from None


def _help(text: str | None, default: Any) -> str | None:
    """The help with the default appended (not None, False or True: those say nothing), and
    ``%`` escaped for argparse."""
    if text is None:
        return None
    if default is not None and not isinstance(default, bool) and default != ():
        shown = ",".join(map(str, default)) if isinstance(default, (tuple, list)) else default
        text = f"{text} (default {shown})"
    return text.replace("%", "%%")


def _docstring_entries(cls: type) -> dict[str, str]:
    """``{field: text}`` of the ``Attributes:`` sections of ``cls`` and its bases (a field
    added without help is documented anyway), as one line without reST markup."""
    found: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        doc = inspect.cleandoc(klass.__dict__.get("__doc__") or "")
        section = re.split(r"^Attributes:\n", doc, maxsplit=1, flags=re.M)[1:]
        text = re.split(r"^\S", section[0], maxsplit=1, flags=re.M)[0] if section else ""
        for name, entry in re.findall(r"^    (\w+): (.*(?:\n {5,}.*)*)", text, flags=re.M):
            entry = re.sub(r":\w+:`~?(?:[\w.]+\.)?([\w]+)`", r"\1", entry).replace("``", "")
            found[name] = " ".join(entry.split()).rstrip(".")
    return found


def _refuse(cls: type, name: str, hint: Any) -> TypeError:
    return TypeError(f"{cls.__name__}.{name}: the command line cannot take a {hint}; give the "
                     "field option(cli=False) or a type of int, float, str, bool, Literal, "
                     "tuple[T, ...], list[T] or dict[str, T]")


def _joined(kind: type, lists: list[list]) -> Any:
    """The values of every use of a repeatable list option, in order."""
    return kind(v for values in lists for v in values)


def _same(value: Any) -> Any:
    return value


def _negate(value: bool) -> bool:
    return not value
