"""Reusable layers: recalibration (attention) blocks and their registry; the dense CRF."""

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

__all__ = [
    "SqueezeExcite", "ChannelSE", "SpatialSE", "SCSE", "ECA", "ELA",
    "eca_kernel_size", "register_attn", "create_attn", "list_attn", "DenseCRF", "crf_refine",
]
