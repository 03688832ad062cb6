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

Kernels. The weight is kept ``[N, K]`` (one row per output), which ``torch._int_mm`` reads as a
column-major ``[K, N]`` operand: its fast layout on CPU (about 1.3-1.6x the row-major one here); for a
few rows (:data:`FEW_ROWS`) the product is computed transposed, weight first, about 2x faster again.
On CPUs where oneDNN's int8 matmul is exact (VNNI / AMX: no 16-bit saturation; checked once per process
by :func:`onednn_exact`), :func:`pack` adds oneDNN's prepacked copy of the weight, and for large batches
(:data:`ONEDNN_MIN_ROWS`) one ``onednn::qlinear_pointwise`` call computes the GEMM, the activation zero
point, the rescale and the bias. Its epilogue is given the activation scale folded into the weight
scale (and an activation scale of 1), which makes it ``float(acc) * (sx * w_scale) + bias`` with two
roundings: the same float steps as the ``_int_mm`` path, so both kernels give the same bits.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

# Up to this many GEMM rows (a batch of a few samples), ``_int_mm`` on CPU runs about 2x faster with the
# weight as the left operand (``W @ A^T``, transposed back) than with the activations (``A @ W^T``).
FEW_ROWS = 8
# oneDNN's kernel from this many GEMM rows on; below, ``_int_mm`` on the column-major weight was as fast or
# faster here (FFN shapes 768x3072 and 3072x768, 1 and 2 threads), above it oneDNN is up to ~1.8x faster.
ONEDNN_MIN_ROWS = 128


class Packed(NamedTuple):
    """oneDNN's prepacked int8 weight (an opaque CPU tensor: never saved, copied or moved; rebuilt from
    ``w_int`` by :func:`pack`) and the constant operands of its GEMM call."""

    weight: torch.Tensor
    w_zero: torch.Tensor  # [N] int32 zeros (symmetric weight)
    x_zero: torch.Tensor  # [1] int32 zero (activations without offset)
    one: torch.Tensor  # [1] float32: the activation scale passed to oneDNN (the real one is in w_scale)


class IntWeight(NamedTuple):
    """A weight as the integer GEMM uses it: ``q - zero_point = w_int + w_zero`` per output row."""

    w_int: torch.Tensor  # [N, K] int8 (uint codes shifted by -128 to fit); the GEMM reads w_int.t()
    w_sum: torch.Tensor  # [N] int32, row sums of w_int (for the activation offset term)
    w_zero: torch.Tensor | None  # [N] int32 offset, None when the format has none
    w_scale: torch.Tensor  # [N] float32
    packed: Packed | None = None  # see pack(): CPU with an exact oneDNN, symmetric weights


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
    values) and the integer-valued ``zero_point`` (N or 1 values) of formats that have one (None for
    symmetric formats: then, for signed codes, the operand has no offset, known without reading a value)."""
    n = codes.shape[0]
    q = codes.reshape(n, -1).to(torch.int32)
    shift = 128 if qmax > 127 else 0  # uint8 codes: store q - 128 so they fit in int8
    w0 = None
    if zero_point is not None or shift:
        w0 = torch.full((n,), shift, dtype=torch.int32, device=codes.device)
        if zero_point is not None:
            w0 = w0 - zero_point.reshape(-1).round().to(torch.int32).expand(n)
    w = (q - shift).to(torch.int8)
    w_scale = scale.reshape(-1).float().expand(n).contiguous()
    return IntWeight(w, w.sum(dim=1, dtype=torch.int32), w0, w_scale)


def conv_weight_im2col_order(w: IntWeight, in_channels: int) -> IntWeight:
    """Reorder the columns of a conv weight from (C, kh, kw) to (kh, kw, C), the column order of
    :func:`im2col`."""
    n, k = w.w_int.shape
    w_int = w.w_int.reshape(n, in_channels, k // in_channels).transpose(1, 2).reshape(n, k).contiguous()
    return w._replace(w_int=w_int, packed=None)


@functools.cache
def onednn_exact() -> bool:
    """Whether this process can use oneDNN's int8 matmul, exactly: the op exists, and on a probe with
    extreme codes (which a CPU without VNNI/AMX saturates in 16 bits) at the shapes of its different
    kernels it returns the bits of the ``_int_mm`` path."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")):
        return False
    g = torch.Generator().manual_seed(0)
    try:
        for m, k, n in ((1, 40, 3), (3, 72, 10), (200, 256, 48)):
            codes = torch.randint(-127, 128, (n, k), generator=g)
            codes[:, :8] = 127  # 255 * 127 + 255 * 127 overflows int16 after oneDNN's +128 shift of s8 inputs
            w = int_weight(codes, torch.rand(n, generator=g) + 0.5, None, 127)
            a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
            a[:, :8] = 127
            sx, bias = torch.tensor([0.0123]), torch.randn(n, generator=g)
            for zero_point in (torch.zeros(1), torch.tensor([-5.0])):
                c = act_quant(sx, zero_point, -128, 127, not zero_point.any(), w)
                got = _onednn_gemm(a, c, pack(w, probe=False), bias)
                if not torch.equal(got, int_gemm(a, c, w, bias)):
                    return False
    except RuntimeError:  # a build or CPU whose oneDNN refuses the op
        return False
    return True


def pack(w: IntWeight, probe: bool = True) -> IntWeight:
    """``w`` with oneDNN's prepacked weight added where :func:`onednn_exact` (CPU, symmetric weight);
    otherwise ``w``. Do it once per weight (at load, or when the weight changed): that is the point."""
    usable = w.w_int.device.type == "cpu" and w.w_zero is None and w.w_scale.dtype == torch.float32
    if not usable or (probe and not onednn_exact()):
        return w
    n = w.w_int.shape[0]
    zeros = torch.zeros(n, dtype=torch.int32)
    packed = torch.ops.onednn.qlinear_prepack(w.w_int, None)
    return w._replace(packed=Packed(packed, zeros, zeros[:1], torch.ones(1)))


class ActQuant(NamedTuple):
    """The activation side of one integer GEMM, from the activation's scale and zero point (one value, or
    one per row of the GEMM: ``[M, 1]``) and the weight: what turns ``x`` into int8 codes and the int32
    sums into the output. Static formats compute it once per state (the layers cache it)."""

    inv: torch.Tensor  # 1 / scale: the fake quant's codes are clamp(round(x * inv) + zero_point)
    zero_point: torch.Tensor | None  # None for symmetric formats (zero)
    qmin: int
    qmax: int
    shift: int  # 128 for uint8 codes (A = q - 128 fits in int8), else 0
    a0: torch.Tensor | None  # int32 with A + a0 = q - zero_point; None when zero
    offset: torch.Tensor | None  # a0 * w_sum: what a0 adds to the int32 sums ([N] or [M, N])
    scale: torch.Tensor  # [N]: sx * w_scale for one activation scale, else w_scale
    row_scale: torch.Tensor | None  # [M, 1]: sx of each row (per-token scales), applied first


def act_quant(
    scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, symmetric: bool, w: IntWeight
) -> ActQuant:
    """:class:`ActQuant` for ``scale`` / ``zero_point`` of shape ``[1]`` (one scale) or ``[M, 1]`` (one per
    row) and the weight ``w``. The rescale is ``acc * (sx * w_scale)`` for one scale, ``acc * sx *
    w_scale`` per row. ``a0`` is None for symmetric signed formats, whose offset is zero (known from the
    format: no device sync)."""
    shift = 128 if qmax > 127 else 0
    a0 = None if (symmetric and not shift) else (shift - zero_point).to(torch.int32)
    per_row = scale.dim() == 2
    return ActQuant(
        torch.reciprocal(scale), None if symmetric else zero_point, qmin, qmax, shift, a0,
        None if a0 is None else a0 * w.w_sum, w.w_scale if per_row else scale * w.w_scale,
        scale if per_row else None,
    )  # fmt: skip


def act_codes(x: torch.Tensor, c: ActQuant) -> torch.Tensor:
    """The int8 codes ``A = q - shift`` of ``x`` (``[M, K]``, or any shape for one scale): the codes ``q``
    are the fake quant's. One float temporary, updated in place."""
    q = torch.mul(x, c.inv).round_()
    if c.zero_point is not None:
        q.add_(c.zero_point)
    q.clamp_(c.qmin, c.qmax)
    if c.shift:
        q.sub_(c.shift)
    return q.to(torch.int8)


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a [M, K] int8 @ b [K, N] int8 -> int32`` with ``torch._int_mm``; on CUDA, zero-pads to the shapes
    its kernels need (M > 16, K and N multiples of 8, at least 16), which leaves the product unchanged."""
    if a.device.type != "cuda":
        if a.shape[0] <= FEW_ROWS:  # the weight ([N, K] rows, b.t()) as the left operand: (b^T a^T)^T
            return torch._int_mm(b.t(), a.t().contiguous()).t().contiguous()
        return torch._int_mm(a, b)
    m, k = a.shape
    n = b.shape[1]
    pm, pk, pn = max(17 - m, 0), (-k) % 8 + max(16 - k, 0), (-n) % 8 + max(16 - n, 0)
    if pm or pk:
        a = F.pad(a, (0, pk, 0, pm))
    if pk or pn:
        b = F.pad(b, (0, pn, 0, pk))
    return torch._int_mm(a, b)[:m, :n]


def _onednn_gemm(a: torch.Tensor, c: ActQuant, w: IntWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """:func:`int_gemm` (one activation scale) as one oneDNN call: ``a - x_zero`` with ``x_zero = -a0``."""
    p = w.packed
    assert p is not None
    x_zero = p.x_zero if c.a0 is None else c.a0.neg().reshape(1)
    return torch.ops.onednn.qlinear_pointwise.tensor(
        a, p.one, x_zero, p.weight, c.scale, p.w_zero, bias, 1.0, 0, torch.float32, "none", [], ""
    )


def int_gemm(a: torch.Tensor, c: ActQuant, w: IntWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """``a [M, K] int8`` (``+ a0``) times the weight, exact in int32, then one rescale:
    ``acc * (sx * w_scale) + bias`` as float32 ``[M, N]`` (two roundings, no fused multiply-add: the
    oneDNN kernel's arithmetic)."""
    a = a.contiguous()
    one_scale = c.row_scale is None
    big = a.shape[0] >= ONEDNN_MIN_ROWS and one_scale and (bias is None or bias.dtype == torch.float32)
    if w.packed is not None and big:
        return _onednn_gemm(a, c, w, bias)
    acc = int_mm(a, w.w_int.t())
    if c.offset is not None:
        acc.add_(c.offset)
    if w.w_zero is not None:
        row = a.sum(dim=1, keepdim=True, dtype=torch.int32)
        acc.add_((row if c.a0 is None else row + a.shape[1] * c.a0) * w.w_zero)
    if c.row_scale is None:
        y = torch.mul(acc, c.scale)  # int32 * float32 -> float32: float(acc) * scale
    else:
        y = torch.mul(acc, c.row_scale).mul_(c.scale)
    return y if bias is None else y.add_(bias)


def linear(x: torch.Tensor, c: ActQuant, w: IntWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """A linear layer on ``x [..., K]`` (one GEMM row per token): codes, then :func:`int_gemm`."""
    x2 = x.reshape(-1, x.shape[-1])
    y = int_gemm(act_codes(x2, c), c, w, bias)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def conv(
    x: torch.Tensor, c: ActQuant, w: IntWeight, bias: torch.Tensor | None, kernel_size: tuple[int, ...],
    stride: tuple[int, ...], padding: tuple[int, ...], dilation: tuple[int, ...],
) -> torch.Tensor:  # fmt: skip
    """A Conv1d/Conv2d (groups 1, zero padding, one activation scale) on int8 im2col columns. ``w`` must
    be in :func:`conv_weight_im2col_order`."""
    a = act_codes(x, c)
    one_d = x.dim() == 3
    if one_d:
        a = a.unsqueeze(2)
        kernel_size, stride = (1, *kernel_size), (1, *stride)
        padding, dilation = (0, *padding), (1, *dilation)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    if ph or pw:  # pad with the code of a real 0 (A + a0 = 0), as the float conv pads with 0.0
        a = F.pad(a, (pw, pw, ph, ph), value=0 if c.a0 is None else int(-c.a0.reshape(-1)[0]))
    # im2col on the int8 codes, channels last: [B, Ho, Wo, C, kh, kw] views, then one int8 copy into
    # [B*Ho*Wo, kh*kw*C] whose innermost runs (C codes) are contiguous.
    nhwc = a.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
    patches = nhwc.unfold(1, (kh - 1) * dh + 1, sh)[..., ::dh].unfold(2, (kw - 1) * dw + 1, sw)[..., ::dw]
    b, ho, wo, ch = patches.shape[:4]
    cols = patches.permute(0, 1, 2, 4, 5, 3).reshape(b * ho * wo, kh * kw * ch)
    y = int_gemm(cols, c, w, bias).reshape(b, ho, wo, -1).permute(0, 3, 1, 2)
    return y.squeeze(2) if one_d else y
