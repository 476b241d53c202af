"""Reusable layers: layer types by number of spatial dimensions (:mod:`.nd`); recalibration
(attention) blocks and their registry; the dense CRF; the registry of operator facts
(:mod:`.ops`), filled with torch's operators by :mod:`.torch_ops` on import."""

from . import nd, torch_ops  # noqa: F401 (torch_ops registers torch's operators)
from .attention import (
    ECA,
    ELA,
    SCSE,
    ChannelSE,
    SpatialSE,
    SqueezeExcite,
    create_attn,
    eca_kernel_size,
    list_attn,
    register_attn,
)
from .crf import DenseCRF, crf_refine
from .nd import interp_mode, resolve_input_size, spatial_dims
from .ops import OpFacts, UnknownOperator, Unsupported, register_op, registered_ops

__all__ = [
    "nd", "resolve_input_size", "spatial_dims", "interp_mode",
    "SqueezeExcite", "ChannelSE", "SpatialSE", "SCSE", "ECA", "ELA",
    "eca_kernel_size", "register_attn", "create_attn", "list_attn", "DenseCRF", "crf_refine",
    "OpFacts", "Unsupported", "UnknownOperator", "register_op", "registered_ops",
]
