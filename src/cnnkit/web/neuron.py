"""The arithmetic behind one neuron, with the model's real numbers.

CNN Explainer (Wang et al. 2020, "CNN Explainer: Learning Convolutional Neural Networks
with Interactive Visualization", IEEE TVCG) explains a convolution neuron by its input
patch, the kernel, their elementwise products and the sum with the bias, and ReLU,
max-pooling and softmax by their inputs and outputs. :func:`neuron` does the same for
any layer of any cnnkit model, from the input and output that
:func:`cnnkit.web.layers.trace` recorded, honouring padding (and its mode), stride,
dilation and groups. Quantised layers are shown in real numbers (``(q - zero_point) x
scale``) followed by the requantisation to their int8 output grid (Jacob et al. 2018,
"Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
Inference").

Every view has ``value`` (the output the pass recorded), ``result`` (what the shown
arithmetic gives, in float64) and ``matches`` (they agree to float32 rounding, or to
one int8 step), so a layer whose forward is not the plain operation (a binary
convolution) is flagged rather than explained wrongly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

import torch
import torch.ao.nn.intrinsic.quantized as nniq
import torch.nn.functional as F
from torch import nn

from .codec import pack
from .layers import Layer

__all__ = ["neuron", "softmax_neuron", "argmax_neuron", "filters", "layer_weights"]

TOP_TERMS = 64  # the largest products a linear neuron lists (all are summed and sent packed)


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def layer_weights(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight and bias of a convolution or linear layer as float (dequantised if int8)."""
    weight = module.weight() if callable(module.weight) else module.weight
    bias = module.bias() if callable(module.bias) else module.bias
    weight = weight.dequantize() if weight.is_quantized else weight
    return weight.detach().float(), None if bias is None else bias.detach().float()


def _requant(module: nn.Module) -> dict[str, Any] | None:
    """The int8 output grid of a quantised layer (scale, zero point, fused ReLU)."""
    if not (hasattr(module, "scale") and hasattr(module, "zero_point")):
        return None
    relu = isinstance(module, (nniq.ConvReLU2d, nniq.LinearReLU))
    return {"scale": float(module.scale), "zero_point": int(module.zero_point), "relu": relu}


def _finish(view: dict[str, Any], module: nn.Module | None, result: float, value: float,
            magnitude: float) -> dict[str, Any]:
    """Add ``result``, ``value`` and ``matches`` (and the requantisation for int8 layers)."""
    grid = _requant(module) if module is not None else None
    if grid is not None:  # quint8: q = clamp(round(v / s) + z, 0, 255), a fused ReLU: q >= z
        s, z = grid["scale"], grid["zero_point"]
        q = min(max(round(result / s) + z, z if grid["relu"] else 0), 255)
        grid.update(real=result, q=q)
        view["requantize"] = grid
        result = (q - z) * s
        tol = s * 1.001  # the engine may round a tie or its float accumulation one step off
    else:
        tol = 1e-5 * magnitude + 1e-6  # float32 accumulation of the same terms
    return {**view, "result": result, "value": value, "matches": abs(result - value) <= tol}


def _pads(module: nn.Module, k: tuple[int, int], d: tuple[int, int]) -> tuple[int, ...]:
    """(top, bottom, left, right) padding, ``"same"`` split as PyTorch does (extra at the end)."""
    p = module.padding
    if p == "valid":
        return (0, 0, 0, 0)
    if p == "same":
        total = [di * (ki - 1) for ki, di in zip(k, d, strict=True)]
        return (total[0] // 2, total[0] - total[0] // 2, total[1] // 2, total[1] - total[1] // 2)
    ph, pw = _pair(p)
    return (ph, ph, pw, pw)


def conv_neuron(module: nn.Module, x: torch.Tensor, out: torch.Tensor, c: int, i: int,
                j: int) -> dict[str, Any]:
    """Output ``(c, i, j)`` of a 2D convolution as patch x kernel, summed, plus bias."""
    weight, bias = layer_weights(module)
    k, stride, dil = tuple(weight.shape[-2:]), _pair(module.stride), _pair(module.dilation)
    top, bottom, left, right = _pads(module, k, dil)
    mode = getattr(module, "padding_mode", "zeros")
    padded = F.pad(x[None], (left, right, top, bottom),
                   mode="constant" if mode == "zeros" else mode)[0]
    per_group, cin = weight.shape[0] // module.groups, weight.shape[1]
    first = (c // per_group) * cin  # the input channels this filter's group sees
    rows = i * stride[0] + torch.arange(k[0]) * dil[0]
    cols = j * stride[1] + torch.arange(k[1]) * dil[1]
    patch = padded[first:first + cin][:, rows][:, :, cols].double()
    kernel = weight[c].double()
    products = patch * kernel
    total = products.sum().item()
    b = 0.0 if bias is None else bias[c].item()
    view = {"kind": "conv", "patch": patch.tolist(), "kernel": kernel.tolist(),
            "products": products.tolist(), "sum": total, "bias": b,
            "in_channels": [first, first + cin], "rows": (rows - top).tolist(),
            "cols": (cols - left).tolist(), "input_size": list(x.shape[-2:]),
            "stride": list(stride), "dilation": list(dil), "groups": module.groups,
            "padding": [top, bottom, left, right], "padding_mode": mode}
    magnitude = products.abs().sum().item() + abs(b)
    return _finish(view, module, total + b, out[c, i, j].item(), magnitude)


def linear_neuron(module: nn.Module, x: torch.Tensor, out: torch.Tensor,
                  j: int) -> dict[str, Any]:
    """Output ``j`` of a linear layer: input . weight row + bias (the largest terms listed)."""
    weight, bias = layer_weights(module)
    inputs, row = x.reshape(-1).double(), weight[j].double()
    products = inputs * row
    top = products.abs().argsort(descending=True)[:TOP_TERMS].tolist()
    total, b = products.sum().item(), 0.0 if bias is None else bias[j].item()
    view = {"kind": "linear", "sum": total, "bias": b, "terms_count": products.numel(),
            "terms": [{"index": t, "input": inputs[t].item(), "weight": row[t].item(),
                       "product": products[t].item()} for t in top],
            "products": pack(products)}
    magnitude = products.abs().sum().item() + abs(b)
    return _finish(view, module, total + b, out[j].item(), magnitude)


def _window(start: int, taps: int, step: int) -> torch.Tensor:
    return start + torch.arange(taps) * step


def pool_neuron(module: nn.Module, x: torch.Tensor, out: torch.Tensor, c: int, i: int,
                j: int) -> dict[str, Any]:
    """Output ``(c, i, j)`` of a max or average pooling, from its window of inputs."""
    size = x.shape[-2:]
    is_max = isinstance(module, (nn.MaxPool2d, nn.AdaptiveMaxPool2d))
    if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        # PyTorch's adaptive windows: [floor(i H / h), ceil((i + 1) H / h))
        starts = [(o * n) // m for o, n, m in zip((i, j), size, out.shape[-2:], strict=True)]
        ends = [-(-(o + 1) * n // m) for o, n, m in zip((i, j), size, out.shape[-2:],
                                                        strict=True)]
        axes = [torch.arange(s, e) for s, e in zip(starts, ends, strict=True)]
        divisor = None
    else:
        k, s, p = _pair(module.kernel_size), _pair(module.stride or module.kernel_size), \
            _pair(module.padding)
        d = _pair(getattr(module, "dilation", 1))
        if is_max:  # taps outside the input are -inf padding, i.e. ignored
            axes = [_window(o * sd - pd, kd, dd) for o, sd, pd, kd, dd
                    in zip((i, j), s, p, k, d, strict=True)]
        else:  # the window stops at the padded border (ceil_mode's last window is shorter)
            axes = [torch.arange(o * sd - pd, min(o * sd - pd + kd, n + pd)) for o, sd, pd, kd, n
                    in zip((i, j), s, p, k, size, strict=True)]
        divisor = None if is_max else module.divisor_override or (
            len(axes[0]) * len(axes[1]) if module.count_include_pad else None)
    inside = [(a >= 0) & (a < n) for a, n in zip(axes, size, strict=True)]
    window = [[x[c, r, q].item() if ri and qi else None
               for q, qi in zip(axes[1].tolist(), inside[1].tolist(), strict=True)]
              for r, ri in zip(axes[0].tolist(), inside[0].tolist(), strict=True)]
    values = [v for row in window for v in row if v is not None]
    if is_max:
        result = max(values)
    else:
        divisor = divisor or len(values)
        result = math.fsum(values) / divisor
    view = {"kind": "pool", "op": "max" if is_max else "mean", "window": window,
            "rows": axes[0].tolist(), "cols": axes[1].tolist(), "divisor": divisor,
            "input_size": list(size)}
    return _finish(view, None, result, out[c, i, j].item(), sum(map(abs, values)))


def norm_neuron(module: nn.Module, x: torch.Tensor, out: torch.Tensor, c: int,
                *where: int) -> dict[str, Any]:
    """Output ``(c, *where)`` of a BatchNorm (of any spatial dims) at inference:
    ``(x - mean) / sqrt(var + eps) * gamma + beta`` (Ioffe and Szegedy 2015, "Batch
    Normalization")."""
    if module.running_mean is not None:
        mean, var = module.running_mean[c].item(), module.running_var[c].item()
    else:  # no running statistics: the (one-image) batch's own, as PyTorch uses then
        mean, var = x[c].double().mean().item(), x[c].double().var(unbiased=False).item()
    gamma = 1.0 if module.weight is None else module.weight[c].item()
    beta = 0.0 if module.bias is None else module.bias[c].item()
    v = x[(c, *where)].item()
    result = (v - mean) / math.sqrt(var + module.eps) * gamma + beta
    view = {"kind": "norm", "input": v, "mean": mean, "var": var, "eps": module.eps,
            "gamma": gamma, "beta": beta}
    return _finish(view, module, result, out[(c, *where)].item(), abs(result))


def _gelu(x: float, m: nn.Module) -> float:
    if getattr(m, "approximate", "none") == "tanh":
        return 0.5 * x * (1 + math.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    return 0.5 * x * (1 + math.erf(x / math.sqrt(2)))


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def _softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


# Class name -> (formula, f(x, module, channel)); quantised modules share the names.
_ACTIVATIONS: MappingProxyType[str, tuple[str, Callable[[float, nn.Module, int], float]]] = \
    MappingProxyType({
        "ReLU": ("max(0, x)", lambda x, m, c: max(0.0, x)),
        "ReLU6": ("min(max(0, x), 6)", lambda x, m, c: min(max(0.0, x), 6.0)),
        "LeakyReLU": ("x if x ≥ 0, else slope · x",
                      lambda x, m, c: x if x >= 0 else m.negative_slope * x),
        "PReLU": ("x if x ≥ 0, else a · x (a learned)",
                  lambda x, m, c: x if x >= 0 else m.weight[c if m.weight.numel() > 1 else 0]
                  .item() * x),
        "ELU": ("x if x > 0, else α · (eˣ − 1)",
                lambda x, m, c: x if x > 0 else m.alpha * math.expm1(x)),
        "GELU": ("x · Φ(x)", lambda x, m, c: _gelu(x, m)),
        "SiLU": ("x · σ(x)", lambda x, m, c: x * _sigmoid(x)),
        "Sigmoid": ("σ(x) = 1 / (1 + e⁻ˣ)", lambda x, m, c: _sigmoid(x)),
        "Tanh": ("tanh(x)", lambda x, m, c: math.tanh(x)),
        "Hardswish": ("x · min(max(x + 3, 0), 6) / 6",
                      lambda x, m, c: x * min(max(x + 3, 0.0), 6.0) / 6),
        "Hardsigmoid": ("min(max(x + 3, 0), 6) / 6",
                        lambda x, m, c: min(max(x + 3, 0.0), 6.0) / 6),
        "Mish": ("x · tanh(ln(1 + eˣ))", lambda x, m, c: x * math.tanh(_softplus(x))),
    })


def activation_neuron(module: nn.Module, x: torch.Tensor, out: torch.Tensor,
                      index: tuple[int, ...]) -> dict[str, Any]:
    """An elementwise activation: its input, formula and output."""
    formula, fn = _ACTIVATIONS[type(module).__name__]
    v = x[index].item()
    result = fn(v, module, index[0])
    view = {"kind": "activation", "function": type(module).__name__, "formula": formula,
            "input": v}
    return _finish(view, module, result, out[index].item(), abs(result))


def passthrough_neuron(layer: Layer, x: torch.Tensor, out: torch.Tensor,
                       index: tuple[int, ...]) -> dict[str, Any]:
    """Identity, flatten and layers without an arithmetic view: the value (and input)."""
    view: dict[str, Any] = {"kind": layer.kind, "function": layer.type}
    value = out[index].item()
    if layer.kind in ("identity", "flatten"):
        flat = x.reshape(-1) if layer.kind == "flatten" else x
        v = flat[index].item()
        return {**view, "input": v, "result": v, "value": value, "matches": v == value}
    return {**view, "result": None, "value": value, "matches": None}


def neuron(layer: Layer, module: nn.Module, x: torch.Tensor, out: torch.Tensor,
           index: tuple[int, ...]) -> dict[str, Any]:
    """The view of one neuron: ``index`` is ``(c, *position)`` in a map or ``(j,)`` in a
    vector. Convolution and pooling are spelled out for 2D maps; in 1D and 3D their
    neurons are shown by value.

    Args:
        layer: the layer (its kind picks the view).
        module: its module.
        x: its recorded input, one image (``[C, H, W]`` or ``[N]``).
        out: its recorded output, one image.
        index: the neuron.

    Example:
        >>> import torch
        >>> from cnnkit.models import create_model
        >>> from cnnkit.web.layers import discover, trace
        >>> from cnnkit.web.neuron import neuron
        >>> model = create_model("tinyvgg", in_chans=1, img_size=8)
        >>> layers = discover(model, (1, 8, 8))
        >>> t = trace(model, layers, torch.rand(1, 1, 8, 8))
        >>> v = neuron(layers[2], model.features.conv_1_2, t.inputs[2], t.outputs[2], (3, 4, 5))
        >>> v["matches"], abs(v["sum"] + v["bias"] - v["value"]) < 1e-5
        (True, True)
    """
    if len(index) != len(out.shape) or any(not 0 <= v < n for v, n in
                                            zip(index, out.shape, strict=True)):
        raise ValueError(f"neuron {list(index)} is outside layer {layer.name!r} of shape "
                         f"{list(out.shape)}; give c and a position inside it")
    if layer.kind == "conv" and out.ndim == 3:
        return conv_neuron(module, x, out, *index)
    if layer.kind == "linear" and out.ndim == 1:
        return linear_neuron(module, x, out, index[0])
    if layer.kind == "pool" and out.ndim == 3:
        return pool_neuron(module, x, out, *index)
    if layer.kind == "norm" and out.ndim >= 2:
        return norm_neuron(module, x, out, *index)
    if layer.kind == "activation" and type(module).__name__ in _ACTIVATIONS:
        return activation_neuron(module, x, out, index)
    return passthrough_neuron(layer, x, out, index)


def softmax_neuron(logits: torch.Tensor, k: int) -> dict[str, Any]:
    """Class ``k``'s probability ``e^(z_k) / sum_j e^(z_j)`` from the logits ``z``.

    The exponentials are of ``z - max(z)`` only when a logit would overflow them; the
    ratio is the same either way.

    Example:
        >>> import torch
        >>> from cnnkit.web.neuron import softmax_neuron
        >>> v = softmax_neuron(torch.tensor([1.0, 2.0, 3.0]), 2)
        >>> round(v["result"], 4), v["matches"]
        (0.6652, True)
    """
    if not 0 <= k < logits.numel():
        raise ValueError(f"class {k} is outside 0..{logits.numel() - 1}")
    z = logits.double()
    shift = z.max().item() if z.abs().max().item() > 80 else 0.0
    exps = (z - shift).exp()
    total = exps.sum().item()
    value = torch.softmax(logits.float(), 0)[k].item()
    view = {"kind": "softmax", "logits": z.tolist(), "exps": exps.tolist(), "shift": shift,
            "sum": total}
    return _finish(view, None, exps[k].item() / total, value, 1.0)


def argmax_neuron(logits: torch.Tensor, position: tuple[int, ...]) -> dict[str, Any]:
    """The class of one position of a segmentation: the argmax of the class scores there.

    Example:
        >>> import torch
        >>> from cnnkit.web.neuron import argmax_neuron
        >>> v = argmax_neuron(torch.tensor([[[0.5, 2.0]], [[1.0, -1.0]]]), (0, 0))
        >>> v["result"], v["scores"], v["matches"]
        (1, [0.5, 1.0], True)
    """
    if len(position) != logits.ndim - 1 or any(not 0 <= p < n for p, n in
                                                zip(position, logits.shape[1:], strict=True)):
        raise ValueError(f"position {list(position)} is outside the mask "
                         f"{list(logits.shape[1:])}")
    scores = logits[(slice(None), *position)]
    value = int(logits.argmax(0)[position])
    result = int(scores.argmax())
    return {"kind": "argmax", "scores": scores.tolist(), "result": result, "value": value,
            "matches": result == value}


def filters(layer: Layer, module: nn.Module, source_shape: tuple[int, ...] | None,
            max_out: int, max_in: int) -> dict[str, Any]:
    """A convolution's kernels ``[out, in, kh, kw]`` or a linear layer's weights.

    A linear layer after a flatten of a map ``(C, H, W)`` shows each output's weights as
    C maps (as CNN Explainer draws the dense layer); otherwise as one row ``[1, in]``.
    Kernels are sent as planes: a 1D kernel as one row, a 3D one ``[kd, kh, kw]`` as its
    depth slices stacked, ``[kd * kh, kw]``. At most ``max_out`` outputs and ``max_in``
    input channels are sent.
    """
    if layer.kind not in ("conv", "linear"):
        raise ValueError(f"layer {layer.name!r} is a {layer.type}; only convolution and linear "
                         "layers have filters")
    weight, bias = layer_weights(module)
    kernel_shape = list(weight.shape)
    if layer.kind == "linear":
        maps = source_shape if source_shape and math.prod(source_shape) == weight.shape[1] \
            and len(source_shape) == 3 else (1, 1, weight.shape[1])
        weight = weight.reshape(weight.shape[0], *maps)
    elif weight.ndim != 4:  # 1D and 3D kernels as planes
        k = weight.shape[2:]
        plane = (1, k[0]) if len(k) == 1 else (math.prod(k[:-1]), k[-1])
        weight = weight.reshape(*weight.shape[:2], *plane)
    shown = weight[:max_out, :max_in]
    return {"layer": layer.index, "name": layer.name, "shape": list(weight.shape),
            "weights": pack(shown), "bias": None if bias is None else bias[:max_out].tolist(),
            "groups": getattr(module, "groups", 1), "kernel_shape": kernel_shape}
