"""The GGUF target (llama.cpp): ``model.gguf``, written from the native export's trained codes and scales.

Each quantized weight is stored as the block type of its format (:data:`WEIGHT_TYPES`, the weight side of
:data:`qat.config.GGUF_TYPES`), one fp16 scale per block of input features: int8 -> Q8_0 (32 int8 codes
after the scale), int4 -> Q4_0 (32 codes stored ``code + 8``, byte ``j`` holding element ``j`` in its low
nibble and element ``j + 16`` in its high one, after the scale), ternary -> TQ2_0 (256 codes stored
``code + 1`` in 2 bits, the scale last). A per-tensor, per-channel or per-group scale is repeated in every
block it covers; it must be constant inside each block and exactly representable in fp16 (the presets
``quant=gguf_q8_0``, ``gguf_q4_0``, ``gguf_tq2_0`` train such grids, with llama.cpp's own rules). Nothing
is re-quantized: the codes and scales are the trained ones. Other formats (asymmetric, fp8, TTQ's two
scales, other bit widths), SmoothQuant layers and scales that are not fp16 are refused in one line naming
the layer. Float tensors (norms, layers left in float) are written F32: exactly what the fake-quant model
computes with (F16 would round them), and llama.cpp multiplies F32 weights without quantizing activations.

Tensor names come from ``gguf``'s own map for the architecture (:mod:`qat.deploy.gguf_meta` has the
supported architectures, the metadata and the tokenizer); q/k rows get ``convert_hf_to_gguf.py``'s
permutation for ``llama`` (rows reorder; the blocks along each row are untouched, so exactness survives);
``output.weight`` is left out when the head stores the embedding's tensor (tied).

Verification: (a) always, the file read back (``GGUFReader`` + ``gguf.quants.dequantize``) equals the
trained weights bit for bit; (b) given verification batches, transformers loads the file
(``from_pretrained(dir, gguf_file=...)``, dequantized to fp32) and its logits equal the fake-quant model's
with its activation quantizers off (transformers runs float activations; llama.cpp quantizes them itself,
as the presets' activation rule does) within :data:`LOGIT_TOL` of the logit range: one more float model in
memory and one forward pass per batch. Input quantizers are not stored (``inputs_not_stored``).
``requantize_changed`` counts, per block type, the weights llama.cpp's reference quantizer
(``gguf.quants.quantize``) would change if it re-quantized the written weights: 0 when the trained grid is
the format's own. llama.cpp itself runs the file in :mod:`qat.deploy.llamacpp`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qat.calibrate import restored
from qat.config import GGUF_BY_SIDE, GGUF_TYPES
from qat.deploy.codec import QWeight
from qat.deploy.exporter import ExportError
from qat.deploy.gguf_meta import Arch, add_hparams, add_tokenizer, arch_of
from qat.deploy.loader import read_export
from qat.deploy.registry import TARGETS, ExportJob
from qat.deploy.verify import VerificationError, check, compare
from qat.rewrite import quantizers

LOGIT_TOL = 1e-5  # (b): max |logit difference| / logit range, transformers vs the fake-quant model


@dataclasses.dataclass(frozen=True)
class Block:
    """How a GGUF block type stores a block: ``pack`` (codes ``[blocks, size]`` -> code bytes
    ``[blocks, n]``) and whether the block's fp16 scale follows the codes (``scale_last``) or leads them.
    Its size (weights per block, along the input dimension) is ``gguf``'s ``GGML_QUANT_SIZES``."""

    pack: Callable[[np.ndarray], np.ndarray]
    scale_last: bool = False


def _q8_0(q: np.ndarray) -> np.ndarray:
    return q.astype(np.int8).view(np.uint8)


def _q4_0(q: np.ndarray) -> np.ndarray:
    u = (q + 8).astype(np.uint8).reshape(-1, 2, 16)
    return u[:, 0] | (u[:, 1] << 4)


_TQ2_SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)


def _tq2_0(q: np.ndarray) -> np.ndarray:
    """Byte ``32 c + j`` holds elements ``128 c + 32 k + j`` (k = 0..3) in bits ``2 k``."""
    u = (q + 1).astype(np.uint8).reshape(-1, 2, 4, 32) << _TQ2_SHIFTS
    return np.bitwise_or.reduce(u, axis=2).reshape(-1, 64)


BLOCKS = {"Q8_0": Block(_q8_0), "Q4_0": Block(_q4_0), "TQ2_0": Block(_tq2_0, scale_last=True)}
# weight format -> its GGML block type (the weight side of qat.config.GGUF_TYPES: int8, int4, ternary)
WEIGHT_TYPES = {fmt: t for (fmt, _), t in GGUF_TYPES.items() if t in GGUF_BY_SIDE["weight"]}
SUPPORTED = ", ".join(f"{fmt} ({t})" for fmt, t in WEIGHT_TYPES.items()) + ", symmetric, one scale per block"


@dataclasses.dataclass
class Tensor:
    """A tensor of the file: GGUF ``name``, the ``data`` written (block bytes ``[rows, row bytes]`` or
    float32), its ``qtype`` and the float32 ``values`` it must read back as."""

    name: str
    data: np.ndarray
    qtype: str
    values: np.ndarray


def encode(name: str, entry: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Tensor:
    """The trained weight of layer ``name`` (its native export entry) as GGUF blocks."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    qw = QWeight(entry, tensors, name)
    qtype = WEIGHT_TYPES.get(entry["format"])
    if qtype is None or qw.zero_point is not None or qw.scale_neg is not None or len(qw.shape) != 2:
        what = f"{entry['format']} {entry['granularity']}{'' if entry['symmetric'] else ' asymmetric'}"
        raise ExportError(f"{name}: weight format {what} has no GGUF block type; allowed: {SUPPORTED}")
    size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]][0]
    rows, cols = qw.shape
    if cols % size:
        raise ExportError(f"{name}: {cols} input features are not a multiple of {qtype}'s block of {size}; "
                          f"allowed: a multiple of {size}")  # fmt: skip
    full = (qw.granularity.view(torch.zeros(qw.shape)) + qw.scale).reshape(rows, cols // size, size)
    if not (full == full[..., :1]).all():
        raise ExportError(f"{name}: the {entry['granularity']} scale changes inside {qtype}'s blocks of "
                          f"{size}; allowed: per_tensor, per_channel, per_group of a multiple of "
                          f"{size}")  # fmt: skip
    d = full[..., 0].numpy()
    d16 = d.astype(np.float16)
    bad = d16.astype(np.float32) != d
    if bad.any():
        raise ExportError(f"{name}: weight scale {float(d[bad][0])!r} is not exactly representable in fp16, "
                          f"so the grid is not {qtype}'s; allowed: fp16 scales (quant=gguf_"
                          f"{qtype.lower()})")  # fmt: skip
    block = BLOCKS[qtype]
    codes = block.pack(qw.q.numpy().reshape(-1, size))
    scales = d16.reshape(-1, 1).view(np.uint8)
    data = np.concatenate((codes, scales) if block.scale_last else (scales, codes), axis=1)
    return Tensor(name, data.reshape(rows, -1), qtype, qw.dequantize().numpy())


def permute(a: np.ndarray, heads: int) -> np.ndarray:
    """``convert_hf_to_gguf.py``'s q/k row order for ``llama``: in each head, row ``i`` of the first half
    and row ``i`` of the second half become neighbours (rows only; works on block bytes too)."""
    return a.reshape(heads, 2, a.shape[0] // heads // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)


def gguf_tensors(cfg: dict[str, Any], tensors: dict[str, torch.Tensor], model: nn.Module, arch: Arch
                 ) -> list[Tensor]:  # fmt: skip
    """Every tensor of the file, from the native export (``quant_config.json`` ``cfg`` and its tensors)."""
    import gguf

    c = model.config  # type: ignore[union-attr]
    names = gguf.get_tensor_name_map(
        next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch.name), c.num_hidden_layers
    )
    for layer, e in cfg["layers"].items():
        if (e.get("input") or {}).get("smooth") is not None:
            raise ExportError(f"{layer}: a SmoothQuant layer has no GGUF form (its input scaling is not "
                              "stored); allowed: layers without smooth")  # fmt: skip
    quant = {f"{n}.weight": (n, e["weight"]) for n, e in cfg["layers"].items() if e.get("weight")}
    source = {k: k for k in cfg["float_tensors"]} | dict(cfg["aliases"])  # HF key -> stored tensor
    source |= {k: e["codes"]["tensor"] for k, (_, e) in quant.items()}
    keys = {}
    for key in source:
        gname = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise ExportError(f"{key}: llama.cpp's {arch.name} has no tensor for it")
        keys[gname] = key
    if "output.weight" in keys and source[keys["output.weight"]] == source[keys.get("token_embd.weight", "")]:
        del keys["output.weight"]  # tied: llama.cpp uses token_embd for the head
    heads = {"attn_q": c.num_attention_heads, "attn_k": getattr(c, "num_key_value_heads", None)}
    out = []
    for gname, key in keys.items():
        if key in quant:
            t = encode(quant[key][0], quant[key][1], tensors)
            t.name = gname
        else:
            values = tensors[source[key]].float().numpy()
            t = Tensor(gname, values, "F32", values)
        kind = gname.split(".")[-2]
        if arch.permute_qk and kind in heads:
            n = heads[kind] or c.num_attention_heads
            t.data, t.values = permute(t.data, n), permute(t.values, n)
        out.append(t)
    return out


def write_file(path: Path, model: nn.Module, arch: Arch, items: list[Tensor], tokenizer: Any) -> str:
    """Write ``model.gguf``: metadata, tokenizer and tensors; returns the tokenizer model written."""
    import gguf

    size = {q: sum(t.values.size for t in items if t.qtype == q) for q in {t.qtype for t in items} - {"F32"}}
    main = max(size, key=size.get, default=None)  # type: ignore[arg-type]
    writer = gguf.GGUFWriter(path, arch.name)
    config = model.config  # type: ignore[union-attr]
    add_hparams(writer, config, Path(config.name_or_path).name or type(model).__name__)
    writer.add_file_type(gguf.LlamaFileType[f"MOSTLY_{main}"] if main else gguf.LlamaFileType.ALL_F32)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    kind = add_tokenizer(writer, tokenizer, config)
    for t in items:
        raw = None if t.qtype == "F32" else gguf.GGMLQuantizationType[t.qtype]
        writer.add_tensor(t.name, np.ascontiguousarray(t.data), raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return kind


def read_back(path: Path, items: list[Tensor]) -> dict[str, Any]:
    """Check (a): the file's tensors dequantize to the trained values bit for bit; the requantization
    figures. Raises :class:`VerificationError` otherwise."""
    from gguf import GGUFReader
    from gguf.quants import dequantize, quantize

    got = {t.name: t for t in GGUFReader(path).tensors}
    if set(got) != {t.name for t in items}:
        raise VerificationError(
            f"{path.name}: holds tensors {sorted(got)}, expected {[t.name for t in items]}"
        )
    types: dict[str, int] = {}
    changed: dict[str, int] = {}
    for t in items:
        r = got[t.name]
        back = dequantize(r.data, r.tensor_type).reshape(t.values.shape)
        if r.tensor_type.name != t.qtype or not np.array_equal(back, t.values):
            raise VerificationError(f"{path.name}: {t.name} ({r.tensor_type.name}) does not read back as the "
                                    "trained weights")  # fmt: skip
        types[t.qtype] = types.get(t.qtype, 0) + 1
        if t.qtype != "F32":
            again = dequantize(quantize(t.values, r.tensor_type), r.tensor_type).reshape(t.values.shape)
            changed[t.qtype] = changed.get(t.qtype, 0) + int((again != t.values).sum())
    return {"tensor_types": types, "weights_bit_exact": True, "requantize_changed": changed}


@contextlib.contextmanager
def float_activations(model: nn.Module) -> Iterator[None]:
    """``model`` with its activation quantizers off (what a dequantized GGUF model computes), restored."""
    with restored(model):
        for _, fq in quantizers(model):
            if fq.role == "activation":
                fq.enable_fake_quant(False)
        yield


def check_transformers(job: ExportJob, path: Path) -> dict[str, Any]:
    """Check (b): transformers' GGUF loader gives the fake-quant model's logits (activations in float)."""
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    with float_activations(job.reference):
        figures = compare(job.reference, loaded, job.batches or [], task=job.task, forward=job.forward)
    fails = check(figures, None, logit_tol=LOGIT_TOL)
    if fails:
        raise VerificationError(f"{path.name} loaded by transformers: " + "; ".join(fails))
    return {f"transformers_{k}": v for k, v in figures.items()}


def write(job: ExportJob) -> dict[str, Any]:
    """The GGUF target of an export (:data:`qat.deploy.registry.TARGETS`): ``model.gguf`` in the export
    directory, read back and checked (transformers too, given verification batches)."""
    t0 = time.time()
    arch = arch_of(job.reference)
    cfg, tensors, _ = read_export(job.directory)
    items = gguf_tensors(cfg, tensors, job.reference, arch)
    path = job.directory / TARGETS["gguf"].file
    kind = write_file(path, job.reference, arch, items, job.tokenizer)
    figures: dict[str, Any] = {"path": path.name, "bytes": path.stat().st_size, "architecture": arch.name,
                               "tokenizer": kind, **read_back(path, items)}  # fmt: skip
    figures["inputs_not_stored"] = sum(1 for e in cfg["layers"].values() if e.get("input"))
    if job.batches:
        figures.update(check_transformers(job, path))
    figures["export_s"] = round(time.time() - t0, 2)
    return figures


__all__ = ["BLOCKS", "LOGIT_TOL", "encode", "gguf_tensors", "permute", "read_back", "write"]
