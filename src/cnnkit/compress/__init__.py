"""Compression: structured and unstructured pruning, int8 quantisation, low-rank and binary
layers, each judged by measured latency and accuracy.

* :func:`prune` removes whole channels and returns a smaller dense model; the coupled
  channels come from :func:`dependency_groups`, a read-only trace of the model;
  :func:`iterative_prune` prunes in stages with fine-tuning between them, and
  :class:`MaskSparsity` is the pruning-aware regulariser for that fine-tuning.
* :func:`quantize` makes a static int8 model (per-channel weights, calibrated observers,
  BatchNorm folded, conv-BN-ReLU fused); :func:`search_calibration` keeps the most
  accurate calibration setting.
* :func:`decompose` factorises convolutions (Tucker-2, CP) and linear layers (SVD);
  :func:`factorize_model` builds factorised layers for training from the start.
* :func:`binarize` swaps convolutions for binary-weight or XNOR layers.
* :func:`magnitude_prune` and :func:`lottery_ticket` for unstructured sparsity.
* :func:`export` writes ONNX or TorchScript and checks the outputs agree.

Whole-run compression (``cnnkit compress``: prune, fine-tune, quantise and measure a run)
is a workflow: :func:`cnnkit.workflows.compress.compress_run` and
:func:`cnnkit.workflows.sweep.sweep_run`.
"""

from cnnkit.layers.binary import BinaryWeightConv2d, XNORConv2d, binarize

from .export import export
from .graph import Group, Member, dependency_groups
from .lowrank import decompose, factorize_model
from .prune import apply_history, criteria, prune, register_criterion
from .qat import quantize_aware_train
from .quantize import freeze_quantized, quantize, search_calibration
from .quantized_file import load_quantized, save_quantized
from .schedule import MaskSparsity, iterative_prune
from .unstructured import lottery_ticket, magnitude_prune, remove_masks, sparsity_report

__all__ = [
    "BinaryWeightConv2d", "Group", "MaskSparsity", "Member", "XNORConv2d", "apply_history",
    "binarize", "criteria", "decompose", "dependency_groups", "export",
    "factorize_model", "freeze_quantized", "iterative_prune", "load_quantized",
    "lottery_ticket", "magnitude_prune", "prune", "quantize",
    "quantize_aware_train", "register_criterion", "remove_masks", "save_quantized",
    "search_calibration", "sparsity_report",
]
