"""Users' conventions (issue 14, point 6): `cnnkit train --config FILE` and `--print-config`
(a round trip, flags over the file, a run's config.yaml as a config), and plugins:
`--plugin MODULE`, CNNKIT_PLUGINS and the `cnnkit.plugins` entry points, recorded by a run
and imported again by the commands that read it."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap

import pytest
import yaml

import cnnkit.plugins as plugins_module
from cnnkit.plugins import entry_point_plugins, load_plugins
from cnnkit.run.config import TrainConfig


def test_print_config_round_trips_and_trains_nothing(cli, tmp_path):
    argv = ["train", "--epochs", "3", "--logger", "csv", "--logger", "tensorboard,mlflow",
            "--model-opt", "width=8", "--runs-dir", str(tmp_path / "runs"), "--print-config"]
    code, first, err = cli(argv)
    assert code == 0, err
    saved = yaml.safe_load(first)
    assert saved["epochs"] == 3 and saved["model_kwargs"] == {"width": 8}
    assert saved["loggers"] == ["csv", "tensorboard", "mlflow"]
    assert set(saved) == {f for f in TrainConfig.__dataclass_fields__}
    assert not (tmp_path / "runs").exists()  # nothing trained, no folder claimed
    (tmp_path / "a.yaml").write_text(first)
    code, second, err = cli(["train", "--config", str(tmp_path / "a.yaml"), "--print-config"])
    assert code == 0, err
    assert second == first


def test_options_given_win_over_the_file(cli, tmp_path):
    (tmp_path / "run.yaml").write_text("epochs: 5\nlr: 0.01\nmodel: lenet5\n")
    code, out, err = cli(["train", "--config", str(tmp_path / "run.yaml"), "--epochs", "2",
                          "--print-config"])
    assert code == 0, err
    saved = yaml.safe_load(out)
    assert (saved["epochs"], saved["lr"], saved["model"]) == (2, 0.01, "lenet5")


def test_an_empty_file_is_the_defaults(cli, tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    code, out, err = cli(["train", "--config", str(tmp_path / "empty.yaml"), "--print-config"])
    assert code == 0, err
    assert TrainConfig.from_dict(yaml.safe_load(out)) == TrainConfig()


def test_config_cannot_go_with_resume(cli, one_line_error, tmp_path):
    (tmp_path / "run.yaml").write_text("epochs: 5\n")
    line = one_line_error(*cli(["train", "--resume", str(tmp_path), "--config",
                                str(tmp_path / "run.yaml")])[::2])
    assert "--resume" in line and "--config" in line


# -- plugins -------------------------------------------------------------------------------------

PLUGIN = '''
"""A user's plugin: one model, registered on import."""
from cnnkit.models import create_model, register_model


@register_model
def plugnet(**kwargs):
    """A plugin's model: tinyvgg under another name."""
    return create_model("tinyvgg", **kwargs)
'''


def _cnnkit(*argv: str, pythonpath: str | None, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CNNKIT_PLUGINS")}
    environ.update(OMP_NUM_THREADS="1", **env)
    if pythonpath:
        environ["PYTHONPATH"] = pythonpath
    return subprocess.run([sys.executable, "-m", "cnnkit", *argv], capture_output=True,
                          text=True, timeout=300, env=environ)


@pytest.fixture(scope="module")
def plugin_run(tmp_path_factory):
    """A plugin module on PYTHONPATH, and a run of its model trained with --plugin (in a
    subprocess: the registration must not leak into this test process)."""
    root = tmp_path_factory.mktemp("plugin")
    (root / "myplug.py").write_text(textwrap.dedent(PLUGIN))
    res = _cnnkit("--plugin", "myplug", "train", "--model", "plugnet", "--data", "digits",
                  "--epochs", "1", "--batch-size", "64", "--runs-dir", str(root / "runs"),
                  "--name", "p", "--no-progress", pythonpath=str(root))
    assert res.returncode == 0, res.stderr
    return root


def test_a_plugin_run_records_its_plugin_and_eval_imports_it(plugin_run):
    run = plugin_run / "runs" / "p"
    assert yaml.safe_load((run / "config.yaml").read_text())["plugins"] == ["myplug"]
    res = _cnnkit("eval", str(run), "--json", pythonpath=str(plugin_run))  # no --plugin
    assert res.returncode == 0, res.stderr
    assert 0 <= yaml.safe_load(res.stdout)["test_accuracy"] <= 1


def test_a_missing_plugin_is_one_line_naming_it(plugin_run, one_line_error):
    res = _cnnkit("eval", str(plugin_run / "runs" / "p"), pythonpath=None)
    line = one_line_error(res.returncode, res.stderr)
    assert "myplug" in line and "PYTHONPATH" in line and "config.yaml" in line


def test_a_run_config_yaml_is_a_config_file(plugin_run):
    config = plugin_run / "runs" / "p" / "config.yaml"
    res = _cnnkit("train", "--config", str(config), "--print-config", pythonpath=str(plugin_run))
    assert res.returncode == 0, res.stderr
    assert res.stdout == config.read_text()


def test_plugins_from_the_environment_and_after_the_command(plugin_run):
    res = _cnnkit("models", "plug*", pythonpath=str(plugin_run), CNNKIT_PLUGINS="json,myplug")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("plugnet")
    res = _cnnkit("train", "--plugin", "myplug", "--model", "plugnet", "--print-config",
                  pythonpath=str(plugin_run))
    assert res.returncode == 0, res.stderr
    assert yaml.safe_load(res.stdout)["plugins"] == ["myplug"]


def test_an_unknown_plugin_is_one_line(cli, one_line_error):
    line = one_line_error(*cli(["--plugin", "no_such_plugin_mod", "models"])[::2])
    assert "no_such_plugin_mod" in line and "--plugin" in line and "PYTHONPATH" in line
    line = one_line_error(*cli(["--plugin", "not a module", "models"])[::2])
    assert "not a module name" in line


def test_load_plugins_imports_and_splits_comma_lists():
    assert load_plugins(["json,os.path", "json", " "]) == ("json", "os.path")


def test_entry_point_plugins_are_imported(monkeypatch):
    ep = importlib.metadata.EntryPoint(name="mine", value="colorsys", group="cnnkit.plugins")
    monkeypatch.delitem(sys.modules, "colorsys", raising=False)
    monkeypatch.setattr(plugins_module.importlib.metadata, "entry_points",
                        lambda group: [ep] if group == "cnnkit.plugins" else [])
    assert entry_point_plugins() == ("colorsys",)
    assert "colorsys" in sys.modules
