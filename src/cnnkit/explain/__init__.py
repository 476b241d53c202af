"""Explanations: why a CNN predicts what it predicts.

``explainer = cnnkit.explain.create(name, model, layer=None, **options)`` then
``maps = explainer(x, target=None)``. :func:`list_methods` names them all.
"""

from ._base import Explainer, create, list_methods, register_method, resolve_layer

__all__ = ["Explainer", "create", "list_methods", "register_method", "resolve_layer"]
from . import cam, fullgrad, gradient, guided, lrp, perturbation, scorecam  # noqa: F401, E402
