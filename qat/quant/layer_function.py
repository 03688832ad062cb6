"""A quantized layer's training step as one autograd Function that keeps int8 codes, not float copies.

Autograd through ``F.linear(fq(x), fq(w))`` keeps the float fake-quant input and weight for the backward
pass (four bytes a value, beside the fake quant's own mask and codes). :class:`QuantOpFunction` runs the
fake quant of both operands (the integer grid of :func:`qat.quant.ste.affine_parts`) and the layer's op
(:data:`OPS`: linear, convolution) as one node that saves the codes (int8/uint8), the clip masks and the
scales, and recomputes the operands from the codes in the backward pass (``(q - z) * s``: the forward's
values bit for bit). An operand with a learned scale (LSQ, LSQ+), whose gradient needs the quantized
tensor itself (the weight; an input its producer mostly keeps anyway), keeps only that tensor: the
backward pass runs its fake quant again (the same function on the same tensors: the same bits).

The op's gradients are the ones autograd computes for it (the same kernels on the same operands, in the
op's own dtype under autocast) and the fake quant's those of :func:`qat.quant.ste.affine_grads`, so
values and gradients are those of the two-step graph, bit for bit.

An operand comes from :func:`operand` (its quantizer called with ``operand=True``) as an :class:`Operand`:
the affine grid's pieces when the quantizer's source fake-quantizes on it, otherwise the tensor itself
(float, or already fake-quantized by its source: then it is saved as it is).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from qat.quant import ste


class Operand(NamedTuple):
    """One input of a layer op: ``tensor`` as the layer holds it and, when its fake quant is deferred to
    the op's Function, the ``scale`` / ``zero_point`` broadcasting on the quantizer's view of it and the
    ``grid`` ``(qmin, qmax, view shape)``; without a grid ``tensor`` is used as it is."""

    tensor: torch.Tensor
    scale: torch.Tensor | None = None
    zero_point: torch.Tensor | None = None
    grid: tuple[int, int, tuple[int, ...]] | None = None

    def value(self) -> torch.Tensor:
        """The fake-quantized tensor (what the op computes on), through autograd's fused fake quant."""
        if self.grid is None:
            return self.tensor
        qmin, qmax, vshape = self.grid
        v = ste.fake_quant_affine(self.tensor.reshape(vshape), self.scale, self.zero_point, qmin, qmax)
        return v.reshape(self.tensor.shape)


def _linear_backward(g, x, w, needs, params):
    """What autograd computes for ``F.linear`` (an ``addmm`` / ``mm`` on the rows of ``x``)."""
    g2 = g.reshape(-1, g.shape[-1])
    gx = g2.mm(w).reshape(x.shape) if needs[0] else None
    gw = g2.t().mm(x.reshape(-1, x.shape[-1])) if needs[1] else None
    gb = g2.sum(0) if needs[2] else None
    return gx, gw, gb


_CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}  # by spatial dimensions: the ops autocast knows


def _conv_forward(x, w, b, params):
    stride, padding, dilation, groups = params
    return _CONVS[len(stride)](x, w, b, stride, padding, dilation, groups)


def _conv_backward(g, x, w, needs, params):
    """What autograd computes for a convolution (its own backward op)."""
    stride, padding, dilation, groups = params
    bias_sizes = [w.shape[0]] if needs[2] else None
    return torch.ops.aten.convolution_backward(
        g, x, w, bias_sizes, stride, padding, dilation, False, [0] * len(stride), groups, list(needs)
    )


# The layer ops: name -> (forward(x, w, bias, params), backward(grad, x, w, needs, params) -> the
# gradients of x, w and the bias where ``needs`` says). ``params`` are the op's constant arguments.
OPS = {
    "linear": (lambda x, w, b, params: F.linear(x, w, b), _linear_backward),
    "conv": (_conv_forward, _conv_backward),
}


def _quantize(t, s, z, grid, learned):
    """(value, saved tensors ``(tensor, mask, codes, view)``) of one operand in the forward pass: the
    tensor itself without a grid; for a learned scale, which needs the quantized tensor's view anyway,
    only that view (the backward pass recomputes the fake quant from it); else the mask and the codes."""
    if grid is None:
        return t, (t, None, None, None)
    qmin, qmax, vshape = grid
    tv = t.reshape(vshape)
    y, clipped, codes = ste.affine_parts(tv, s, z, qmin, qmax, keep_codes=not learned)
    return y.reshape(t.shape), ((None, None, None, tv) if learned else (None, clipped, codes, None))


def _recomputed(saved, s, z, grid, shape, dtype):
    """(operand the op computed on, mask, codes) from what :func:`_quantize` saved."""
    t, clipped, codes, tv = saved
    if grid is None:
        return t, None, None
    if tv is not None:
        y, clipped, codes = ste.affine_parts(tv, s, z, grid[0], grid[1], keep_codes=True)
        return y.reshape(shape), clipped, codes
    return ste.affine_dequant(codes, s, z, dtype).reshape(shape), clipped, codes


class QuantOpFunction(torch.autograd.Function):
    """``OPS[op](fq(x), fq(w), bias)`` keeping codes, masks and scales for the backward pass (see the
    module docstring). Arguments: op name, op params, then per operand (x, then w) tensor, scale, zero
    point, grid (None: the tensor as it is), then the bias."""

    @staticmethod
    def forward(ctx, op, params, x, sx, zx, gridx, w, sw, zw, gridw, bias):
        need = ctx.needs_input_grad
        xq, saved_x = _quantize(x, sx, zx, gridx, need[3] or need[4])
        wq, saved_w = _quantize(w, sw, zw, gridw, need[7] or need[8])
        out = OPS[op][0](xq, wq, bias, params)
        ctx.op, ctx.params, ctx.grids = op, params, (gridx, gridw)
        ctx.shapes, ctx.dtypes = (x.shape, w.shape), (xq.dtype, wq.dtype)
        ctx.save_for_backward(*saved_x, sx, zx, *saved_w, sw, zw)
        return out

    @staticmethod
    def backward(ctx, g):
        saved, need = ctx.saved_tensors, ctx.needs_input_grad
        sides = [(saved[6 * i : 6 * i + 4], saved[6 * i + 4], saved[6 * i + 5]) for i in range(2)]
        parts = [
            _recomputed(kept, s, z, ctx.grids[i], ctx.shapes[i], ctx.dtypes[i])
            for i, (kept, s, z) in enumerate(sides)
        ]
        # The op ran in the output's dtype (autocast casts its operands): so does its backward, and the
        # gradients go back to the operands' dtypes, as through autocast's casts.
        op_needs = (any(need[2:5]), any(need[6:9]), need[10])
        gops = OPS[ctx.op][1](g, *(p[0].to(g.dtype) for p in parts), op_needs, ctx.params)
        grads = [None, None]
        for i, ((kept, s, z), (_, clipped, codes)) in enumerate(zip(sides, parts, strict=True)):
            go, grid = gops[i], ctx.grids[i]
            if go is None or grid is None:
                grads += [None if go is None else go.to(ctx.dtypes[i]), None, None, None]
                continue
            gq = ste.affine_grads(go.to(ctx.dtypes[i]).reshape(grid[2]), clipped, codes, kept[3], s, z,
                                  need[2 + 4 * i : 5 + 4 * i])  # fmt: skip
            grads += [None if gq[0] is None else gq[0].reshape(ctx.shapes[i]), gq[1], gq[2], None]
        return *grads, gops[2]


def operand(fq, t: torch.Tensor) -> Operand:
    """``t`` as an operand of a layer op, fake-quantized by ``fq`` (a FakeQuantizer, or None: float)."""
    return Operand(t) if fq is None else fq(t, operand=True)


def layer_op(op: str, params: tuple, x: Operand, w: Operand, bias: torch.Tensor | None) -> torch.Tensor:
    """``OPS[op]`` on the fake-quantized operands: through :class:`QuantOpFunction` when autograd records
    and an operand's fake quant is deferred to it, else on their values."""
    if torch.is_grad_enabled() and (x.grid is not None or w.grid is not None):
        return QuantOpFunction.apply(op, params, *x, *w, bias)
    return OPS[op][0](x.value(), w.value(), bias, params)
