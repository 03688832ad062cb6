"""Model size at the target bit widths: what a deployment of the quantized model would store.

Quantized weights count ``bits * numel / 8`` plus their scales / zero points (fp32 each); everything
else (biases, norms, float-kept layers, BatchNorm statistics) counts at its float32 size. The exporter
measures the real file; this is the closed-form figure used in ``metrics.json`` and reports.
"""

from __future__ import annotations

import math

from torch import nn

from qat.quant.quantizer import FakeQuantizer


def float_size_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer at float32 (quantizer state excluded)."""
    quant = {id(t) for m in model.modules() if isinstance(m, FakeQuantizer) for t in _tensors(m)}
    seen: set[int] = set()
    total = 0
    for t in _tensors(model):
        if id(t) in quant or id(t) in seen or not t.is_floating_point():
            continue
        seen.add(id(t))
        total += t.numel() * 4
    return total


def quantized_size_bytes(model: nn.Module) -> int:
    """Bytes at the target formats: packed quantized weights + scales, the rest at float32."""
    qweights: dict[int, float] = {}
    for m in model.modules():
        wq = getattr(m, "weight_quant", None)
        if isinstance(wq, FakeQuantizer) and wq._fq_on:
            w = m.weight
            n_scales = math.prod(wq.stat_shape) * (2 if wq.scale_neg is not None else 1)
            zp = 0 if wq.spec.symmetric or wq.spec.kind != "int" else math.prod(wq.stat_shape)
            qweights[id(w)] = math.ceil(w.numel() * wq.spec.bits / 8) + 4 * n_scales + zp
    float_bytes = float_size_bytes(model)
    total = float_bytes
    for m in model.modules():
        wq = getattr(m, "weight_quant", None)
        if isinstance(wq, FakeQuantizer) and id(m.weight) in qweights:
            total += qweights.pop(id(m.weight)) - m.weight.numel() * 4
    return int(total)


def _tensors(module: nn.Module):
    yield from module.parameters()
    yield from module.buffers()
