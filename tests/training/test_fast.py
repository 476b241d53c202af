"""Fast paths: torch.compile and its fallback, fused optimisers, channels_last, bf16 autocast.

CUDA variants run where a GPU is present and are skipped otherwise.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cnnkit.data import TensorLoader
from cnnkit.models import create_model
from cnnkit.run.checkpoint import load_weights
from cnnkit.training import TrainConfig, Trainer
from cnnkit.training.device import _cpu_has_bf16, autocast, resolve_amp
from cnnkit.training.optim import build_optimizer, fused_supported

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
# WRN-10-1 with dropout: BatchNorm buffers and RNG draws, both of which a failed first
# compiled step must give back.
BN_DROPOUT = dict(model="wide_resnet", model_kwargs={"depth": 10, "widen_factor": 1,
                                                     "dropout": 0.3},
                  data="digits", epochs=1, batch_size=128, amp="off")


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return load_weights(trainer.paths.last)[0]


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def eager_run(tmp_path_factory):
    trainer = Trainer(TrainConfig(**BN_DROPOUT, runs_dir=str(tmp_path_factory.mktemp("eager"))),
                      progress=False)
    trainer.fit()
    return _weights(trainer)


def test_fast_preset_turns_on_the_fast_paths_and_round_trips():
    cfg = TrainConfig(fast=True)
    assert cfg.channels_last and cfg.compile == torch.cuda.is_available() and cfg.amp == "auto"
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert not TrainConfig().compile and not TrainConfig().channels_last


def test_compile_off_never_calls_torch_compile(tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("torch.compile called with compile=False")

    monkeypatch.setattr(torch, "compile", forbidden)
    trainer = Trainer(TrainConfig(model="lenet5", epochs=1, batch_size=256, amp="off",
                                  runs_dir=str(tmp_path)), progress=False)
    trainer.fit()
    assert trainer.train_model is trainer.model


def test_compile_refused_trains_eagerly_after_one_warning(tmp_path, monkeypatch, eager_run):
    def refuse(*args, **kwargs):
        raise RuntimeError("Python 3.99 is not supported")

    monkeypatch.setattr(torch, "compile", refuse)
    with pytest.warns(RuntimeWarning, match="torch.compile is not available") as caught:
        trainer = Trainer(TrainConfig(**BN_DROPOUT, compile=True, runs_dir=str(tmp_path)),
                          progress=False)
        trainer.fit()
    assert len([w for w in caught if "torch.compile" in str(w.message)]) == 1
    assert trainer.train_model is trainer.model
    _assert_same_weights(_weights(trainer), eager_run)


def test_compile_failing_at_the_first_step_falls_back_to_the_eager_result(
        tmp_path, monkeypatch, eager_run):
    calls = []

    def lazily_failing(module, **kwargs):
        def compiled(x):  # runs the model (BN statistics move, dropout draws) then fails,
            calls.append(len(x))  # as a backend that fails after tracing would
            module(x)
            raise RuntimeError("BackendCompilerFailed: inductor could not find a C++ compiler")
        return compiled

    monkeypatch.setattr(torch, "compile", lazily_failing)
    with pytest.warns(RuntimeWarning, match="failed at the first step .*C\\+\\+ compiler"):
        trainer = Trainer(TrainConfig(**BN_DROPOUT, compile=True, runs_dir=str(tmp_path)),
                          progress=False)
        trainer.fit()
    assert calls == [128]  # tried once, then eager for good
    # restored buffers and RNG: bit for bit the eager run
    _assert_same_weights(_weights(trainer), eager_run)


def test_a_real_error_is_not_hidden_by_the_fallback(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda module, **kw: module)
    trainer = Trainer(TrainConfig(model="lenet5", epochs=1, compile=True,
                                  runs_dir=str(tmp_path)), progress=False)
    trainer.criterion = lambda out, y: out.sum() + y.float().view(3, -1).sum()  # a bad shape
    with pytest.warns(RuntimeWarning, match="first step"), pytest.raises(RuntimeError,
                                                                           match="shape"):
        trainer.fit()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_fused_step_equals_foreach(optimizer, device):
    cfg = TrainConfig(optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 1e-2)
    torch.manual_seed(0)
    a = create_model("tinyvgg", num_classes=10, in_chans=1, img_size=8).to(device)
    b = copy.deepcopy(a)
    opt_a, opt_b = build_optimizer(a, cfg, fused=False), build_optimizer(b, cfg)
    if not fused_supported(type(opt_a), list(a.parameters())):
        pytest.skip(f"this PyTorch has no fused {optimizer} on {device}")
    assert opt_b.defaults["fused"] and not opt_a.defaults.get("fused")
    for _ in range(5):
        x = torch.randn(16, 1, 8, 8, device=device)
        y = torch.randint(0, 10, (16,), device=device)
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["tinyvgg", "resnet18", "mobilenet_v2"])
def test_channels_last_gives_the_contiguous_outputs(name, device):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_chans=3, img_size=32).to(device).eval()
    x = torch.randn(4, 3, 32, 32, device=device)
    with torch.no_grad():
        ref = model(x)
        nhwc = copy.deepcopy(model).to(memory_format=torch.channels_last)
        out = nhwc(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_trainer_puts_model_and_batches_in_channels_last(tmp_path):
    runs = {}
    for cl in (False, True):
        trainer = Trainer(TrainConfig(model="tinyvgg", epochs=1, batch_size=128, amp="off",
                                      channels_last=cl, runs_dir=str(tmp_path), name=str(cl)),
                          progress=False)
        runs[cl] = trainer
        weights = [p for p in trainer.model.parameters() if p.ndim == 4]
        fmt = torch.channels_last if cl else torch.contiguous_format
        assert all(p.is_contiguous(memory_format=fmt) for p in weights)
        assert any(not p.is_contiguous() for p in weights) == cl
        assert trainer.train_loader.channels_last == trainer.val_loader.channels_last == cl
        trainer.fit()
    assert runs[True].history[0]["train_loss"] == pytest.approx(
        runs[False].history[0]["train_loss"], rel=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_loader_hands_out_channels_last_batches(device):
    images = torch.randint(0, 255, (6, 3, 5, 5), dtype=torch.uint8)
    x, _ = next(iter(TensorLoader(images, torch.arange(6), 4, mean=[0.5] * 3, std=[0.2] * 3,
                                  channels_last=True, device=device)))
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    ref = (images[:4].float() / 255 - 0.5) / 0.2
    torch.testing.assert_close(x.cpu(), ref)


def test_bf16_detection_matches_the_cpu_flags():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo to compare with")
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("flags")), [])
    assert _cpu_has_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_bf16_autocast_resolution_follows_the_detection(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert resolve_amp("auto", cpu) is None
    with pytest.raises(ValueError, match="no native bf16"):
        resolve_amp("bf16", cpu)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert resolve_amp("auto", cpu) == resolve_amp("bf16", cpu) == torch.bfloat16


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_runs_convolutions_in_bf16(device):
    dev = torch.device(device)
    dtype = resolve_amp("auto", dev)
    if dtype is None:
        pytest.skip(f"no native bf16 on this {device}")
    conv = torch.nn.Conv2d(3, 8, 3).to(dev)
    x = torch.randn(2, 3, 8, 8, device=dev)
    with autocast(dev, dtype):
        y = conv(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), conv(x), rtol=2e-2, atol=2e-2)


@CUDA
def test_loader_copies_the_split_to_the_gpu_once():
    images = torch.randint(0, 255, (10, 1, 4, 4), dtype=torch.uint8)
    loader = TensorLoader(images, torch.arange(10), 4, device="cuda")
    assert loader.images.is_cuda and torch.equal(loader.images.cpu(), images)
    x, y = next(iter(loader))
    assert x.is_cuda and y.is_cuda
    torch.testing.assert_close(x.cpu(), images[:4].float() / 255)


@CUDA
def test_fast_training_on_cuda(tmp_path):
    trainer = Trainer(TrainConfig(model="tinyvgg", epochs=2, batch_size=128, lr=0.2, fast=True,
                                  device="cuda", runs_dir=str(tmp_path)), progress=False)
    assert trainer.amp == torch.bfloat16 or not torch.cuda.is_bf16_supported()
    summary = trainer.fit()
    assert summary["device"].startswith("cuda") and summary["test_accuracy"] > 0.3


def test_fast_preset_compiles_on_cuda_only_unless_asked():
    # Measured by `cnnkit bench` on the CPU: compile bought nothing for resnet18 and
    # mobilenet_v2 and cost tinyvgg a third; --fast leaves it to CUDA, --compile forces it.
    cpu = TrainConfig(fast=True, device="cpu")
    assert cpu.channels_last and cpu.compile is False
    assert TrainConfig(fast=True, device="cpu", compile=True).compile is True
    assert TrainConfig(fast=True, device="cuda:0").compile is True
    assert TrainConfig(fast=True, device="cuda:0", compile=False).compile is False
    assert TrainConfig().compile is False
