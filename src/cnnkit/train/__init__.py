"""Training: config, Trainer, run folders."""

from .config import TrainConfig
from .run import Preprocess, Run, load_run
from .trainer import NonFiniteLossError, Trainer, evaluate, train

__all__ = ["TrainConfig", "Trainer", "train", "evaluate", "load_run", "Run", "Preprocess",
           "NonFiniteLossError"]
