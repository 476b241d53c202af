"""The operators of torch that cnnkit's zoo uses, registered once each in the operator
registry (:mod:`cnnkit.layers.ops`), with their 1D, 2D and 3D variants.

Importing :mod:`cnnkit.layers` registers them. Each entry says what every consumer needs:
MACs and the spatial map (rules in :mod:`cnnkit.layers.op_rules`), how channels couple
for pruning, the LRP composite slot, the explorer's view, the low-rank and binary
conversions and whether the int8 engine runs it. The quantised module types (what
``compress.quantize`` produces) are registered for the explorer; cnnkit's binary
convolutions for every consumer.

Measured here (torch 2.13, an AVX-512 CPU, one quantised layer against the float convolution
of its dequantised input and weights), and kept as ``int8`` facts: quantised transposed
convolutions compute wrong outputs (relative error ~1) on the x86 and onednn engines whenever
in_channels != out_channels (1, 2 and 3 dims), on fbgemm in 2D when its direct-convolution path
takes them (groups 1, in and out channels multiples of 8, kernel height 2 and width <= 6,
stride 1 or 2, no padding: every up-convolution of a 2D U-Net), and on qnnpack in 3D;
qnnpack has no quantised 3D max-pooling, and no engine has quantised kernels for linear
interpolation in 1D or 3D, nearest interpolation in 1D, max-pooling with indices or
max-unpooling (SegNet).
"""

from __future__ import annotations

import numbers
from typing import Any

import torch.ao.nn.quantized as nnq
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.modules.padding import (
    _CircularPadNd,
    _ConstantPadNd,
    _ReflectionPadNd,
    _ReplicationPadNd,
)

from . import binary, nd
from . import op_rules as r
from .ops import GLOBAL, OpFacts, Unsupported, arg, ntuple, register_op

__all__: list[str] = []



# -- facts that depend on the call ------------------------------------------------------
def _is_tensor_pair(args: tuple, kwargs: dict) -> bool:
    return len(args) >= 2 and all(hasattr(a, "shape") for a in args[:2])


def _merge_or_opaque(args: tuple, kwargs: dict) -> str:
    """``a + b`` pairs channels; ``x + 1`` moves a zeroed channel away from zero."""
    return "merge" if _is_tensor_pair(args, kwargs) else "opaque"


def _scaled(args: tuple, kwargs: dict) -> str:
    """``x * 2`` or ``x / 2`` keeps a zero channel zero; a product of tensors is a gate."""
    return "pass" if len(args) >= 2 and isinstance(args[1], numbers.Number) else "opaque"


def _zero_pad(args: tuple, kwargs: dict) -> str:
    mode, value = arg(args, kwargs, 2, "mode", "constant"), arg(args, kwargs, 3, "value", None)
    return "pass" if mode != "constant" or not value else "opaque"


def _spatial_index(args: tuple, kwargs: dict) -> str:
    """``x[..., a:b]`` or ``x[:, :, a:b]`` leaves batch and channels whole: channels pass."""
    index = args[1] if isinstance(args[1], tuple) else (args[1],)
    if index and index[0] is Ellipsis and len(index) <= args[0].ndim - 1:
        return "pass"
    head = index[:2]
    whole = all(isinstance(i, slice) and i == slice(None) for i in head)
    return "pass" if whole and len(head) == 2 and Ellipsis not in index[2:] else "opaque"


def _transposed_int8(args: tuple, kwargs: dict, backend: str) -> bool | Unsupported:
    """Where each engine's quantised transposed convolution is wrong (module docstring)."""
    weight = arg(args, kwargs, 1, "weight")  # [in, out / groups, *kernel]
    dims, groups = weight.ndim - 2, arg(args, kwargs, 6, "groups", 1)
    c_in, c_out, kernel = weight.shape[0], weight.shape[1] * groups, weight.shape[2:]
    name = f"conv_transpose{dims}d"
    if backend in ("x86", "onednn") and c_in != c_out:
        return Unsupported(f"the {backend} int8 engine computes {name} wrongly when in_channels "
                           f"({c_in}) != out_channels ({c_out}) in this torch (measured)")
    stride = ntuple(arg(args, kwargs, 3, "stride", 1), dims)
    padding = ntuple(arg(args, kwargs, 4, "padding", 0), dims)
    if backend == "fbgemm" and dims == 2 and groups == 1 and c_in % 8 == 0 \
            and c_out % 8 == 0 and kernel[0] == 2 and kernel[1] <= 6 \
            and all(s in (1, 2) for s in stride) and not any(padding):
        return Unsupported(f"the fbgemm int8 engine's direct path computes {name} with kernel "
                           f"{tuple(kernel)}, stride {stride} and channels multiple of 8 "
                           f"({c_in} -> {c_out}) wrongly in this torch (measured)")
    if backend == "qnnpack" and dims == 3:
        return Unsupported(f"the qnnpack int8 engine computes {name} wrongly in this torch "
                           "(measured)")
    return True


def _max_pool_int8(dims: int) -> Any:
    def fact(args: tuple, kwargs: dict, backend: str) -> bool | Unsupported:
        if arg(args, kwargs, 6, "return_indices", False):
            return Unsupported(_NO_INT8_INDICES)
        if backend == "qnnpack" and dims == 3:
            return Unsupported("the qnnpack int8 engine has no quantised max_pool3d")
        return True
    return fact


_NO_INT8_INDICES = ("the int8 engines have no quantised max-pooling with indices nor "
                    "max-unpooling; keep this model in float")


def _interpolate_int8(args: tuple, kwargs: dict, backend: str) -> bool | Unsupported:
    dims = args[0].ndim - 2
    mode = arg(args, kwargs, 3, "mode", "nearest")
    if (dims, mode) in ((2, "nearest"), (2, "bilinear"), (3, "nearest"), (2, "nearest-exact"),
                        (3, "nearest-exact")):
        return True
    return Unsupported(f"the int8 engines have no quantised {mode} interpolation in {dims}D; "
                       "keep this model in float or resample with a (transposed) convolution")


_BINARY_CONV = Unsupported("binary weights are signs: this layer is binary already; "
                           "factorise or quantise the real-valued network")
_NO_BINARY_T = Unsupported("there is no binary transposed convolution; binarize networks "
                           "without transposed convolutions")
_NO_LOWRANK_T = Unsupported("transposed convolutions are not factorised")


def _activation(name: str, modules: tuple[type, ...], functions: tuple[str, ...],
                zero_preserving: bool = True, lrp: str = "gradient", **extra: Any) -> None:
    register_op(OpFacts(name, modules, functions, channels="pass" if zero_preserving
                        else "opaque", lrp=lrp, view="activation", **extra))


def _register() -> None:
    bwn = (binary.BinaryWeightConv1d, binary.BinaryWeightConv2d, binary.BinaryWeightConv3d)
    xnor = (binary.XNORConv1d, binary.XNORConv2d, binary.XNORConv3d)
    qconv = (nnq.Conv1d, nnq.Conv2d, nnq.Conv3d)
    qconv_t = (nnq.ConvTranspose1d, nnq.ConvTranspose2d, nnq.ConvTranspose3d)
    for d in nd.DIMS:
        i = d - 1
        register_op(OpFacts(
            f"conv{d}d", (nd.conv(d),), (f"conv{d}d",), d, r.conv_macs, r.conv_field, "conv",
            "conv", "conv", ("svd", "tucker", "cp"), binary.conversion(bwn[i], xnor[i])))
        register_op(OpFacts(
            f"binary_conv{d}d", (bwn[i], xnor[i]), (), d, channels="conv", lrp=None,
            view="conv", lowrank=_BINARY_CONV, int8=_BINARY_CONV))
        register_op(OpFacts(
            f"conv_transpose{d}d", (nd.conv_transpose(d),), (f"conv_transpose{d}d",), d,
            r.conv_transpose_macs, r.conv_transpose_field, "conv_transpose", "gradient",
            lowrank=_NO_LOWRANK_T, binary=_NO_BINARY_T, int8=_transposed_int8))
        register_op(OpFacts(f"quantized_conv{d}d", (qconv[i],), (), d, view="conv"))
        register_op(OpFacts(f"quantized_conv_transpose{d}d", (qconv_t[i],), (), d))
        register_op(OpFacts(
            f"max_pool{d}d", (nd.max_pool(d),),
            (f"max_pool{d}d", f"_max_pool{d}d", f"max_pool{d}d_with_indices"), d,
            field=r.pool_field(dilated=True), channels="pass", lrp="gradient", view="max_pool",
            int8=_max_pool_int8(d)))
        register_op(OpFacts(
            f"avg_pool{d}d", (nd.avg_pool(d),), (f"avg_pool{d}d",), d,
            field=r.pool_field(dilated=False), channels="pass", lrp="pool", view="avg_pool"))
        register_op(OpFacts(
            f"lp_pool{d}d", ((nn.LPPool1d, nn.LPPool2d, nn.LPPool3d)[i],), (f"lp_pool{d}d",),
            d, field=r.lp_pool_field, channels="pass", lrp="gradient"))
        register_op(OpFacts(
            f"adaptive_avg_pool{d}d", (nd.adaptive_avg_pool(d),), (f"adaptive_avg_pool{d}d",),
            d, field=r.adaptive_field, channels="pass", lrp="pool", view="adaptive_avg_pool"))
        register_op(OpFacts(
            f"adaptive_max_pool{d}d", (nd.adaptive_max_pool(d),),
            (f"adaptive_max_pool{d}d", f"_adaptive_max_pool{d}d",
             f"adaptive_max_pool{d}d_with_indices"), d, field=r.adaptive_field,
            channels="pass", lrp="gradient", view="adaptive_max_pool"))
        register_op(OpFacts(
            f"max_unpool{d}d", (nd.max_unpool(d),), (f"max_unpool{d}d",), d,
            field=r.unpool_field, channels="merge", lrp="gradient",
            int8=Unsupported(_NO_INT8_INDICES)))

    # weighted layers that are not convolutions
    register_op(OpFacts("linear", (nn.Linear,), ("linear",), macs=r.linear_macs, field=GLOBAL,
                        channels="linear", lrp="dense", view="linear", lowrank=("svd",)))
    register_op(OpFacts("quantized_linear", (nnq.Linear,), (), view="linear"))
    register_op(OpFacts("bilinear", (nn.Bilinear,), ("bilinear",), field=GLOBAL, lrp=None))
    register_op(OpFacts("batch_norm", (_BatchNorm,), ("batch_norm",), macs=r.norm_macs,
                        channels="norm", lrp="norm", view="norm"))
    register_op(OpFacts("instance_norm", (_InstanceNorm,), ("instance_norm",),
                        macs=r.norm_macs, channels="norm", lrp="gradient"))
    register_op(OpFacts("group_norm", (nn.GroupNorm,), ("group_norm",), macs=r.norm_macs,
                        lrp="gradient"))
    register_op(OpFacts("layer_norm", (nn.LayerNorm,), ("layer_norm",), macs=r.norm_macs,
                        lrp="gradient"))

    # activations (module and functional forms); the zero-preserving ones pass channels
    _activation("relu", (nn.ReLU,), ("relu", "relu_"))
    _activation("hardtanh", (nn.Hardtanh,), ("hardtanh", "hardtanh_", "relu6"))  # ReLU6 too
    _activation("leaky_relu", (nn.LeakyReLU,), ("leaky_relu", "leaky_relu_"))
    _activation("prelu", (nn.PReLU,), ("prelu",))
    _activation("elu", (nn.ELU,), ("elu", "elu_"))
    _activation("gelu", (nn.GELU,), ("gelu",))
    _activation("silu", (nn.SiLU,), ("silu", "silu_"))
    _activation("mish", (nn.Mish,), ("mish",))
    _activation("hardswish", (nn.Hardswish,), ("hardswish", "hardswish_"))
    _activation("tanh", (nn.Tanh,), ("tanh", "tanh_"))
    _activation("sigmoid", (nn.Sigmoid,), ("sigmoid", "sigmoid_"), zero_preserving=False)
    _activation("hardsigmoid", (nn.Hardsigmoid,), ("hardsigmoid",), zero_preserving=False)
    _activation("softplus", (nn.Softplus,), ("softplus",), zero_preserving=False)
    register_op(OpFacts("softmax", (nn.Softmax, nn.LogSoftmax, nn.Softmax2d),
                        ("softmax", "log_softmax"), lrp="gradient"))

    # no-ops at inference, reshaping and resampling
    register_op(OpFacts("identity", (nn.Identity,), (), channels="pass", lrp="gradient",
                        view="identity"))
    register_op(OpFacts(
        "dropout", (nn.modules.dropout._DropoutNd,),
        ("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
         "feature_alpha_dropout"), channels="pass", lrp="gradient", view="identity"))
    register_op(OpFacts("flatten", (nn.Flatten,), ("flatten",), channels="flatten",
                        lrp="gradient", view="flatten"))
    register_op(OpFacts("reshape", (), ("view", "reshape"), channels="flatten"))
    register_op(OpFacts(
        "interpolate", (nn.Upsample,), ("interpolate", "upsample"), field=r.resample_field(),
        channels="pass", lrp="gradient", int8=_interpolate_int8))
    register_op(OpFacts("upsample_nearest", (), ("upsample_nearest",),
                        field=r.resample_field("nearest"), channels="pass"))
    register_op(OpFacts("upsample_bilinear", (), ("upsample_bilinear",),
                        field=r.resample_field("bilinear", aligned=True), channels="pass"))
    register_op(OpFacts(
        "pad", (_ConstantPadNd, _ReflectionPadNd, _ReplicationPadNd, _CircularPadNd), ("pad",),
        field=r.pad_field, channels=_zero_pad, lrp="gradient"))
    register_op(OpFacts("pixel_shuffle", (nn.PixelShuffle,), ("pixel_shuffle",),
                        field=r.pixel_shuffle_field, lrp="gradient"))
    register_op(OpFacts("pixel_unshuffle", (nn.PixelUnshuffle,), ("pixel_unshuffle",),
                        field=r.pixel_unshuffle_field, lrp="gradient"))
    register_op(OpFacts("index", (), ("__getitem__",), field=r.crop_field,
                        channels=_spatial_index))

    # arithmetic between tensors (the residual sums, concatenations and gates of the zoo)
    register_op(OpFacts("add", (), ("add", "add_", "__add__", "__radd__", "__iadd__", "sub",
                                    "sub_", "__sub__", "__rsub__", "__isub__"),
                        channels=_merge_or_opaque))
    register_op(OpFacts("mul", (), ("mul", "mul_", "__mul__", "__rmul__", "__imul__", "div",
                                    "div_", "__truediv__", "__itruediv__"), channels=_scaled))
    register_op(OpFacts("cat", (), ("cat", "concat", "concatenate"), channels="concat"))
    register_op(OpFacts("copy", (), ("contiguous", "clone", "detach", "to", "float", "double",
                                     "half", "type_as"), channels="pass"))
    register_op(OpFacts("sign", (), ("abs", "neg", "__neg__", "sign"), channels="pass"))
    register_op(OpFacts("reduce", (), ("mean", "sum", "amax", "amin", "std", "var"),
                        channels="pass"))  # pass only while dim 1 keeps its size
    register_op(OpFacts("elementwise", (), (
        "where", "__eq__", "eq", "__ne__", "ne", "__gt__", "gt", "__lt__", "lt", "__ge__",
        "ge", "__le__", "le", "maximum", "minimum", "clamp", "clamp_min", "clamp_max", "exp",
        "log", "sqrt", "rsqrt", "pow", "__pow__", "__rtruediv__", "reciprocal")))
    register_op(OpFacts("layout", (), (
        "unsqueeze", "squeeze", "permute", "transpose", "expand", "expand_as", "movedim",
        "repeat", "split", "chunk", "narrow", "unbind", "stack", "new_full", "new_zeros",
        "new_ones", "full_like", "zeros_like", "ones_like", "empty_like")))


_register()
