"""`cnnkit train` and `cnnkit bench` are generated from their config dataclasses (issue 13,
point 7: one definition per option). The generated parsers keep every option of the
hand-written ones (``parser_reference.json``, recorded from the parser before the rewrite);
a field added to a config appears on the command line with its help, default and type and
no other edit; parsed options come back as the dataclass; a type the command line cannot
take is refused loudly."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Literal

import pytest

import cnnkit.cli.main as main_module
from cnnkit.cli.generate import add_options, config_from_args, option_flag
from cnnkit.cli.main import build_parser
from cnnkit.run.config import RESUME_OPTIONS, TrainConfig
from cnnkit.run.fields import option
from cnnkit.workflows.bench import BenchConfig

REFERENCE = json.loads((Path(__file__).with_name("parser_reference.json")).read_text())
COMPARED = ("option_strings", "dest", "action", "nargs", "const", "default", "type", "choices",
            "required", "metavar")

# The deliberate differences from the hand-written parsers, each with its reason; any other
# difference fails the test.
CHANGES = {
    # `compile: bool | None` has three states, so --compile gains --no-compile (e.g.
    # `--fast --no-compile`: the fast paths without compilation, not expressible before).
    ("train", "--compile"): {"action", "option_strings", "const"},
    # A tuple field: the comma list is parsed into the tuple by the CLI, not by BenchConfig,
    # and is repeatable (`--models a,b --models c`), as every list option is.
    ("bench", "--models"): {"type", "action"},
    # An option not given is None everywhere, and the dataclass's own default applies (the
    # hand-written bench parser repeated those defaults: "auto", False, False).
    ("bench", "--device"): {"default"},
    ("bench", "--quick"): {"default"},
    ("bench", "--no-memory"): {"default"},
}


def _jsonable(value):
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return "==SUPPRESS==" if value is argparse.SUPPRESS else value


def _describe(action: argparse.Action) -> dict:
    """An action as ``parser_reference.json`` records it."""
    return {"option_strings": list(action.option_strings), "dest": action.dest,
            "action": type(action).__name__, "nargs": action.nargs,
            "const": _jsonable(action.const), "default": _jsonable(action.default),
            "type": getattr(action.type, "__name__", None) if action.type else None,
            "choices": _jsonable(list(action.choices)) if action.choices is not None else None,
            "required": action.required, "metavar": action.metavar, "help": action.help}


def _parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {"cnnkit": parser, **sub.choices}


def _actions(parser: argparse.ArgumentParser) -> dict[str, dict]:
    return {(a.option_strings or [a.dest])[0]: _describe(a) for a in parser._actions
            if not isinstance(a, argparse._SubParsersAction)}


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


# -- the generated parsers keep every option ---------------------------------------------------

@pytest.mark.parametrize("command", list(REFERENCE))
def test_the_parser_keeps_every_recorded_option(command):
    new = _actions(_parsers(build_parser())[command])
    old = {(a["option_strings"] or [a["dest"]])[0]: a for a in REFERENCE[command]}
    assert set(old) <= set(new), f"options lost: {sorted(set(old) - set(new))}"
    for key, recorded in old.items():
        changed = CHANGES.get((command, key), set())
        for attribute in COMPARED:
            if attribute not in changed:
                assert new[key][attribute] == recorded[attribute], (command, key, attribute)
        if recorded["help"]:
            assert new[key]["help"], (command, key)


def test_every_change_from_the_recording_is_still_needed():
    """No entry of CHANGES is stale: each names an attribute that does differ."""
    parsers = _parsers(build_parser())
    for (command, key), attributes in CHANGES.items():
        new = _actions(parsers[command])[key]
        old = next(a for a in REFERENCE[command] if a["option_strings"][0] == key)
        assert {a for a in attributes if new[a] != old[a]} == attributes, (command, key)


def test_compile_gains_its_negation_and_the_bench_defaults_are_the_dataclass():
    assert _args("train", "--fast", "--no-compile").compile is False
    assert _args("train", "--compile").compile is True and _args("train").compile is None
    assert config_from_args(BenchConfig, _args("bench")) == BenchConfig()
    assert config_from_args(BenchConfig, _args("bench", "--no-memory")).memory is False


@pytest.mark.parametrize("command", ["train", "bench"])
def test_every_generated_option_has_help(command):
    for key, action in _actions(_parsers(build_parser())[command]).items():
        assert action["help"], (command, key)


def test_train_help_groups_the_run_options_after_the_command_options(cli):
    code, out, _ = cli(["train", "--help"])
    assert code == 0
    head, _, run_options = out.partition("training options")
    for flag in ("--resume RUN", "--nproc N", "--no-progress", "--json"):
        assert flag in head and flag not in run_options
    for flag in ("--epochs EPOCHS", "--model-opt KEY=VALUE", "--channels {1,3}",
                 "--early-stopping PATIENCE", "--compile, --no-compile", "--scale SCALE"):
        assert flag in run_options, flag
    assert "upscaling factor (default 3)" in " ".join(run_options.split())


def test_the_resume_help_and_error_name_the_resume_options_from_the_config():
    """RESUME_OPTIONS is the one list: the --resume help is written from it, word for word
    the hand-written text it replaces."""
    resume = _actions(_parsers(build_parser())["train"])["--resume"]
    old = next(a for a in REFERENCE["train"] if a["option_strings"] == ["--resume"])
    assert resume["help"] == old["help"]
    assert [option_flag(TrainConfig, k) for k in RESUME_OPTIONS][:3] == [
        "--epochs", "--lr", "--grad-clip"]


# -- parsed options come back as the dataclass -------------------------------------------------

def test_train_options_become_the_train_config():
    args = _args("train", "--task", "classify", "--model", "lenet5", "--data", "digits",
                 "--epochs", "2", "--batch-size", "16", "--lr", "0.05", "--optimizer", "adamw",
                 "--schedule", "cosine", "--weight-decay", "0", "--label-smoothing", "0",
                 "--grad-clip", "1.5", "--image-size", "28", "--channels", "1",
                 "--augment", "none", "--amp", "off", "--channels-last", "--compile",
                 "--sync-bn", "--ema", "--early-stopping", "3", "--device", "cpu", "--strict",
                 "--model-opt", "width=8", "--model-opt", "attn=eca", "--data-opt", "n=50",
                 "--name", "r", "--runs-dir", "out", "--seed", "7", "--scale", "2",
                 "--loss", "auto", "--no-progress")
    assert config_from_args(TrainConfig, args) == TrainConfig(
        task="classify", model="lenet5", data="digits", epochs=2, batch_size=16, lr=0.05,
        optimizer="adamw", schedule="cosine", weight_decay=0.0, label_smoothing=0.0,
        grad_clip=1.5, image_size=28, channels=1, augment="none", amp="off",
        channels_last=True, compile=True, sync_bn=True, ema=True, early_stopping=3,
        device="cpu", strict=True, model_kwargs={"width": 8, "attn": "eca"},
        data_options={"n": 50}, name="r", runs_dir="out", seed=7, scale=2)
    assert config_from_args(TrainConfig, _args("train")) == TrainConfig()


def test_bench_options_become_the_bench_config():
    args = _args("bench", "--models", "tinyvgg, lenet5", "--quick", "--steps", "2",
                 "--rounds", "3", "--batch-size", "4", "--device", "cpu", "--threads", "1",
                 "--no-compile", "--no-memory", "--json")
    assert config_from_args(BenchConfig, args) == BenchConfig(
        models=("tinyvgg", "lenet5"), quick=True, steps=2, rounds=3, batch_size=4,
        device="cpu", threads=1, compile=False, memory=False)


# -- a new field appears with no other edit ----------------------------------------------------

@dataclasses.dataclass
class VolumeConfig(TrainConfig):
    """A training config grown by a few fields, as a contributor would add them.

    Attributes:
        slab: slices per training sample, from this docstring (the field has no metadata).
    """

    depth: int | None = option(None, "slices per volume (default: all)", bounds="positive",
                               metavar="D")
    spacing: tuple[float, ...] = option((1.0, 1.0, 2.5), "voxel spacing in mm")
    resample: str = option("nearest", "how volumes are resampled",
                           choices=("nearest", "linear"))
    mirror: bool = option(True, "do not mirror volumes in augmentation")
    hidden: float = option(0.5, "not on the command line", cli=False)
    slab: int = 4


@pytest.fixture
def volume_cli(monkeypatch):
    monkeypatch.setattr(main_module, "TrainConfig", VolumeConfig)


def test_a_new_field_appears_in_train_help(cli, volume_cli):
    code, out, _ = cli(["train", "--help"])
    text = " ".join(out.split())
    assert code == 0
    for needle in ("--depth D slices per volume (default: all)",
                   "--spacing SPACING voxel spacing in mm (default 1.0,1.0,2.5)",
                   "--resample {nearest,linear} how volumes are resampled (default nearest)",
                   "--no-mirror do not mirror volumes in augmentation",
                   "--slab SLAB slices per training sample, from this docstring (the field "
                   "has no metadata) (default 4)"):
        assert needle in text, needle
    assert "--hidden" not in text and "--epochs EPOCHS" in text


def test_a_new_field_is_parsed_into_the_config(volume_cli):
    args = _args("train", "--depth", "3", "--spacing", "0.5,0.5,2", "--resample", "linear",
                 "--no-mirror", "--slab", "2", "--epochs", "1")
    assert args.config_class is VolumeConfig
    config = config_from_args(VolumeConfig, args)
    assert isinstance(config, VolumeConfig)
    assert (config.depth, config.spacing, config.resample, config.mirror, config.slab,
            config.hidden, config.epochs) == (3, (0.5, 0.5, 2.0), "linear", False, 2, 0.5, 1)
    assert config_from_args(VolumeConfig, _args("train")) == VolumeConfig()


@pytest.mark.parametrize("argv, needles", [
    (["--depth", "0"], ["--depth", "at least 1"]),
    (["--spacing", "1,x"], ["--spacing", "'1,x'"]),
    (["--resample", "cubic"], ["--resample", "invalid choice", "linear"]),
    (["--slab", "two"], ["--slab", "'two'"]),
])
def test_a_new_field_has_one_line_usage_errors(cli, one_line_error, volume_cli, argv, needles):
    line = one_line_error(*cli(["train", *argv])[::2])
    for needle in needles:
        assert needle in line


def test_a_new_field_cannot_change_on_resume(cli, one_line_error, volume_cli, tmp_path):
    line = one_line_error(*cli(["train", "--resume", str(tmp_path / "r"), "--depth", "3",
                                "--lr", "0.1"])[::2])
    assert "so --depth cannot be given" in line and "--lr, --grad-clip" in line


def test_a_field_the_command_line_cannot_take_is_refused_with_the_fix():
    @dataclasses.dataclass
    class Odd:
        tags: set[str] = dataclasses.field(default_factory=set)

    with pytest.raises(TypeError, match=r"Odd\.tags.*cli=False"):
        add_options(argparse.ArgumentParser(), Odd)


def test_every_kind_of_field_the_table_names_parses_and_checks():
    @dataclasses.dataclass
    class Kinds:
        mode: Literal["fast", "exact"] = "exact"
        sizes: list[int] = option(help="sizes", default_factory=list)
        pair: tuple[int, int] | None = None
        skip: int = option(0, "items to skip", bounds="non-negative")

    parser = argparse.ArgumentParser()
    add_options(parser, Kinds)
    args = parser.parse_args(["--mode", "fast", "--sizes", "1,2,3", "--pair", "4,5",
                              "--skip", "0"])
    assert config_from_args(Kinds, args) == Kinds("fast", [1, 2, 3], (4, 5), 0)
    assert config_from_args(Kinds, parser.parse_args([])) == Kinds()
    for argv in (["--mode", "slow"], ["--pair", "1,2,3"], ["--skip", "-1"], ["--sizes", "a"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)


def test_bounds_that_do_not_fit_the_type_are_refused_with_the_valid_ones():
    @dataclasses.dataclass
    class Config:
        name: str = option("x", "a name", bounds="positive")

    with pytest.raises(ValueError, match="bounds 'positive' do not apply to str; use one of"):
        add_options(argparse.ArgumentParser(), Config)


def test_list_options_are_repeatable_and_comma_lists():
    args = _args("train", "--logger", "csv", "--logger", "tensorboard,mlflow")
    assert config_from_args(TrainConfig, args).loggers == ("csv", "tensorboard", "mlflow")
    assert config_from_args(TrainConfig, _args("train")).loggers == ()
    args = _args("bench", "--models", "tinyvgg,lenet5", "--models", "resnet18")
    assert config_from_args(BenchConfig, args).models == ("tinyvgg", "lenet5", "resnet18")
