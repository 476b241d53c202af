"""The reliability catalogue, tampered and malicious run folders (issue 12, points 3 and 4, and
the malicious checkpoints of point 11): weights of another run or architecture, hand-edited
``config.yaml`` files, pickles and YAML tags posing as cnnkit files, damaged headers. Each
gets one line naming the file and the problem (exit code 2), never runs code, and leaves
the run folder as it was."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct

import pytest
import torch
import yaml
from safetensors.torch import save as st_save

from cnnkit.models import create_model
from cnnkit.run.checkpoint import load_weights, save_weights


@pytest.fixture
def run(tmp_path, shared_run):
    """A copy of the shared tinyvgg run, safe to damage."""
    return shutil.copytree(shared_run.path, tmp_path / "run")


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _fails(cli, one_line_error, argv, *needles):
    line = one_line_error(*cli(argv)[::2])
    for needle in needles:
        assert needle in line, line
    return line


def _lenet_state():
    return create_model("lenet5", num_classes=10, in_chans=1, img_size=(8, 8)).state_dict()


# -- point 3: weights that do not belong to the run -------------------------------------------

def test_weights_of_another_run_are_refused_naming_both(cli, one_line_error, run):
    """Issue 12: a lenet5 file dropped into a tinyvgg run was silently evaluated as the run's."""
    _, meta = load_weights(run / "model.safetensors")
    save_weights(run / "model.safetensors", _lenet_state(), {**meta, "model": "lenet5"})
    before = _snapshot(run)
    _fails(cli, one_line_error, ["eval", str(run)], "model.safetensors holds a classify 'lenet5'",
           "config.yaml describes a classify 'tinyvgg'", "do not belong to this run")
    assert _snapshot(run) == before


def test_weights_of_another_architecture_under_the_runs_name_are_refused(cli, one_line_error,
                                                                         run):
    """Issue 12: a model.safetensors of another architecture gave a 21-line traceback."""
    _, meta = load_weights(run / "model.safetensors")
    save_weights(run / "model.safetensors", _lenet_state(), meta)  # tinyvgg's metadata
    _fails(cli, one_line_error, ["eval", str(run)], "does not hold the weights of the 'tinyvgg'",
           "missing", "unexpected")


def test_last_weights_and_resume_are_checked_too(cli, one_line_error, run):
    _, meta = load_weights(run / "model_last.safetensors")
    save_weights(run / "model_last.safetensors", _lenet_state(), {**meta, "model": "lenet5"})
    _fails(cli, one_line_error, ["eval", str(run), "--weights", "last"], "holds a classify "
           "'lenet5'")
    _fails(cli, one_line_error, ["train", "--resume", str(run), "--epochs", "3",
                                 "--no-progress"], "holds a classify 'lenet5'")


def test_a_training_state_of_another_model_is_refused(cli, one_line_error, run, tmp_path):
    from cnnkit.run.checkpoint import load_state, save_state

    state = load_state(run / "train_state.safetensors")
    state["model"] = _lenet_state()
    save_state(run / "train_state.safetensors", state)
    _fails(cli, one_line_error, ["train", "--resume", str(run), "--epochs", "3",
                                 "--no-progress"], "train_state.safetensors does not fit run",
           "from another run")


@pytest.mark.parametrize("meta_change", [
    {"input_size": [100000, 100000, 100000]},  # would be 10^15 inputs: built on meta only
    {"input_size": "big"}, {"classes": "abc"}, {"mean": [0.5, float("nan")]},
    {"std": [0.0]}, {"model": 5}, {"model_kwargs": [1]}, {"task": "dance"},
], ids=["huge-input", "input-str", "classes-str", "mean-nan", "std-zero", "model-int",
        "kwargs-list", "task"])
def test_metadata_that_does_not_describe_the_run_is_refused(cli, one_line_error, run,
                                                            meta_change, monkeypatch):
    monkeypatch.setenv("CNNKIT_MEMORY_LIMIT", "2GB")  # nothing may even try to allocate
    state, meta = load_weights(run / "model.safetensors")
    save_weights(run / "model.safetensors", state, {**meta, **meta_change})
    line = one_line_error(*cli(["eval", str(run)])[::2])
    assert "model.safetensors" in line


# -- point 4: a tampered or hand-edited config.yaml -------------------------------------------

CONFIG_EDITS = {
    "epochs-inf": ("epochs: .inf", "key 'epochs' must be an integer"),
    "epochs-word": ("epochs: abc", "key 'epochs' must be an integer"),
    "model-kwargs-int": ("model_kwargs: 5", "key 'model_kwargs' must be a mapping"),
    "data-options-list": ("data_options: [1]", "key 'data_options' must be a mapping"),
    "split-two": ("split: [0.5, 0.5]", "key 'split' must be a list of 3"),
    "lr-nan": ("lr: .nan", "key 'lr' must be a finite number"),
    "seed-float": ("seed: 1.5", "key 'seed' must be an integer"),
    "ema-word": ("ema: maybe", "key 'ema' must be true or false"),
    "name-path": ("name: ../../elsewhere", "key 'name' must be a folder name"),
    "unknown-key": ("epochz: 3", "unknown training option(s) epochz"),
    "bad-choice": ("optimizer: adam", "optimizer must be one of sgd, adamw"),
}


@pytest.mark.parametrize("edit, needle", CONFIG_EDITS.values(), ids=CONFIG_EDITS.keys())
@pytest.mark.parametrize("command", ["eval", "resume"])
def test_a_hand_edited_config_names_the_file_and_the_key(cli, one_line_error, run, edit, needle,
                                                        command):
    """Issue 12: `epochs: .inf`, `epochs: abc`, `model_kwargs: 5`, `data_options: [1]` ended in
    tracebacks; every key is checked against its type, so future keys are too."""
    path = run / "config.yaml"
    config = yaml.safe_load(path.read_text())
    config.pop(edit.split(":")[0], None)
    path.write_text(yaml.safe_dump(config) + edit + "\n")
    argv = ["eval", str(run)] if command == "eval" else ["train", "--resume", str(run),
                                                          "--no-progress"]
    _fails(cli, one_line_error, argv, f"{path}: ", needle)


@pytest.mark.parametrize("text, needle", [
    ("- just\n- a list\n", "mapping of options, got list"),
    ("", "mapping of options, got NoneType"),
    ("epochs: [unclosed\n", "is not a valid cnnkit config"),
    ("\xff\xfe binary", "is not a valid cnnkit config"),
], ids=["list", "empty", "not-yaml", "not-text"])
def test_a_config_that_is_not_a_mapping_of_options(cli, one_line_error, run, text, needle):
    (run / "config.yaml").write_bytes(text.encode("latin-1"))
    _fails(cli, one_line_error, ["eval", str(run)], "config.yaml", needle)


# -- malicious files: nothing is ever unpickled or constructed from YAML tags ------------------

class _Payload:
    """Unpickling this creates a marker file: the proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


PICKLE_TARGETS = {"best": ("model.safetensors", ["eval"]),
                  "last": ("model_last.safetensors", ["eval", "--weights", "last"]),
                  "int8": ("model_int8.safetensors", ["eval", "--weights", "int8"]),
                  "state": ("train_state.safetensors", ["train", "--epochs", "3",
                                                        "--no-progress", "--resume"])}


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
@pytest.mark.parametrize("target", PICKLE_TARGETS, ids=PICKLE_TARGETS.keys())
def test_a_pickle_renamed_safetensors_never_runs(cli, one_line_error, run, tmp_path, target, how):
    name, argv = PICKLE_TARGETS[target]
    marker = tmp_path / "code-ran"
    payload = {"weight": _Payload(marker)}
    if how == "pickle":
        (run / name).write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, run / name)
    argv = [*argv, str(run)] if argv[0] == "eval" else [*argv, str(run)]
    line = one_line_error(*cli([argv[0], *argv[1:]])[::2])
    assert name in line and "not a readable safetensors file" in line
    assert not marker.exists()


def test_a_yaml_python_tag_is_never_constructed(cli, one_line_error, run, tmp_path):
    marker = tmp_path / "code-ran"
    (run / "config.yaml").write_text(
        f"!!python/object/apply:os.system [\"touch {marker}\"]\n")
    _fails(cli, one_line_error, ["eval", str(run)], "config.yaml", "not a valid cnnkit config")
    _fails(cli, one_line_error, ["train", "--resume", str(run)], "config.yaml")
    assert not marker.exists()


def test_a_safetensors_header_that_claims_a_terabyte(cli, one_line_error, run):
    (run / "model.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{" + b" " * 100)
    _fails(cli, one_line_error, ["eval", str(run)], "model.safetensors",
           "not a readable safetensors file")


@pytest.mark.parametrize("metadata", ["{not json", "[1, 2]", "[" * 100_000 + "]" * 100_000],
                         ids=["not-json", "not-object", "deeply-nested"])
def test_damaged_cnnkit_metadata(cli, one_line_error, run, metadata):
    state, _ = load_weights(run / "model.safetensors")
    (run / "model.safetensors").write_bytes(st_save(state, metadata={"cnnkit": metadata}))
    _fails(cli, one_line_error, ["eval", str(run)], "model.safetensors",
           "damaged cnnkit metadata")


@pytest.mark.parametrize("skeleton", [
    {"__tensor__": "nowhere"}, {"__dict__": "no pairs"}, {"__list__": 5}, [1, 2],
    {"__weird__": 1}, {"__dict__": [["model", {"__tensor__": "missing.0"}]]}],
    ids=["missing-tensor", "bad-pairs", "bad-list", "bare-array", "unknown-kind",
         "nested-missing"])
def test_a_damaged_training_state(cli, one_line_error, run, skeleton):
    (run / "train_state.safetensors").write_bytes(
        st_save({"x": torch.zeros(1)}, metadata={"state": json.dumps(skeleton)}))
    _fails(cli, one_line_error, ["train", "--resume", str(run), "--epochs", "3",
                                 "--no-progress"], "train_state.safetensors", "damaged")


def test_a_damaged_summary(cli, one_line_error, run):
    (run / "summary.json").write_text("{truncated")
    _fails(cli, one_line_error, ["eval", str(run)], "summary.json is damaged", "--resume")


def test_the_checks_cost_nothing_for_the_runs_own_files(cli, run):
    """The run itself still loads and evaluates exactly as before."""
    code, out, err = cli(["eval", str(run), "--json"])
    assert code == 0, err
    shared = json.loads((run / "summary.json").read_text())
    assert json.loads(out)["test_accuracy"] == pytest.approx(shared["test_accuracy"])
    assert yaml.safe_load((run / "config.yaml").read_text())["model"] == "tinyvgg"
