"""Atomic writes and pickle-free checkpoints."""

import os
import pickle

import pytest
import torch
from torch import nn

from cnnkit.run.checkpoint import atomic_write, load_state, load_weights, save_state, save_weights


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "f.txt"
    atomic_write(p, "one")
    atomic_write(p, "two")
    assert p.read_text() == "two"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_atomic_write_crash_keeps_old_file(tmp_path, monkeypatch):
    p = tmp_path / "f.txt"
    atomic_write(p, "old")

    def boom(*a, **k):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk gone"):
        atomic_write(p, "new")
    assert p.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_weights_round_trip_with_metadata(tmp_path):
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    meta = {"model": "x", "classes": ["a", "b"], "input_size": [3, 8, 8]}
    save_weights(tmp_path / "w.safetensors", m.state_dict(), meta)
    state, meta2 = load_weights(tmp_path / "w.safetensors")
    assert meta2 == meta
    assert state.keys() == m.state_dict().keys()
    for k, v in m.state_dict().items():
        assert torch.equal(state[k], v)


def test_state_round_trip_keeps_types_and_int_keys(tmp_path):
    state = {"epoch": 3, "lr": 0.1, "name": "x", "flag": True, "none": None,
             "nested": {0: torch.arange(3), 5: [torch.ones(2), 1.5]},
             "history": [{"a": 1.0}, {"a": 2.0}]}
    save_state(tmp_path / "s.safetensors", state)
    back = load_state(tmp_path / "s.safetensors")
    assert back["epoch"] == 3 and back["lr"] == 0.1 and back["flag"] is True
    assert back["none"] is None and back["history"] == state["history"]
    assert set(back["nested"]) == {0, 5}
    assert torch.equal(back["nested"][0], torch.arange(3))
    assert torch.equal(back["nested"][5][0], torch.ones(2)) and back["nested"][5][1] == 1.5


def test_optimizer_state_round_trip_gives_identical_next_step(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    x = torch.randn(8, 5)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    save_state(tmp_path / "s.safetensors", {"m": model.state_dict(), "o": opt.state_dict()})
    twin = nn.Linear(5, 3)
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=0.1)
    back = load_state(tmp_path / "s.safetensors")
    twin.load_state_dict(back["m"])
    twin_opt.load_state_dict(back["o"])
    for mdl, o in ((model, opt), (twin, twin_opt)):
        o.zero_grad()
        mdl(x).square().sum().backward()
        o.step()
    assert torch.equal(model.weight, twin.weight) and torch.equal(model.bias, twin.bias)


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    p = tmp_path / "w.safetensors"
    save_weights(p, {"w": torch.ones(100)}, {})
    p.write_bytes(p.read_bytes()[:50])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_weights(p)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_weights(tmp_path / "missing.safetensors")


def test_loading_never_unpickles(tmp_path, monkeypatch):
    save_state(tmp_path / "s.safetensors", {"t": torch.ones(2), "k": {1: 2}})

    def forbidden(*a, **k):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    assert load_state(tmp_path / "s.safetensors")["k"] == {1: 2}
