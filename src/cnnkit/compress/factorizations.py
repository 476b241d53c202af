"""The factorisations themselves: one layer in, a factor sequence out.

Tucker-2 (Kim et al. 2016) and CP by alternating least squares (Lebedev et al. 2015) for
``k``-tap convolutions, truncated SVD (Eckart and Young 1936) for linear layers and
one-tap convolutions, the rank selection they share, and their parameter counts. A
kernel is ``[C_out, C_in, *k]`` with 1, 2 or 3 kernel axes: Tucker-2 and SVD act on the
two channel modes only (the kernel axes ride along in ``...`` of every einsum), CP is the
``2 + len(k)``-way decomposition, one factor per kernel axis. Which layers admit which
factorisation is their operator's ``lowrank`` fact (:mod:`cnnkit.layers.ops`).
:mod:`cnnkit.compress.lowrank` applies them to whole models; the layer structures are
:mod:`cnnkit.layers.lowrank`'s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from cnnkit.layers.lowrank import cp_layers, svd_layers, tucker2_layers
from cnnkit.layers.ops import Unsupported, module_facts

__all__ = ["cp_als", "cp_conv", "cp_params", "select_rank", "svd_conv1x1", "svd_linear",
           "svd_params", "tucker2_conv", "tucker2_params"]


# ----------------------------------------------------------------------------- rank selection
def tucker2_params(c_in: int, c_out: int, k: int, r_in: int, r_out: int, bias: bool) -> int:
    """Parameters of a Tucker-2 factorised ``k``-tap (``prod(kernel_size)``) convolution."""
    return c_in * r_in + r_in * r_out * k + r_out * c_out + (c_out if bias else 0)


def cp_params(c_in: int, c_out: int, kernel: Sequence[int], rank: int, bias: bool) -> int:
    """Parameters of a CP factorised convolution with kernel size ``kernel`` (one size
    per axis: ``(kh, kw)`` in 2D)."""
    return rank * (c_in + sum(kernel) + c_out) + (c_out if bias else 0)


def svd_params(n_in: int, n_out: int, rank: int, bias: bool) -> int:
    """Parameters of a rank-``rank`` pair of linear maps ``n_in -> rank -> n_out``."""
    return rank * (n_in + n_out) + (n_out if bias else 0)


def select_rank(singular_values: torch.Tensor, rank: int | str) -> int:
    """Resolve ``rank`` (an int or ``"energy:f"``) against one unfolding's singular values.

    ``"energy:f"`` keeps the smallest ``R`` with ``sum_{i<R} s_i^2 >= f * sum_i s_i^2``.
    An int is clipped to ``[1, len(singular_values)]``.
    """
    n = singular_values.numel()
    if isinstance(rank, bool) or not isinstance(rank, int | str):
        raise ValueError(f"rank must be an int or 'energy:f' with 0<f<=1, got {rank!r}")
    if isinstance(rank, int):
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}; or use 'energy:0.9'")
        return min(rank, n)
    kind, _, value = rank.partition(":")
    try:
        frac = float(value)
    except ValueError:
        frac = -1.0
    if kind != "energy" or not 0.0 < frac <= 1.0:
        raise ValueError(f"unknown rank {rank!r}; use an int or 'energy:f' with 0<f<=1")
    energy = singular_values.double().pow(2)
    cum = energy.cumsum(0) / energy.sum().clamp_min(1e-300)
    # a relative slack absorbs float round-off when f is exactly reachable (e.g. f=1)
    return min(n, int((cum < frac - 1e-12).sum().item()) + 1)


def _check_rank_args(rank: int | str | None, compression: float | None) -> None:
    if (rank is None) == (compression is None):
        raise ValueError("give exactly one of rank=... (int or 'energy:f') or compression=...")
    if compression is not None and compression <= 1.0:
        raise ValueError(f"compression must be > 1 (a parameter reduction), got {compression}")


def _unfold(w: torch.Tensor, mode: int) -> torch.Tensor:
    return w.movedim(mode, 0).reshape(w.shape[mode], -1)


def _gram_eig(mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values (descending) and left singular vectors of a wide ``mat`` from the
    eigendecomposition of ``mat mat^T``: a kernel's channel unfolding is ``C x C*k*k``, and the
    ``C x C`` Gram matrix is ~10x cheaper to decompose than the unfolding itself (float64)."""
    evals, evecs = torch.linalg.eigh(mat @ mat.T)
    return evals.flip(0).clamp_min(0).sqrt(), evecs.flip(1)


def _leading(mat: torch.Tensor, r: int) -> torch.Tensor:
    return _gram_eig(mat)[1][:, :r]


# ----------------------------------------------------------------------------- SVD
def _svd_factors(w: torch.Tensor, rank: int | str | None,
                 compression: float | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``w [out, in] ~ second @ first`` with the singular values split as sqrt on both sides."""
    _check_rank_args(rank, compression)
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    n_out, n_in = w.shape
    if compression is not None:
        r = max(1, min(s.numel(), int(n_in * n_out / compression // (n_in + n_out))))
    else:
        r = select_rank(s, rank)
    root = s[:r].sqrt()
    return (root[:, None] * vh[:r]).to(w.dtype), (u[:, :r] * root).to(w.dtype), r


def svd_linear(linear: nn.Linear, rank: int | str | None = None,
               compression: float | None = None) -> nn.Sequential:
    """Truncated SVD ``W ~ (U sqrt(S)) (sqrt(S) V^T)`` as ``Linear(in, R) -> Linear(R, out)``.

    Eckart and Young (1936), "The approximation of one matrix by another of lower rank":
    the truncation is the best rank-R approximation in Frobenius norm.
    """
    first, second, r = _svd_factors(linear.weight.detach(), rank, compression)
    seq = svd_layers(linear, r)
    with torch.no_grad():
        seq[0].weight.copy_(first)
        seq[1].weight.copy_(second)
        if linear.bias is not None:
            seq[1].bias.copy_(linear.bias)
    return seq


def svd_conv1x1(conv: nn.Module, rank: int | str | None = None,
                compression: float | None = None) -> nn.Sequential:
    """Truncated SVD of a one-tap (``1x1``, ``1``, ``1x1x1``) convolution as two one-tap
    convolutions (stride on the first)."""
    _check_conv(conv, "svd")
    w = conv.weight.detach()
    if math.prod(w.shape[2:]) != 1:
        raise ValueError(f"SVD factorises one-tap convolutions; {type(conv).__name__} has "
                         f"kernel {tuple(w.shape[2:])}: use method='tucker' or 'cp'")
    first, second, r = _svd_factors(w.flatten(1), rank, compression)
    seq = svd_layers(conv, r)
    with torch.no_grad():
        seq[0].weight.copy_(first.reshape(seq[0].weight.shape))
        seq[1].weight.copy_(second.reshape(seq[1].weight.shape))
        if conv.bias is not None:
            seq[1].bias.copy_(conv.bias)
    return seq


def _check_conv(conv: nn.Module, method: str) -> None:
    """Refuse a layer whose operator's ``lowrank`` fact does not admit ``method`` (or that
    the registry does not know), and grouped convolutions (already cheap)."""
    admits = module_facts(conv, "low-rank factorisation").lowrank
    if isinstance(admits, Unsupported):
        raise ValueError(f"cannot factorise a {type(conv).__name__}: {admits.reason}")
    if method not in admits or getattr(conv, "groups", 1) != 1:
        allowed = ", ".join(admits) or "nothing"
        raise ValueError(f"{method} factorises ungrouped layers whose operator admits it; "
                         f"{type(conv).__name__} (groups={getattr(conv, 'groups', 1)}) admits "
                         f"{allowed}; grouped and depthwise convolutions are left alone by "
                         "decompose()")


def _taps(w: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """A ``[out, in]`` matrix as the weight of a one-tap convolution of ``w``'s dims."""
    return factor.reshape(*factor.shape, *(1,) * (w.ndim - 2))


# ----------------------------------------------------------------------------- Tucker-2
def _tucker2_ranks(w: torch.Tensor, rank: int | str | tuple[int, int] | None,
                   compression: float | None) -> tuple[int, int]:
    c_out, c_in, *kernel = w.shape
    if compression is not None:
        # R_in = t*C_in, R_out = t*C_out keeps both modes equally truncated; params(t) = target
        # is the quadratic t^2 C_in C_out k + t (C_in^2 + C_out^2) - C_in C_out k / c = 0.
        k = math.prod(kernel)
        a, b, c = c_in * c_out * k, c_in**2 + c_out**2, -c_in * c_out * k / compression
        t = (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)
        return max(1, min(c_out, int(t * c_out))), max(1, min(c_in, int(t * c_in)))
    if isinstance(rank, tuple):
        return max(1, min(c_out, rank[0])), max(1, min(c_in, rank[1]))
    s_out = _gram_eig(_unfold(w, 0))[0]
    s_in = _gram_eig(_unfold(w, 1))[0]
    return select_rank(s_out, rank), select_rank(s_in, rank)


def tucker2_conv(conv: nn.Module, rank: int | str | tuple[int, int] | None = None,
                 compression: float | None = None, hooi_iters: int = 0) -> nn.Sequential:
    """Tucker-2 factorised convolution (Kim et al. 2016, "Compression of deep convolutional
    neural networks for fast and low power mobile applications").

    HOSVD: ``U_out`` (``U_in``) are the leading left singular vectors of the kernel's
    output (input) channel unfolding; the core is ``G = W x_0 U_out^T x_1 U_in^T``. Each HOOI
    iteration re-fits one mode's factor to the kernel projected on the other (De Lathauwer,
    De Moor and Vandewalle 2000, "On the best rank-1 and rank-(R1, ..., RN) approximation of
    higher-order tensors"). ``rank`` is an int, ``"energy:f"`` per mode, or ``(R_out, R_in)``.
    Padding sits on the core convolution: a bias-free 1x1 convolution commutes with padding.
    Only the channel modes are factorised, so the kernel may have any number of axes
    (``...`` in the einsums): a Conv1d's core is ``k``, a Conv3d's ``kxkxk``.
    """
    _check_conv(conv, "tucker")
    _check_rank_args(rank, compression)
    w = conv.weight.detach().double()
    r_out, r_in = _tucker2_ranks(w, rank, compression)
    u_out, u_in = _leading(_unfold(w, 0), r_out), _leading(_unfold(w, 1), r_in)
    for _ in range(hooi_iters):
        u_in = _leading(_unfold(torch.einsum("oi...,os->si...", w, u_out), 1), r_in)
        u_out = _leading(_unfold(torch.einsum("oi...,ir->or...", w, u_in), 0), r_out)
    core = torch.einsum("oi...,os,ir->sr...", w, u_out, u_in)
    seq = tucker2_layers(conv, r_in, r_out)
    dtype = conv.weight.dtype
    with torch.no_grad():
        seq[0].weight.copy_(_taps(w, u_in.T).to(dtype))
        seq[1].weight.copy_(core.to(dtype))
        seq[2].weight.copy_(_taps(w, u_out).to(dtype))
        if conv.bias is not None:
            seq[2].bias.copy_(conv.bias)
    return seq


# ----------------------------------------------------------------------------- CP
def _khatri_rao(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Column-wise Kronecker product, rows in row-major order of the factors' rows (the
    column order of an unfolding over the same modes)."""
    kr = factors[0]
    for f in factors[1:]:
        kr = (kr[:, None, :] * f[None, :, :]).reshape(-1, kr.shape[1])
    return kr


def cp_als(w: torch.Tensor, rank: int, iters: int = 200, tol: float = 1e-10,
           seed: int = 0) -> list[torch.Tensor]:
    """Rank-``rank`` CP of an N-way tensor (N >= 2) by alternating least squares, in float64.

    ``w[a,b,c,...] ~ sum_r F0[a,r] F1[b,r] F2[c,r] ...`` (Carroll and Chang 1970; Harshman
    1970): a convolution kernel ``[C_out, C_in, *k]`` has ``2 + len(k)`` modes. Each factor
    starts from the leading left singular vectors of its unfolding, padded with seeded
    Gaussian columns when ``rank`` exceeds that mode's size. Each sweep solves every factor
    in closed form, ``F_n = X_(n) KR(others) (Hadamard of the others' Grams)^+``; the loop
    stops after ``iters`` sweeps or when the relative fit changes by less than ``tol``.
    """
    x = w.detach().double()
    modes = x.ndim
    if modes < 2:
        raise ValueError(f"CP needs a tensor of at least 2 modes, got shape {tuple(x.shape)}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    factors = []
    for mode in range(modes):
        u = _leading(_unfold(x, mode), rank)
        if u.shape[1] < rank:
            extra = torch.randn(x.shape[mode], rank - u.shape[1], generator=gen, dtype=x.dtype)
            u = torch.cat([u, extra.to(x.device) / math.sqrt(x.shape[mode])], 1)
        factors.append(u)
    norm2 = x.pow(2).sum().clamp_min(1e-300)
    unfolded = [_unfold(x, mode) for mode in range(modes)]
    last = modes - 1
    prev = math.inf
    for _ in range(iters):
        for n in range(modes):
            others = [factors[m] for m in range(modes) if m != n]
            # Khatri-Rao product of the other factors, rows in the unfolding's column order
            mttkrp = unfolded[n] @ _khatri_rao(others)
            gram = math.prod(f.T @ f for f in others)
            factors[n] = mttkrp @ torch.linalg.pinv(gram, hermitian=True)
        # ||X - X_hat||^2 = ||X||^2 - 2 <X, X_hat> + ||X_hat||^2 without forming X_hat
        full_gram = gram * (factors[last].T @ factors[last])
        resid2 = norm2 - 2 * (factors[last] * mttkrp).sum() + full_gram.sum()
        err = resid2.clamp_min(0).div(norm2).sqrt().item()
        if abs(prev - err) < tol or err < tol:
            break
        prev = err
    # balance the column norms across the factors (the product is unchanged)
    scale = torch.stack([f.norm(dim=0) for f in factors]).clamp_min(1e-300)
    geo = scale.prod(0).pow(1 / modes)
    return [f / s * geo for f, s in zip(factors, scale, strict=True)]


def _cp_rank(w: torch.Tensor, rank: int | str | None, compression: float | None) -> int:
    c_out, c_in, *kernel = w.shape
    if compression is not None:
        return max(1, int(c_out * c_in * math.prod(kernel) / compression
                          // (c_in + sum(kernel) + c_out)))
    if isinstance(rank, int) and not isinstance(rank, bool):
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        return rank
    # the CP rank is at least each channel unfolding's matrix rank: take the larger energy rank
    return max(select_rank(_gram_eig(_unfold(w, m))[0], rank) for m in (0, 1))


def cp_conv(conv: nn.Module, rank: int | str | None = None, compression: float | None = None,
            iters: int = 200, tol: float = 1e-10, seed: int = 0) -> nn.Sequential:
    """CP-factorised convolution (Lebedev et al. 2015, "Speeding-up convolutional neural
    networks using fine-tuned CP-decomposition").

    ``W[o,i,h,w] ~ sum_r A[o,r] B[i,r] C[h,r] D[w,r]`` becomes ``1x1 (B^T) -> depthwise kx1 (C)
    -> depthwise 1xk (D) -> 1x1 (A, bias)``; in any dims, one depthwise convolution per
    kernel axis (a Conv1d's CP has one, a Conv3d's three). Stride, padding and dilation of
    each axis go to the depthwise convolution of that axis, so the output equals the
    reconstructed kernel's.
    """
    _check_conv(conv, "cp")
    _check_rank_args(rank, compression)
    w = conv.weight.detach()
    r = _cp_rank(w.double(), rank, compression)
    a, b, *axes = cp_als(w, r, iters=iters, tol=tol, seed=seed)
    seq = cp_layers(conv, r)
    dtype = w.dtype
    with torch.no_grad():
        seq[0].weight.copy_(_taps(w, b.T).to(dtype))
        for layer, c in zip(seq[1:-1], axes, strict=True):  # [R, 1, 1.., k_axis, ..1]
            layer.weight.copy_(c.T.reshape(layer.weight.shape).to(dtype))
        seq[-1].weight.copy_(_taps(w, a).to(dtype))
        if conv.bias is not None:
            seq[-1].bias.copy_(conv.bias)
    return seq


def _effective_weight(seq: nn.Sequential) -> torch.Tensor:
    """The single kernel (or matrix) a factor sequence computes, for the reconstruction error."""
    ws = [m.weight.detach().double() for m in seq]
    if isinstance(seq[0], nn.Linear) or len(ws) == 2:
        mat = ws[1].flatten(1) @ ws[0].flatten(1)
        return mat if isinstance(seq[0], nn.Linear) else _taps(ws[0], mat)
    first, last = ws[0].flatten(1), ws[-1].flatten(1)
    if seq[1].groups == 1:  # Tucker-2: 1x1 -> core -> 1x1
        return torch.einsum("os,sr...,ri->oi...", last, ws[1], first)
    # CP: the depthwise factors' kernels multiply (each is 1 except along its own axis)
    taps = math.prod(w[:, 0] for w in ws[1:-1])
    return torch.einsum("or,r...,ri->oi...", last, taps, first)
