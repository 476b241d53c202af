"""Training: config, Trainer, run folders.

``cnnkit.train`` is both this package and the function :func:`train`: importing the
package binds its name on ``cnnkit`` (shadowing a plain function of the same name),
so the package itself is made callable and calling it calls :func:`train`.
"""

import sys
import types

from cnnkit.run import Preprocess, Run, TrainConfig, load_run

from .trainer import NonFiniteLossError, Trainer, evaluate, train

__all__ = ["TrainConfig", "Trainer", "train", "evaluate", "load_run", "Run", "Preprocess",
           "NonFiniteLossError"]


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
