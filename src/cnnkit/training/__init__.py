"""Training: the :class:`Trainer`, its epoch, optimiser, resume, distributed and fast paths.

The package is ``cnnkit.training``; :func:`train` (also ``cnnkit.train``) is a plain
function that trains one run and returns its :class:`~cnnkit.run.Run`-ready folder.
"""

from cnnkit.run import Preprocess, Run, TrainConfig, load_run

from .api import train
from .trainer import NonFiniteLossError, Trainer, evaluate

__all__ = ["TrainConfig", "Trainer", "train", "evaluate", "load_run", "Run", "Preprocess",
           "NonFiniteLossError"]
