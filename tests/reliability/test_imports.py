"""The reliability catalogue, the package itself (issue 12, point 9): ``import cnnkit`` then
``cnnkit.explain.create(...)`` or ``cnnkit.compress.prune(...)`` raised AttributeError. Every
subpackage is reachable from the top-level package, lazily: importing cnnkit (and so
``cnnkit --help``) still does not import PyTorch."""

from __future__ import annotations

import subprocess
import sys

SUBPACKAGES = ["layers", "models", "data", "train", "explain", "compress", "analysis", "cli",
               "web"]


def _python(code: str) -> str:
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_subpackages_are_reachable_from_a_bare_import():
    out = _python(
        "import sys, cnnkit\n"
        "print('torch' in sys.modules)\n"
        "m = cnnkit.models.create_model('lenet5', num_classes=3, in_chans=1, img_size=8)\n"
        "import torch\n"
        "x = torch.rand(2, 1, 8, 8)\n"
        "print(tuple(cnnkit.explain.create('saliency', m)(x, target=0).shape))\n"
        "print(cnnkit.compress.prune(m, 0.5).features.c1.out_channels)\n"
        "print(cnnkit.analysis.summary(m, (1, 8, 8)).total_params > 0)\n"
        f"print(all(hasattr(cnnkit, n) for n in {SUBPACKAGES!r}))\n")
    assert out.splitlines() == ["False", "(2, 8, 8)", "3", "True", "True"]


def test_unknown_names_still_raise_attribute_error():
    out = _python("import cnnkit\n"
                  "try:\n    cnnkit.nothing\nexcept AttributeError as e:\n    print(e)\n"
                  f"print(set({SUBPACKAGES!r}) <= set(dir(cnnkit)))\n")
    assert out.splitlines() == ["module 'cnnkit' has no attribute 'nothing'", "True"]
