"""Integer GEMM arithmetic: int8 codes in, int32 accumulation, one float rescale out.

One definition shared by the quantized layers (in eval mode, without autograd) and the integer runtime of
``qat.deploy``. Both call these functions on the same integer codes, so the exported model reproduces the
evaluated fake-quant model bit for bit: integer sums are exact whatever their order, and the only float
step (the rescale) is the same code. A float matmul of dequantized values would agree only up to float32
summation noise, and an activation within that noise of a rounding boundary flips its code in the next
layer, which shows in the logits.

Which layers take this path is decided by :func:`weight_int_ok` / :func:`act_int_ok` (scales that do not
vary along the reduction dimension, and integer activation codes); the others dequantize, which is exact
in both places for the same reason (the same float ops on the same values).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class IntWeight(NamedTuple):
    """A weight as the integer GEMM uses it: ``q - zero_point = w_int.T + w_zero`` per output row."""

    w_int: torch.Tensor  # [K, N] int8 (uint codes shifted by -128 to fit)
    w_sum: torch.Tensor  # [N] int32, column sums of w_int (for the activation offset term)
    w_zero: torch.Tensor | None  # [N] int32 offset, None when zero
    w_scale: torch.Tensor  # [N] or [1] float32


def weight_int_ok(kind: str, granularity: str, axis: int, ndim: int, two_scales: bool) -> bool:
    """Whether a weight format has one scale per output row (per tensor, or per channel on axis 0) and
    integer codes (int, binary, ternary with one scale): then ``W x`` can be summed in integers."""
    if kind not in ("int", "binary", "ternary") or two_scales:
        return False
    return granularity == "per_tensor" or (granularity == "per_channel" and axis % ndim == 0)


def act_int_ok(kind: str, granularity: str, dynamic: bool) -> bool:
    """Whether an activation format gives integer codes with one scale per GEMM row: per tensor (static
    or dynamic) or per token (dynamic)."""
    return kind == "int" and (granularity == "per_tensor" or (dynamic and granularity == "per_token"))


def int_weight(
    codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, qmax: int
) -> IntWeight:
    """Build the GEMM operand from ``codes [N, K]`` (integer values in any dtype), ``scale`` (N or 1
    values) and an optional integer-valued ``zero_point`` (N or 1 values)."""
    n = codes.shape[0]
    q = codes.reshape(n, -1).to(torch.int32)
    shift = 128 if qmax > 127 else 0  # uint8 codes: store q - 128 so they fit in int8
    w0 = torch.full((n,), shift, dtype=torch.int32, device=codes.device)
    if zero_point is not None:
        w0 = w0 - zero_point.reshape(-1).round().to(torch.int32).expand(n)
    w = (q - shift).to(torch.int8)
    return IntWeight(
        w_int=w.t().contiguous(),
        w_sum=w.to(torch.int32).sum(dim=1),
        w_zero=w0 if bool(w0.any()) else None,
        w_scale=scale.reshape(-1).float(),
    )


def conv_weight_im2col_order(w: IntWeight, in_channels: int) -> IntWeight:
    """Reorder the rows of a conv weight from (C, kh, kw) to (kh, kw, C), the column order of
    :func:`im2col`."""
    k = w.w_int.shape[0]
    w_int = w.w_int.reshape(in_channels, k // in_channels, -1).permute(1, 0, 2).reshape(k, -1).contiguous()
    return w._replace(w_int=w_int)


def act_codes(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(A int8, a0 int32, scale)`` with ``A + a0 = q - zero_point``; the codes ``q`` are those of the
    fake quant (``clamp(round(x * (1/s)) + z)``), ``a0`` and ``scale`` broadcast on ``x``. ``a0`` is None
    for symmetric signed formats, whose offset is zero (known from the format: no device sync)."""
    shift = 128 if qmax > 127 else 0
    q = torch.round(x * torch.reciprocal(scale)).add_(zero_point).clamp_(qmin, qmax).sub_(shift)
    a0 = None if (symmetric and not shift) else (shift - zero_point).to(torch.int32)
    return q.to(torch.int8), a0, scale


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a [M, K] int8 @ b [K, N] int8 -> int32`` with ``torch._int_mm``; on CUDA, zero-pads to the shapes
    its kernels need (M > 16, K and N multiples of 8, at least 16), which leaves the product unchanged."""
    if a.device.type != "cuda":
        return torch._int_mm(a, b)
    m, k = a.shape
    n = b.shape[1]
    pm, pk, pn = max(17 - m, 0), (-k) % 8 + max(16 - k, 0), (-n) % 8 + max(16 - n, 0)
    if pm or pk:
        a = F.pad(a, (0, pk, 0, pm))
    if pk or pn:
        b = F.pad(b, (0, pn, 0, pk))
    return torch._int_mm(a, b)[:m, :n]


def int_gemm(
    a: torch.Tensor, a0: torch.Tensor | None, sx: torch.Tensor, w: IntWeight, bias: torch.Tensor | None
) -> torch.Tensor:
    """``a [M, K] int8`` (``+ a0``: [M, 1] or [1], None for zero) times the weight, exact in int32, then
    one rescale: ``acc * (sx * w_scale) + bias`` as float32 ``[M, N]``."""
    acc = int_mm(a.contiguous(), w.w_int)
    if a0 is not None:
        acc.add_(a0 * w.w_sum)
    if w.w_zero is not None:
        row = a.sum(dim=1, keepdim=True, dtype=torch.int32)
        acc.add_((row if a0 is None else row + a.shape[1] * a0) * w.w_zero)
    y = acc.to(torch.float32)
    if sx.numel() == 1:  # one activation scale: a single [N] vector, fused with the bias
        scale = sx.reshape(1) * w.w_scale
        return y.mul_(scale) if bias is None else torch.addcmul(bias, y, scale)
    y.mul_(sx).mul_(w.w_scale)
    return y if bias is None else y.add_(bias)


def linear(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, symmetric: bool,
    w: IntWeight, bias: torch.Tensor | None,
) -> torch.Tensor:  # fmt: skip
    """A linear layer on ``x [..., K]``: activation codes with the given (broadcastable) scale / zero
    point, one row per token, then :func:`int_gemm`."""
    a, a0, sx = act_codes(x, scale, zero_point, qmin, qmax, symmetric)
    k = x.shape[-1]

    def rows(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, 1) if t.numel() > 1 else t.reshape(1)

    y = int_gemm(a.reshape(-1, k), None if a0 is None else rows(a0), rows(sx), w, bias)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def conv(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, symmetric: bool,
    w: IntWeight, bias: torch.Tensor | None, kernel_size: tuple[int, ...], stride: tuple[int, ...],
    padding: tuple[int, ...], dilation: tuple[int, ...],
) -> torch.Tensor:  # fmt: skip
    """A Conv1d/Conv2d (groups 1, zero padding, one activation scale) on int8 im2col columns. ``w`` must
    be in :func:`conv_weight_im2col_order`."""
    a, a0, sx = act_codes(x, scale, zero_point, qmin, qmax, symmetric)
    a0 = None if a0 is None else a0.reshape(1)
    one_d = x.dim() == 3
    if one_d:
        a = a.unsqueeze(2)
        kernel_size, stride = (1, *kernel_size), (1, *stride)
        padding, dilation = (0, *padding), (1, *dilation)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    if ph or pw:  # pad with the code of a real 0 (A + a0 = 0), as the float conv pads with 0.0
        a = F.pad(a, (pw, pw, ph, ph), value=0 if a0 is None else int(-a0[0]))
    # im2col on the int8 codes, channels last: [B, Ho, Wo, C, kh, kw] views, then one int8 copy into
    # [B*Ho*Wo, kh*kw*C] whose innermost runs (C codes) are contiguous.
    nhwc = a.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
    patches = nhwc.unfold(1, (kh - 1) * dh + 1, sh)[..., ::dh].unfold(2, (kw - 1) * dw + 1, sw)[..., ::dw]
    b, ho, wo, c = patches.shape[:4]
    cols = patches.permute(0, 1, 2, 4, 5, 3).reshape(b * ho * wo, kh * kw * c)
    y = int_gemm(cols, a0, sx.reshape(1), w, bias).reshape(b, ho, wo, -1).permute(0, 3, 1, 2)
    return y.squeeze(2) if one_d else y
