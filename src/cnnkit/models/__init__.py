"""The model zoo. Importing this package registers every family."""

from ._base import Classifier
from ._registry import create_model, list_models, model_info, register_model

# Each family module registers its builders on import.
from . import allconv, densenet, lenet, mobilenet, resnet, tinyvgg, vgg, wide_resnet  # noqa: E402,F401  isort: skip
from . import deeplab, espcn, fcn, segnet, unet, unet3d  # noqa: E402,F401  isort: skip

__all__ = ["Classifier", "create_model", "list_models", "model_info", "register_model"]
