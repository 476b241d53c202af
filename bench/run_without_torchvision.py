"""Run a bench script with zennit importable where torchvision is not installed.

zennit 0.5.1's ``__init__`` imports ``torchvision.models.resnet`` for its ResNet
canonizers only; here placeholder ``BasicBlock`` / ``Bottleneck`` classes stand in while
zennit is imported (as ``tests/explain/conftest.py`` does), so those canonizers match
nothing and the benchmark skips zennit's ResNet-18 LRP. Used for the before/after runs
in docs/benchmarks.md, on both sides alike::

    python bench/run_without_torchvision.py bench/explain_throughput.py --ig-steps 8
"""

import runpy
import sys
import types

from torch import nn

names = ("torchvision", "torchvision.models", "torchvision.models.resnet")
added = {n: types.ModuleType(n) for n in names if n not in sys.modules}
if len(added) == len(names):
    resnet = added["torchvision.models.resnet"]
    resnet.BasicBlock = type("BasicBlock", (nn.Module,), {"__module__": resnet.__name__})
    resnet.Bottleneck = type("Bottleneck", (nn.Module,), {"__module__": resnet.__name__})
    added["torchvision"].models = added["torchvision.models"]
    added["torchvision.models"].resnet = resnet
    sys.modules.update(added)
    try:
        import zennit  # noqa: F401
    finally:
        for name in names:
            sys.modules.pop(name, None)

script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
