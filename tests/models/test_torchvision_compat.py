"""cnnkit's torchvision-named architectures are torchvision's: keys, shapes, counts, outputs.

The reference, ``torchvision_ref/reference.json``, was recorded from torchvision 0.29.1
by ``torchvision_ref/make_reference.py`` (torchvision is no dependency of cnnkit). Both
sides fill their weights with ``torchvision_ref/deterministic.py``, whose values depend on
the state_dict key and shape alone, so equal layouts mean equal weights and a strict load
of a "torchvision checkpoint" built from the recorded layout must reproduce torchvision's
logits.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from cnnkit.models import create_model, list_models

REF_DIR = Path(__file__).resolve().parent / "torchvision_ref"
REFERENCE = json.loads((REF_DIR / "reference.json").read_text())
ARCHS = list(REFERENCE["models"])

# Parameter counts torchvision publishes with its ImageNet weights (an independent check
# that the recorded reference is torchvision's).
PUBLISHED_NUM_PARAMS = {"resnet18": 11_689_512, "resnet50": 25_557_032,
                        "vgg16": 138_357_544, "densenet121": 7_978_856,
                        "mobilenet_v2": 3_504_872}

# Two torch versions (the reference's and ours) may sum convolutions in different orders:
# measured, that moves a logit by at most 3e-6 of the logits' rms and their sum by 5e-5.
# Scaling one mid-network convolution by 1.01 already fails the comparison on every arch.
RTOL = 1e-4


def _load_deterministic() -> ModuleType:
    # By path, so the helper needs no package and works under any pytest import mode.
    spec = importlib.util.spec_from_file_location("_torchvision_ref_deterministic",
                                                  REF_DIR / "deterministic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


det = _load_deterministic()


def layout_of(model: torch.nn.Module) -> list[list]:
    """``[key, shape, dtype]`` of every state_dict entry, in order, as in reference.json."""
    return [[key, list(t.shape), str(t.dtype).removeprefix("torch.")]
            for key, t in model.state_dict().items()]


def layout_mismatch(ours: list[list], theirs: list[list]) -> str:
    """A precise description of how two layouts differ, or ``""`` when they are equal."""
    if ours == theirs:
        return ""
    our_keys, their_keys = [e[0] for e in ours], [e[0] for e in theirs]
    our_set, their_set = set(our_keys), set(their_keys)
    missing = [k for k in their_keys if k not in our_set]
    extra = [k for k in our_keys if k not in their_set]
    lines = []
    if missing:
        lines.append(f"missing {len(missing)} torchvision keys, first: {missing[:5]}")
    if extra:
        lines.append(f"{len(extra)} keys torchvision lacks, first: {extra[:5]}")
    theirs_by_key = {e[0]: e for e in theirs}
    shapes = [(e, theirs_by_key[e[0]]) for e in ours
              if e[0] in theirs_by_key and e != theirs_by_key[e[0]]]
    if shapes:
        lines.append(f"{len(shapes)} keys differ in shape or dtype, first (ours, torchvision): "
                     f"{shapes[:3]}")
    if not (missing or extra or shapes):
        first = next(i for i, (a, b) in enumerate(zip(our_keys, their_keys, strict=True)) if a != b)
        lines.append(f"same entries in another order: first difference at #{first}: "
                     f"{our_keys[first]!r} (ours) vs {their_keys[first]!r} (torchvision)")
    return "; ".join(lines)


def torchvision_checkpoint(arch: str) -> dict[str, torch.Tensor]:
    """The state_dict a torchvision ``arch`` has after ``fill_deterministic``."""
    spec = {key: (tuple(shape), getattr(torch, dtype))
            for key, shape, dtype in REFERENCE["models"][arch]["state_dict"]}
    return det.fill_state_dict(spec)


def assert_logits_match(logits: torch.Tensor, ref: dict) -> None:
    """Compare ``[2, 1000]`` logits with the recorded first 50, sums and sums of squares."""
    logits = logits.double()
    n = logits.shape[1]
    sumsq = torch.tensor(ref["sumsq"], dtype=torch.float64)
    rms = math.sqrt(sumsq.mean().item() / n)
    first = torch.tensor(ref["first"], dtype=torch.float64)
    torch.testing.assert_close(logits[:, :first.shape[1]], first, rtol=RTOL, atol=RTOL * rms,
                               msg=lambda m: f"first logits differ from torchvision's: {m}")
    # Rounding noise is independent across logits, so it grows in the sum like sqrt(n).
    torch.testing.assert_close(logits.sum(1), torch.tensor(ref["sum"], dtype=torch.float64),
                               rtol=0.0, atol=math.sqrt(n) * RTOL * rms,
                               msg=lambda m: f"sum of logits differs from torchvision's: {m}")
    torch.testing.assert_close(logits.pow(2).sum(1), sumsq, rtol=3 * RTOL, atol=0.0,
                               msg=lambda m: f"sum of squared logits differs: {m}")


@pytest.mark.parametrize("arch", sorted(PUBLISHED_NUM_PARAMS))
def test_reference_counts_are_torchvisions_published(arch: str) -> None:
    assert REFERENCE["models"][arch]["num_params"] == PUBLISHED_NUM_PARAMS[arch]


def test_deterministic_stream_is_the_recorded_one() -> None:
    # If this fails, torch changed its generator: the logit tests below cannot pass until
    # reference.json is regenerated (see make_reference.py), whatever the models do.
    assert det.probe() == REFERENCE["meta"]["probe"]


@pytest.fixture(scope="module", params=ARCHS)
def model(request: pytest.FixtureRequest) -> Iterator[torch.nn.Module]:
    """One cnnkit model per architecture, built once and shared by the three tests below.

    A module-scoped parametrized fixture makes pytest run all tests of one architecture
    before building the next and drop each model after its last test, so at most one
    143M-parameter VGG is alive at a time.
    """
    arch = request.param
    if arch not in list_models():
        pytest.skip(f"{arch} is not registered in cnnkit.models yet")
    yield create_model(arch, num_classes=1000)


def test_state_dict_layout_equals_torchvision(model: torch.nn.Module) -> None:
    ref = REFERENCE["models"][model.model_name]
    assert layout_mismatch(layout_of(model), ref["state_dict"]) == ""


def test_parameter_count_equals_torchvision(model: torch.nn.Module) -> None:
    ref = REFERENCE["models"][model.model_name]
    assert sum(p.numel() for p in model.parameters()) == ref["num_params"]


def test_torchvision_checkpoint_loads_strict_and_gives_its_logits(
        model: torch.nn.Module) -> None:
    arch = model.model_name
    model.load_state_dict(torchvision_checkpoint(arch), strict=True)
    model.eval()
    with torch.no_grad():
        logits = model(det.reference_input())
    assert logits.shape == (2, 1000)
    assert_logits_match(logits, REFERENCE["models"][arch]["logits"])
