"""Export a prepared (fake-quant) model to integer weights: ``model.safetensors`` + ``quant_config.json``.

Codes always come from ``weight_quant.quantize(weight)`` in eval mode (never from stale buffers), so the
export equals what the fake-quant forward computes now. The directory is written to a temporary sibling
and renamed into place only after verification passes, so a failure never leaves a partial export.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from torch import nn

from qat.calibrate import batch_inputs
from qat.deploy import schema
from qat.deploy.loader import load_quantized
from qat.deploy.packing import container_bits, pack
from qat.deploy.runtime import FP8_TORCH, ST_DTYPES, QWeight, effective_scale
from qat.deploy.verify import Forward, VerificationError, check, compare, default_forward
from qat.io import default_mode
from qat.quant.modules import QUANT_MODULES, effective_weight
from qat.quant.quantizer import FakeQuantizer
from qat.rewrite import unprepare
from qat.size import (
    float_size_bytes,
    input_bytes,
    quant_layers,
    smooth_bytes,
    standalone_quantizers,
    stored_tensors,
    weight_bytes,
    weight_key,
    weight_qparam_shape,
)

OPS_BY_TYPE = {nn.Linear: "linear", nn.Conv1d: "conv1d", nn.Conv2d: "conv2d", nn.Embedding: "embedding"}
FORMATS = ("safetensors", "onnx")


class ExportError(RuntimeError):
    """The model cannot be exported as it is (nothing quantized, an uninitialised learned scale, ...), or
    not to ``out_dir`` (a parent that is a file, no permission to write, a full disk)."""


@dataclasses.dataclass
class ExportReport:
    """What an export wrote and how it checked out; saved as ``export_report.json``.

    ``exported_bytes`` is the tensor payload of ``model.safetensors``: the model's quantized size as
    :mod:`qat.size` defines it (``file_bytes``: the file on disk, with its JSON header). ``float_bytes`` is
    the float model's size by the same definition. ``budget_bytes`` = Σ storage bits × params / 8 +
    scale/zero-point bytes + float-kept bytes, where storage bits are the container widths 1/2/4/8
    (``nominal_budget_bytes`` uses the format bits).
    """

    out_dir: str
    formats: list[str]
    float_bytes: int
    exported_bytes: int
    file_bytes: int
    ratio: float
    budget_bytes: float
    nominal_budget_bytes: float
    budget_ok: bool
    breakdown: dict[str, int]
    layers: list[dict[str, Any]]
    verification: dict[str, Any] | None = None
    onnx: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        lines = [
            f"export {self.out_dir} ({', '.join(self.formats)})",
            f"  float {self.float_bytes:,} B -> exported {self.exported_bytes:,} B "
            f"({self.ratio:.2f}x smaller; file {self.file_bytes:,} B with header)",
            f"  budget {self.budget_bytes:,.0f} B x1.02 -> {'ok' if self.budget_ok else 'EXCEEDED'}",
        ]
        v = self.verification
        if v:
            lines.append(
                f"  verification: top-1 agreement {100 * v['top1_agreement']:.2f}%, "
                f"max |logit diff| {v['max_abs_logit_diff']:.3g} ({v['max_rel_logit_diff']:.2e} of range)"
            )
            if "max_rel_logit_diff_best" in v:
                lines.append(
                    f"  vs float fake-quant forward {v['max_rel_logit_diff_float']:.2e}; per-sample "
                    f"closer of the two: top-1 {100 * v['top1_agreement_best']:.2f}%, "
                    f"{v['max_rel_logit_diff_best']:.2e}"
                )
            if "perplexity_reference" in v:
                lines.append(f"  perplexity {v['perplexity_reference']:.4f} (fake quant) vs "
                             f"{v['perplexity_exported']:.4f} (exported)")  # fmt: skip
        if self.onnx:
            lines.append(
                f"  onnx: max |logit diff| {self.onnx['max_abs_logit_diff']:.3g}, "
                f"top-1 agreement {100 * self.onnx['top1_agreement']:.2f}%"
            )
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- encoding
def _spec_fields(fq: FakeQuantizer) -> dict[str, Any]:
    spec = fq.spec
    bits = spec.bits
    return {
        "format": spec.format,
        "kind": spec.kind,
        "bits": int(bits) if float(bits).is_integer() else bits,
        "signed": spec.signed,
        "symmetric": spec.symmetric,
        "granularity": spec.granularity,
        "group_size": spec.group_size,
        "scale_source": spec.scale,
        "qmin": int(fq.qmin),
        "qmax": int(fq.qmax),
    }


DEQUANT = {
    "int": "(q - zero_point) * scale",
    "binary": "q * scale, q in {-1, +1}",
    "ternary": "q * scale for q = +1, q * scale_neg (or scale) for q = -1, 0 for q = 0",
    "fp8": "float(q) * scale",
}


class _Collector:
    """Accumulates tensors, their byte classes (codes / qparams / float) and the JSON entries."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.bytes = {"codes": 0, "qparams": 0, "float": 0}
        self.budget = 0.0
        self.nominal = 0.0

    def add(self, name: str, t: torch.Tensor, cls: str) -> dict[str, Any]:
        if name in self.tensors:
            raise ExportError(
                f"tensor name {name!r} is used twice (a float tensor clashes with a quantized one)"
            )
        t = t.detach().contiguous().cpu().clone()
        self.tensors[name] = t
        nbytes = t.numel() * t.element_size()
        self.bytes[cls] += nbytes
        if cls != "codes":
            self.budget += nbytes
            self.nominal += nbytes
        return {"tensor": name, "shape": list(t.shape)}

    def expect(self, what: str, before: dict[str, int], counted: dict[str, int]) -> None:
        """The bytes stored since ``before`` are what :mod:`qat.size` counts (one size definition)."""
        stored = {c: n - before[c] for c, n in self.bytes.items()}
        if stored != {c: counted.get(c, 0) for c in self.bytes}:
            raise ExportError(f"{what}: stored {stored} bytes but qat.size counts {counted} (a bug)")


def _encode_weight(
    name: str, mod: nn.Module, fq: FakeQuantizer, col: _Collector
) -> tuple[dict, torch.Tensor]:
    """Weight entry + the fake-quant weight it must reproduce (for the exactness check)."""
    spec = fq.spec
    before = dict(col.bytes)
    # The tensor the weight quantizer sees: W * s for SmoothQuant layers (their input entry carries s).
    w = effective_weight(mod).detach()
    with torch.no_grad():
        ref = fq(w)  # initialises a never-run learned scale exactly as training would
        codes, s, z = fq.quantize(w)
    shape = [int(d) for d in w.shape]
    compact = weight_qparam_shape(fq)
    e = _spec_fields(fq)
    e.update(
        shape=shape,
        axis=int(spec.axis) if spec.granularity == "per_channel" else 0,
        dequant=DEQUANT[spec.kind],
    )
    count = w.numel()
    base = f"{name}.weight"
    codes_meta: dict[str, Any] = {"count": count, "order": "C, least significant bits first"}
    if spec.kind == "fp8":
        f8 = codes.reshape(shape).to(FP8_TORCH[spec.format])
        codes_meta.update(col.add(f"{base}.codes", f8, "codes"))
        codes_meta.update(dtype=str(f8.dtype).replace("torch.", ""), container_bits=8, packed=False, offset=0)
        storage_bits = 8
    else:
        q = (
            codes.to(torch.int16) if spec.signed else codes.to(torch.uint8).to(torch.int16)
        )  # uint8 codes wrap in int8
        if spec.kind == "binary":
            bits, offset, q = 1, 0, (q > 0).to(torch.int16)
        elif spec.kind == "ternary":
            bits, offset = 2, -1
        else:
            bits, offset = int(spec.bits), int(fq.qmin)
        storage_bits = container_bits(bits)
        if storage_bits == 8:
            dt = torch.int8 if spec.signed else torch.uint8
            codes_meta.update(col.add(f"{base}.codes", q.reshape(shape).to(dt), "codes"))
            codes_meta.update(dtype=str(dt).replace("torch.", ""), container_bits=8, packed=False, offset=0)
        else:
            codes_meta.update(col.add(f"{base}.codes", pack(q, bits, offset), "codes"))
            codes_meta.update(dtype="uint8", container_bits=storage_bits, packed=True, offset=offset)
    codes_meta.pop("shape")
    e["codes"] = codes_meta
    col.budget += storage_bits * count / 8
    col.nominal += float(spec.bits) * count / 8
    e["scale"] = col.add(f"{base}.scale", s.reshape(compact).float(), "qparams")
    e["zero_point"] = None
    if spec.kind == "int" and not spec.symmetric:
        zdt = torch.int8 if spec.signed else torch.uint8
        e["zero_point"] = col.add(f"{base}.zero_point", z.reshape(compact).round().to(zdt), "qparams")
    e["scale_neg"] = None
    if fq.scale_neg is not None:  # TTQ: the negative scale as the forward pass computes it
        with torch.no_grad():
            sn = fq._bcast(fq._learned_scale(w, fq.scale_neg), w)
        e["scale_neg"] = col.add(f"{base}.scale_neg", sn.reshape(compact).float(), "qparams")
    col.expect(base, before, weight_bytes(fq, w.numel()))
    return e, ref


def _encode_act(name: str, fq: FakeQuantizer, col: _Collector) -> dict[str, Any]:
    spec = fq.spec
    e = _spec_fields(fq)
    e.update(dynamic=spec.dynamic, channel_axis=int(fq.act_axis), dequant=DEQUANT[spec.kind])
    e["scale"] = e["zero_point"] = e["scale_neg"] = None
    if spec.dynamic:
        return e
    if fq.learned and not fq._initialized:
        raise ExportError(
            f"{name}: the learned activation scale was never initialised (calibrate or train the model first)"
        )
    base = f"{name}.input"
    compact = list(fq.stat_shape)
    before = dict(col.bytes)
    if fq.learned:
        e["scale"] = col.add(f"{base}.scale", effective_scale(fq.scale).reshape(compact), "qparams")
        if isinstance(fq.zero_point, nn.Parameter):
            z = torch.clamp(torch.round(fq.zero_point.detach()), fq.qmin, fq.qmax)
            zdt = torch.int8 if spec.signed else torch.uint8
            e["zero_point"] = col.add(f"{base}.zero_point", z.reshape(compact).to(zdt), "qparams")
        if fq.scale_neg is not None:
            e["scale_neg"] = col.add(
                f"{base}.scale_neg", effective_scale(fq.scale_neg).reshape(compact), "qparams"
            )
    elif fq.scale is not None:  # observer scales
        e["scale"] = col.add(f"{base}.scale", fq.scale.detach().float().reshape(compact), "qparams")
        if spec.kind == "int" and not spec.symmetric:
            zdt = torch.int8 if spec.signed else torch.uint8
            e["zero_point"] = col.add(
                f"{base}.zero_point", fq.zero_point.reshape(compact).round().to(zdt), "qparams"
            )
    col.expect(base, before, {"qparams": input_bytes(fq)})
    return e


def _float_type(mod: nn.Module) -> type[nn.Module]:
    for ftype, qtype in QUANT_MODULES.items():
        if qtype is type(mod):
            return ftype
    return type(mod.to_float()) if hasattr(mod, "to_float") else type(mod)  # type: ignore[operator]


def collect(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any], _Collector, list[dict]]:
    """Build the tensors and ``quant_config.json`` content of ``model`` (a prepared model, in eval mode)."""
    col = _Collector()
    layers: dict[str, Any] = {}
    summary: list[dict[str, Any]] = []
    exact: dict[str, float] = {}
    quantized_weight_keys: set[str] = set()
    tied: dict[tuple, dict[str, Any]] = {}
    smoothed = False
    for name, mod, wq, iq in quant_layers(model):
        if wq is None and iq is None:
            continue  # every quantizer disabled: a plain float layer
        ftype = _float_type(mod)
        layer: dict[str, Any] = {"module": ftype.__name__, "op": OPS_BY_TYPE.get(ftype, "generic")}
        if wq is not None:
            key = weight_key(mod, wq)
            entry, ref = _encode_weight(name, mod, wq, col) if key not in tied else (None, None)
            if entry is None:  # a tied weight with the same spec: point at the tensors already stored
                entry = tied[key]
            else:
                tied[key] = entry
                deq = QWeight(entry, col.tensors, name).dequantize()
                exact[name] = float((deq - ref.float()).abs().max()) if ref is not None else 0.0
            layer["weight"], layer["weight_float"] = entry, None
            quantized_weight_keys.add(f"{name}.weight")
        else:
            layer["weight"], layer["weight_float"] = None, f"{name}.weight"
        bias = getattr(mod, "bias", None)
        layer["bias"] = f"{name}.bias" if isinstance(bias, torch.Tensor) else None
        layer["input"] = _encode_act(name, iq, col) if iq is not None else None
        smooth = getattr(mod, "smooth", None)
        if smooth is not None and (wq is None or iq is None):
            raise ExportError(
                f"{name}: a SmoothQuant layer needs both its weight and input quantizers on (or both off) "
                "to be exported; enable_fake_quant() on both"
            )
        if smooth is not None:
            if layer["op"] != "linear":
                raise ExportError(f"{name}: SmoothQuant factors are only exported for linear layers")
            before = dict(col.bytes)
            layer["input"]["smooth"] = col.add(f"{name}.input.smooth", smooth.scale.float(), "qparams")
            col.expect(f"{name}.input.smooth", before, {"qparams": smooth_bytes(mod)})
            smoothed = True
        layers[name] = layer
        summary.append(
            {
                "name": name,
                "module": layer["module"],
                "weight": wq.spec.describe() if wq else "float",
                "input": iq.spec.describe() if iq else "float",
            }
        )
    for name, fq in standalone_quantizers(model):
        if fq.role != "activation":
            raise ExportError(f"{name}: a standalone weight quantizer is not supported by the exporter")
        layers[name] = {
            "module": "FakeQuantizer",
            "op": "activation",
            "weight": None,
            "weight_float": None,
            "bias": None,
            "input": _encode_act(name, fq, col),
        }
        summary.append({"name": name, "module": "attention", "weight": "-", "input": fq.spec.describe()})
    if not layers:
        raise ExportError(
            "the model has no active quantizer; call qat.prepare(model, config) before exporting"
        )

    # Float state: the model's own tensors but the quantized weights, tied tensors stored once.
    stored, aliases = stored_tensors(model, quantized_weight_keys)
    float_tensors: dict[str, Any] = {}
    st_dtypes = {val: key for key, val in ST_DTYPES.items()}
    for k, v in stored.items():
        ref = col.add(k, v, "float")
        float_tensors[k] = {"dtype": st_dtypes.get(v.dtype), "shape": ref["shape"]}
    # A layer's bias may be tied to another tensor (BERT's MLM decoder bias): point at the stored one.
    for layer in layers.values():
        for key in ("bias", "weight_float"):
            if layer.get(key) in aliases:
                layer[key] = aliases[layer[key]]
    cfg = {
        "schema": schema.SCHEMA_NAME,
        # The oldest version that describes this export, so older readers load what they can.
        "schema_version": schema.SCHEMA_VERSION if smoothed else 1,
        "producer": {
            "name": "qatkit",
            "version": _version(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "files": {"weights": {"path": schema.WEIGHTS_FILE}},
        "quant_config": _quant_config_dict(model),
        "layers": layers,
        "float_tensors": float_tensors,
        "aliases": aliases,
    }
    col.weight_exact = exact  # type: ignore[attr-defined]
    return col.tensors, cfg, col, summary


def _version() -> str:
    from qat import __version__

    return __version__


def _quant_config_dict(model: nn.Module) -> dict[str, Any] | None:
    cfg = getattr(model, "qat_config", None)
    return cfg.to_dict() if hasattr(cfg, "to_dict") else None


# ----------------------------------------------------------------------------------------------- writing
def _commit(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing export is moved aside first and deleted only afterwards."""
    if not out.exists():
        os.replace(tmp, out)
        return
    if not out.is_dir():
        raise ExportError(f"{out}: exists and is not a directory")
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old)  # renaming onto an empty directory is allowed on POSIX
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _write_error(out: Path, e: OSError) -> ExportError:
    """A failed write, reported for the user's ``out`` (never the temporary sibling directory the export is
    written to first, whose name means nothing to them)."""
    blocker = next((p for p in reversed(out.parents) if p.exists() and not p.is_dir()), None)
    why = f"{blocker} is a file, not a directory" if blocker else (e.strerror or str(e))
    return ExportError(
        f"{out}: cannot write the export there ({why}); allowed: a path in a writable directory"
    )


def _write_weights(path: Path, tensors: dict[str, torch.Tensor], cfg: dict[str, Any]) -> dict[str, Any]:
    metadata = {
        "format": "qatkit",
        "schema_version": str(cfg["schema_version"]),
        "config_sha256": schema.config_digest(cfg),  # ties the two files together (see config_digest)
    }
    data = save(tensors, metadata=metadata)
    path.write_bytes(data)  # a plain write: the file gets the umask's mode (save_file makes it 0600)
    return {"path": path.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def export(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    batches: Iterable[Any] | None = None,
    task: str | None = None,
    forward: Forward = default_forward,
    formats: Sequence[str] | str = ("safetensors",),
    verify: bool = True,
    max_batches: int | None = None,
    example_input: Any = None,
    overwrite: bool = True,
) -> ExportReport:
    """Export a prepared model to ``out_dir`` and return the report (also saved as ``export_report.json``).

    ``batches``: validation batches (``(inputs, targets)`` tuples) for verification; without them the
    export is written unverified. ``task``: "classification" or "lm" (selects the verification criteria).
    ``forward(model, batch)`` gives the logits. ``formats``: "safetensors" (always written) and/or "onnx"
    (a QDQ ``model.onnx`` checked in onnxruntime; needs ``batches`` or ``example_input``).
    Raises :class:`VerificationError` (and writes nothing) when the reloaded model does not match.
    """
    formats = [formats] if isinstance(formats, str) else list(formats)
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ValueError(f"format: {bad[0]!r} is not valid; allowed: {', '.join(FORMATS)}")
    if "safetensors" not in formats:
        formats.insert(0, "safetensors")
    out = Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists (pass overwrite=True to replace it)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise _write_error(out, e) from e
    batch_list = list(islice(batches, max_batches)) if batches is not None else None
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        src, folded = _deployable(model)
        tensors, cfg, col, summary = collect(src)
        for name, bn_name in folded.items():
            cfg["layers"][name]["folded_bn"] = bn_name
        cfg["files"]["weights"] = _write_weights(tmp / schema.WEIGHTS_FILE, tensors, cfg)
        _write_json(tmp / schema.CONFIG_FILE, cfg)
        payload = sum(col.bytes.values())
        report = ExportReport(
            out_dir=str(out),
            formats=formats,
            float_bytes=float_size_bytes(model),
            exported_bytes=payload,
            file_bytes=cfg["files"]["weights"]["bytes"],
            ratio=float_size_bytes(model) / max(payload, 1),
            budget_bytes=col.budget,
            nominal_budget_bytes=col.nominal,
            budget_ok=payload <= 1.02 * col.budget,
            breakdown={
                "codes": col.bytes["codes"],
                "scales_zero_points": col.bytes["qparams"],
                "float_kept": col.bytes["float"],
            },
            layers=summary,
        )
        worst = max(col.weight_exact.values(), default=0.0)  # type: ignore[attr-defined]
        if worst != 0.0:
            bad_layer = max(col.weight_exact, key=col.weight_exact.get)  # type: ignore[attr-defined]
            raise VerificationError(
                f"{bad_layer}: stored weight differs from the fake-quant weight by {worst:.3g}"
            )
        if verify and batch_list:
            runtime = load_quantized(tmp, unprepare(copy.deepcopy(src)))
            figures = compare(model, runtime, batch_list, task=task, forward=forward)
            figures["weights_bit_exact"] = True
            paths = {n: getattr(m, "uses_int_mm", None) for n, m in runtime.named_modules()}
            for row in report.layers:
                row["int_mm"] = bool(paths.get(row["name"]))
            fails = check(figures, task)
            report.verification = figures
            if fails:
                raise VerificationError(f"export to {out} failed verification: " + "; ".join(fails))
        if "onnx" in formats:
            from qat.deploy.onnx import export_onnx

            example = example_input if example_input is not None else _first_input(batch_list)
            report.onnx = export_onnx(
                tmp, unprepare(copy.deepcopy(src)), tmp / schema.ONNX_FILE, example,
                reference=model, batches=batch_list if verify else None, task=task, forward=forward,
            )  # fmt: skip
        _write_json(tmp / schema.REPORT_FILE, report.to_dict())
        os.chmod(tmp, default_mode(directory=True))  # mkdtemp made it 0700; the umask decides, as for mkdir
        _commit(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(out, e) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        for m, mode in modes.items():
            m.train(mode)
    return report


def _deployable(model: nn.Module) -> tuple[nn.Module, dict[str, str]]:
    """The model as deployed: conv+BN pairs trained folded (``QuantConvBn2d``) become the plain quantized
    convs they compute in eval mode (a copy; ``model`` is untouched). Returns it and ``{conv: folded BN}``
    (the BN's module name in the float model, which the runtime turns into an identity)."""
    from qat.quant.bnfold import QuantConvBn2d, fold_bn

    if any(isinstance(m, QuantConvBn2d) for m in model.modules()):
        model = fold_bn(copy.deepcopy(model)).eval()
    folded = {n: m.folded_bn for n, m in model.named_modules() if getattr(m, "folded_bn", "")}
    return model, folded


def _first_input(batches: list[Any] | None) -> Any:
    if not batches:
        raise ValueError("format=onnx needs batches or example_input to trace the model")
    b = batches[0]
    return batch_inputs(b)
