"""Model analysis: per-layer summaries (shapes, parameters, MACs, memory, receptive fields)."""

from .summary import LayerSummary, ModelSummary, format_bytes, format_count, summary

__all__ = ["summary", "ModelSummary", "LayerSummary", "format_count", "format_bytes"]
