"""Model size: one definition, the bytes of the tensors a model is stored as.

* **Quantized size**: the tensor payload of the export (``model.safetensors`` without its header), known
  from the model alone: packed weight codes, weight scales / zero points, static activation scales / zero
  points and SmoothQuant factors, and every other tensor of the model at its own dtype (biases, norms,
  BatchNorm statistics, float-kept layers; a tied tensor once). The exporter stores exactly this: it checks
  every layer it writes against :func:`weight_bytes` / :func:`input_bytes` and takes its float tensors from
  :func:`stored_tensors`, so this figure and the export's payload agree byte for byte.
* **Float size**: the same definition applied to the float model (its tensors at their dtype, tied once;
  the state that ``prepare`` adds, fake quantizers and SmoothQuant factors, is not part of it).
* **File size**: bytes on disk (the payload plus the safetensors header); always reported as "file".

``metrics.json`` (``size_bytes``), the export report, ``qat-eval`` and ``qat-report`` all show these.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator

import torch
from torch import nn

from qat.deploy.codec import qparam_shape
from qat.deploy.packing import packed_numel
from qat.quant.quantizer import FakeQuantizer
from qat.quant.smooth import Smoother

SCALE_BYTES = 4  # scales are stored as float32
ZERO_POINT_BYTES = 1  # zero points as int8 / uint8
BYTE_CLASSES = ("codes", "qparams", "float")


def weight_bytes(fq: FakeQuantizer, count: int) -> dict[str, int]:
    """Stored bytes of a weight of ``count`` values quantized by ``fq``: ``{"codes": ..., "qparams": ...}``.

    Codes are packed in 1/2/4/8-bit containers (:func:`qat.deploy.packing.packed_numel`); fp8 codes take a
    byte each. Each scale group stores a float32 scale, a zero point for asymmetric int formats and a
    float32 negative scale for TTQ.
    """
    spec = fq.spec
    groups = math.prod(qparam_shape(fq))
    qparams = SCALE_BYTES * groups
    if spec.kind == "int" and not spec.symmetric:
        qparams += ZERO_POINT_BYTES * groups
    if fq.scale_neg is not None:
        qparams += SCALE_BYTES * groups
    return {"codes": packed_numel(count, int(spec.bits)), "qparams": qparams}


def input_bytes(fq: FakeQuantizer) -> int:
    """Stored bytes of an activation quantizer: none when dynamic, else its scales (+ zero points)."""
    if fq.spec.dynamic:
        return 0
    scale, zero_point, scale_neg = fq.effective_qparams()  # what the quantizer holds (none: a rule)
    asym_int = fq.spec.kind == "int" and not fq.spec.symmetric
    per_group = SCALE_BYTES * ((scale is not None) + (scale_neg is not None))
    return math.prod(fq.stat_shape) * (per_group + ZERO_POINT_BYTES * (zero_point is not None and asym_int))


def smooth_bytes(mod: nn.Module) -> int:
    """Stored bytes of a layer's SmoothQuant factors (float32, one per input channel)."""
    smooth = getattr(mod, "smooth", None)
    return 0 if smooth is None else SCALE_BYTES * smooth.scale.numel()


def weight_key(mod: nn.Module, fq: FakeQuantizer) -> tuple[int, str]:
    """Identity of a stored quantized weight: a tied weight with the same spec is stored once."""
    return id(mod.weight), json.dumps(fq.spec.to_dict(), sort_keys=True)


def _active(fq: object) -> FakeQuantizer | None:
    return fq if isinstance(fq, FakeQuantizer) and fq.fake_quant_on else None


Layer = tuple[str, nn.Module, FakeQuantizer | None, FakeQuantizer | None]


def quant_layers(model: nn.Module) -> Iterator[Layer]:
    """Every quantized layer as ``(name, module, weight quantizer, input quantizer)``, a quantizer None
    when it is off (both None: the layer is stored as a float layer)."""
    for name, mod in model.named_modules():
        if isinstance(mod, FakeQuantizer) or not hasattr(mod, "weight_quant"):
            continue
        yield name, mod, _active(mod.weight_quant), _active(getattr(mod, "input_quant", None))


def standalone_quantizers(model: nn.Module) -> Iterator[tuple[str, FakeQuantizer]]:
    """Active fake quantizers that belong to no quantized layer (attention inputs)."""
    layers = [m for m in model.modules() if hasattr(m, "weight_quant")]
    owned = {id(getattr(m, q, None)) for m in layers for q in ("weight_quant", "input_quant")}
    for name, mod in model.named_modules():
        if isinstance(mod, FakeQuantizer) and id(mod) not in owned and mod.fake_quant_on:
            yield name, mod


def stored_tensors(
    model: nn.Module, skip: set[str] | frozenset[str] = frozenset()
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model's own tensors as stored: ``({name: tensor}, {alias: stored name})``.

    State-dict entries minus ``skip`` and minus what ``prepare`` added (fake quantizers, SmoothQuant
    factors); a tensor reachable under several names (tied weights) is stored once, the other names are
    aliases of it.
    """
    added = tuple(  # every name of a shared module too (a tied head shares its embedding's quantizer)
        f"{n}."
        for n, m in model.named_modules(remove_duplicate=False)
        if isinstance(m, (FakeQuantizer, Smoother))
    )
    stored: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for k, v in model.state_dict(keep_vars=True).items():
        if k.startswith(added) or k in skip:
            continue
        ident = (
            v.untyped_storage().data_ptr(),
            v.storage_offset(),
            tuple(v.shape),
            tuple(v.stride()),
            v.dtype,
        )
        if ident in seen:
            aliases[k] = seen[ident]
            continue
        seen[ident] = k
        stored[k] = v
    return stored, aliases


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def export_bytes(model: nn.Module) -> dict[str, int]:
    """What the export of ``model`` stores, by class: ``{"codes", "qparams", "float"}`` in bytes."""
    from qat.deploy.registry import encoded  # the model as export encodes it (conv+BN pairs folded)

    src = encoded(model)
    total = dict.fromkeys(BYTE_CLASSES, 0)
    quantized: set[str] = set()
    stored_weights: set[tuple[int, str]] = set()
    for name, mod, wq, iq in quant_layers(src):
        if wq is not None:
            quantized.add(f"{name}.weight")
            if weight_key(mod, wq) not in stored_weights:  # a tied weight is stored once
                stored_weights.add(weight_key(mod, wq))
                for cls, n in weight_bytes(wq, mod.weight.numel()).items():
                    total[cls] += n
        if iq is not None:
            total["qparams"] += input_bytes(iq)
        if wq is not None or iq is not None:
            total["qparams"] += smooth_bytes(mod)
    for _, fq in standalone_quantizers(src):
        total["qparams"] += input_bytes(fq)
    total["float"] = sum(_nbytes(t) for t in stored_tensors(src, quantized)[0].values())
    return total


def quantized_size_bytes(model: nn.Module) -> int:
    """Bytes of the exported model's tensors (the export's payload; see the module docstring)."""
    return sum(export_bytes(model).values())


def float_size_bytes(model: nn.Module) -> int:
    """Bytes of the float model's tensors as stored (for a prepared model: the model it was prepared from)."""
    return sum(_nbytes(t) for t in stored_tensors(model)[0].values())


def safetensors_payload_bytes(path: str | os.PathLike) -> int:
    """Tensor bytes of a ``.safetensors`` file: the file minus its 8-byte length and JSON header."""
    with open(path, "rb") as f:
        (header,) = struct.unpack("<Q", f.read(8))
    return os.path.getsize(path) - 8 - header
