"""Reusable layers: layer types by number of spatial dimensions (:mod:`.nd`); recalibration
(attention) blocks and their registry; the dense CRF."""

from . import nd
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

__all__ = [
    "nd", "resolve_input_size", "spatial_dims", "interp_mode",
    "SqueezeExcite", "ChannelSE", "SpatialSE", "SCSE", "ECA", "ELA",
    "eca_kernel_size", "register_attn", "create_attn", "list_attn", "DenseCRF", "crf_refine",
]
