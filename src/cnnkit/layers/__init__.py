"""Reusable layers: recalibration (attention) blocks and their registry."""

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

__all__ = [
    "SqueezeExcite", "ChannelSE", "SpatialSE", "SCSE", "ECA", "ELA",
    "eca_kernel_size", "register_attn", "create_attn", "list_attn",
]
