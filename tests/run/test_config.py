"""TrainConfig, the source of truth of `cnnkit train`: its fields' command-line metadata
(:class:`Option`), the choices it checks from that metadata, variadic tuple fields, and an
import without PyTorch (the CLI builds ``cnnkit train --help`` from it)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from cnnkit.run.config import TrainConfig
from cnnkit.run.fields import Option, option


def test_the_configs_import_without_torch():
    code = ("import sys, cnnkit.run.config, cnnkit.workflows.bench.config\n"
            "print('torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


def test_every_field_is_documented_and_every_option_has_help():
    doc = TrainConfig.__doc__
    for f in dataclasses.fields(TrainConfig):
        assert f"        {f.name}: " in doc, f.name
        meta = f.metadata["option"]
        assert isinstance(meta, Option)
        assert (meta.help is not None) == meta.cli, f.name


@pytest.mark.parametrize("options, needle", [
    ({"optimizer": "adam"}, "optimizer must be one of sgd, adamw, got 'adam'"),
    ({"schedule": "step"}, "schedule must be one of cosine, onecycle, constant"),
    ({"amp": "fp64"}, "amp must be one of auto, off, bf16, fp16"),
    ({"channels": 2}, "channels must be one of 1, 3, got 2"),
    ({"task": "detect"}, "task must be one of classify"),
])
def test_the_choices_of_the_options_are_checked_by_the_config(options, needle):
    with pytest.raises(ValueError, match=needle):
        TrainConfig(**options)
    assert TrainConfig(channels=None).channels is None and TrainConfig(channels=3).channels == 3


@dataclasses.dataclass
class _Grown(TrainConfig):
    spacing: tuple[float, ...] = option((1.0, 2.5), "voxel spacing")


def test_a_variadic_tuple_field_is_type_checked_and_saved_as_a_list():
    config = _Grown(spacing=[1, 2, 3])
    assert config.spacing == (1.0, 2.0, 3.0)
    assert config.to_dict()["spacing"] == [1.0, 2.0, 3.0] and config.to_dict()["split"] == [
        0.8, 0.1, 0.1]
    assert _Grown.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="key 'spacing' must be a list of finite numbers"):
        _Grown(spacing=(1.0, "a"))


def test_option_keeps_its_metadata_and_default_factory():
    @dataclasses.dataclass
    class Config:
        tags: dict = option(help="tags", default_factory=dict, flags=("--tag",))

    f = dataclasses.fields(Config)[0]
    assert f.metadata["option"] == Option("tags", flags=("--tag",))
    assert Config().tags == {} and Config().tags is not Config().tags


def test_a_data_sets_recipe_fills_what_the_user_left_open():
    from cnnkit.data import dataset_recipe

    recipe = dataset_recipe("shapes3d", "segment")
    cfg = TrainConfig(task="segment", data="shapes3d", model="unet3d")
    assert (cfg.epochs, cfg.optimizer, cfg.lr) == (recipe["epochs"], "adamw", recipe["lr"])
    assert cfg.batch_size == 16  # not in the recipe: the task's default
    given = TrainConfig(task="segment", data="shapes3d", model="unet3d", epochs=3, lr=0.01)
    assert (given.epochs, given.lr, given.optimizer) == (3, 0.01, "adamw")
    # another optimizer: the recipe's rate does not go with it
    sgd = TrainConfig(task="segment", data="shapes3d", model="unet3d", optimizer="sgd")
    assert sgd.lr is None and sgd.resolved_lr == 0.05
    plain = TrainConfig(task="segment", data="shapes")  # no recipe: the task's defaults
    assert (plain.epochs, plain.optimizer, plain.lr) == (10, "sgd", None)


def test_a_recipe_with_unknown_settings_is_refused():
    from cnnkit.data import register_dataset

    with pytest.raises(ValueError, match="unknown recipe settings momentumm"):
        register_dataset(lambda **kw: None, recipes={"classify": {"momentumm": 0.9}})
