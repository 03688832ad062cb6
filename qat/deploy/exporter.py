"""Export a prepared (fake-quant) model to integer weights: ``model.safetensors`` + ``quant_config.json``.

Codes always come from ``weight_quant.quantize(weight)`` in eval mode (never from stale buffers), so the
export equals what the fake-quant forward computes now; the tensors and entries are the codec's
(:mod:`qat.deploy.codec`). The directory is written to a temporary sibling and renamed into place only
after verification passes (:func:`qat.io.atomic_directory`), so a failure never leaves a partial export.
Other targets (:data:`qat.deploy.registry.TARGETS`) are written from the native export, in the same
directory.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import platform
from collections.abc import Iterable, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qat import size
from qat.calibrate import batch_inputs
from qat.deploy import codec, schema
from qat.deploy.loader import load_quantized
from qat.deploy.registry import ACTIVATION, LINEAR, NATIVE, TARGETS, ExportJob, encoded, op_of
from qat.deploy.registry import targets as registry_targets
from qat.deploy.storage import config_digest, write_safetensors
from qat.deploy.verify import Forward, VerificationError, check, compare, default_forward
from qat.io import atomic_directory, write_json_atomic
from qat.quant.modules import effective_weight, quant_modules
from qat.rewrite import unprepare


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
    (``nominal_budget_bytes`` uses the format bits). ``targets``: the figures of each target written
    beside the native one, also readable as ``report.<target>`` (``report.onnx``; None when not written).
    """

    out_dir: str
    written: list[str]
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
    targets: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        if name in TARGETS and name != NATIVE:
            return self.__dict__.get("targets", {}).get(name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        figures = d.pop("targets")
        d.update({name: figures.get(name) for name in TARGETS if name != NATIVE})
        return d

    def summary(self) -> str:
        lines = [
            f"export {self.out_dir} ({', '.join(self.written)})",
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
        for name, t in self.targets.items():
            if "max_abs_logit_diff" in t:
                lines.append(
                    f"  {name}: max |logit diff| {t['max_abs_logit_diff']:.3g}, "
                    f"top-1 agreement {100 * t['top1_agreement']:.2f}%"
                )
        return "\n".join(lines)


@dataclasses.dataclass
class Collected:
    """What :func:`collect` builds: the tensors of ``model.safetensors`` (``tensors``), the content of
    ``quant_config.json`` (``config``), the stored bytes by class (codes / qparams / float), the budgets
    of :class:`ExportReport`, the report's per-layer rows (``layers``) and, per quantized weight, how far
    the stored weight is from the fake-quant one (``weight_error``: 0.0 when exact)."""

    tensors: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    bytes: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(size.BYTE_CLASSES, 0))
    budget: float = 0.0
    nominal: float = 0.0
    layers: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    weight_error: dict[str, float] = dataclasses.field(default_factory=dict)

    def add(self, name: str, t: torch.Tensor, cls: str) -> dict[str, Any]:
        """Store tensor ``t`` as ``name`` in byte class ``cls``; returns its reference in the config."""
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

    def weight(self, name: str, mod: nn.Module, fq: Any) -> dict[str, Any]:
        """Store the quantized weight of layer ``name``, checked against its fake-quant value and sizes."""
        before = dict(self.bytes)
        w = effective_weight(mod).detach()  # W * s for SmoothQuant layers (their input entry carries s)
        entry, ref = codec.encode_weight(name, fq, w, self.add)
        c = entry["codes"]
        self.budget += c["container_bits"] * c["count"] / 8
        self.nominal += float(entry["bits"]) * c["count"] / 8
        self.expect(f"{name}.weight", before, size.weight_bytes(fq, w.numel()))
        deq = codec.QWeight(entry, self.tensors, name).dequantize()
        self.weight_error[name] = float((deq - ref.float()).abs().max())
        return entry

    def act(self, name: str, fq: Any) -> dict[str, Any]:
        """Store the input quantizer of layer ``name`` (or the standalone quantizer ``name``)."""
        if fq.learned and not fq.is_initialized and not fq.spec.dynamic:
            raise ExportError(
                f"{name}: the learned activation scale was never initialised "
                "(calibrate or train the model first)"
            )
        before = dict(self.bytes)
        entry = codec.encode_act(name, fq, self.add)
        self.expect(f"{name}.input", before, {"qparams": size.input_bytes(fq)})
        return entry


def _float_type(mod: nn.Module) -> type[nn.Module]:
    for ftype, qtype in quant_modules().items():
        if qtype is type(mod):
            return ftype
    return type(mod.to_float()) if hasattr(mod, "to_float") else type(mod)  # type: ignore[operator]


def _layer(name: str, mod: nn.Module, wq: Any, iq: Any, col: Collected, tied: dict) -> dict[str, Any]:
    """The ``layers[name]`` entry of a quantized layer (its tensors stored in ``col``)."""
    ftype = _float_type(mod)
    layer: dict[str, Any] = {"module": ftype.__name__, "op": op_of(ftype).name}
    layer["weight"], layer["weight_float"] = None, f"{name}.weight"
    if wq is not None:
        key = size.weight_key(mod, wq)  # a tied weight with the same spec: the tensors already stored
        layer["weight"], layer["weight_float"] = tied[key] if key in tied else col.weight(name, mod, wq), None
        tied[key] = layer["weight"]
    bias = getattr(mod, "bias", None)
    layer["bias"] = f"{name}.bias" if isinstance(bias, torch.Tensor) else None
    layer["input"] = col.act(name, iq) if iq is not None else None
    smooth = getattr(mod, "smooth", None)
    if smooth is not None and (wq is None or iq is None):
        raise ExportError(
            f"{name}: a SmoothQuant layer needs both its weight and input quantizers on (or both off) "
            "to be exported; enable_fake_quant() on both"
        )
    if smooth is not None:
        if layer["op"] != LINEAR.name:
            raise ExportError(f"{name}: SmoothQuant factors are only exported for linear layers")
        before = dict(col.bytes)
        layer["input"]["smooth"] = col.add(f"{name}.input.smooth", smooth.scale.float(), "qparams")
        col.expect(f"{name}.input.smooth", before, {"qparams": size.smooth_bytes(mod)})
    if getattr(mod, "folded_bn", ""):  # the BN folded into this conv: an identity in the deployed model
        layer["folded_bn"] = mod.folded_bn
    return layer


def collect(model: nn.Module) -> Collected:
    """Build the tensors and ``quant_config.json`` content of ``model`` (a prepared model as export
    encodes it, see :func:`qat.deploy.registry.encoded`, in eval mode)."""
    col = Collected()
    entries: dict[str, Any] = {}
    tied: dict[tuple, dict[str, Any]] = {}
    for name, mod, wq, iq in size.quant_layers(model):
        if wq is None and iq is None:
            continue  # every quantizer disabled: a plain float layer
        entries[name] = _layer(name, mod, wq, iq, col, tied)
        col.layers.append({"name": name, "module": entries[name]["module"], "weight": wq.spec.describe()
                           if wq else "float", "input": iq.spec.describe() if iq else "float"})  # fmt: skip
    for name, fq in size.standalone_quantizers(model):
        if fq.role != "activation":
            raise ExportError(f"{name}: a standalone weight quantizer is not supported by the exporter")
        entries[name] = {"module": "FakeQuantizer", "op": ACTIVATION.name, "weight": None,
                         "weight_float": None, "bias": None, "input": col.act(name, fq)}  # fmt: skip
        col.layers.append({"name": name, "module": "attention", "weight": "-", "input": fq.spec.describe()})
    if not entries:
        raise ExportError(
            "the model has no active quantizer; call qat.prepare(model, config) before exporting"
        )

    # Float state: the model's own tensors but the quantized weights, tied tensors stored once.
    stored, aliases = size.stored_tensors(model, {f"{n}.weight" for n, e in entries.items() if e["weight"]})
    float_tensors = {k: {"dtype": codec.ST_NAMES.get(v.dtype), "shape": col.add(k, v, "float")["shape"]}
                     for k, v in stored.items()}  # fmt: skip
    # A layer's bias may be tied to another tensor (BERT's MLM decoder bias): point at the stored one.
    for layer in entries.values():
        for key in ("bias", "weight_float"):
            if layer.get(key) in aliases:
                layer[key] = aliases[layer[key]]
    smoothed = any((e.get("input") or {}).get("smooth") for e in entries.values())
    col.config = {
        "schema": schema.SCHEMA_NAME,
        # The oldest version that describes this export, so older readers load what they can.
        "schema_version": schema.SCHEMA_VERSION if smoothed else 1,
        "producer": _producer(),
        "files": {"weights": {"path": schema.WEIGHTS_FILE}},
        "quant_config": _quant_config_dict(model),
        "layers": entries,
        "float_tensors": float_tensors,
        "aliases": aliases,
    }
    return col


def _producer() -> dict[str, str]:
    from qat import __version__

    versions = {"version": __version__, "torch": torch.__version__, "python": platform.python_version()}
    return {"name": "qatkit", **versions}


def _quant_config_dict(model: nn.Module) -> dict[str, Any] | None:
    cfg = getattr(model, "qat_config", None)
    return cfg.to_dict() if hasattr(cfg, "to_dict") else None


def _write_error(out: Path, e: OSError) -> ExportError:
    """A failed write, reported for the user's ``out`` (never the temporary sibling directory the export is
    written to first, whose name means nothing to them)."""
    blocker = next((p for p in [*reversed(out.parents), out] if p.exists() and not p.is_dir()), None)
    why = f"{blocker} is a file, not a directory" if blocker else (e.strerror or str(e))
    return ExportError(
        f"{out}: cannot write the export there ({why}); allowed: a path in a writable directory"
    )


def export(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    batches: Iterable[Any] | None = None,
    task: str | None = None,
    forward: Forward = default_forward,
    targets: Sequence[str] | str = (NATIVE,),
    verify: bool = True,
    max_batches: int | None = None,
    example_input: Any = None,
    overwrite: bool = True,
    tokenizer: Any = None,
) -> ExportReport:
    """Export a prepared model to ``out_dir`` and return the report (also saved as ``export_report.json``).

    ``batches``: validation batches (``(inputs, targets)`` tuples) for verification; without them the
    export is written unverified. ``task``: "classification" or "lm" (selects the verification criteria).
    ``forward(model, batch)`` gives the logits. ``targets``: what to write, one name or a list of
    :data:`qat.deploy.registry.TARGETS` ("native", always written, plus e.g. "onnx": a QDQ ``model.onnx``
    checked in onnxruntime, which needs ``batches`` or ``example_input``). ``tokenizer``: the model's
    Hugging Face tokenizer, written by the targets that ship one.
    Raises :class:`VerificationError` (and writes nothing) when the reloaded model does not match.
    """
    names = registry_targets(targets)
    out = Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists (pass overwrite=True to replace it)")
    from qat.train.fsdp import refuse_sharded

    refuse_sharded(model, "export")
    batch_list = list(islice(batches, max_batches)) if batches is not None else None
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with atomic_directory(out) as tmp:
            src = encoded(model)
            report = _write_native(model, src, tmp, out, names)
            if verify and batch_list:
                report.verification = _verify(model, src, tmp, report, batch_list, task, forward)
            example = (
                example_input if example_input is not None or not batch_list else batch_inputs(batch_list[0])
            )
            job = ExportJob(tmp, lambda: unprepare(copy.deepcopy(src)), model, batch_list if verify else None,
                            example, task, forward, tokenizer)  # fmt: skip
            for name in names[1:]:
                report.targets[name] = TARGETS[name].writer()(job)
            write_json_atomic(tmp / schema.REPORT_FILE, report.to_dict())
    except OSError as e:
        raise _write_error(out, e) from e
    finally:
        for m, mode in modes.items():
            m.train(mode)
    return report


def _write_native(model: nn.Module, src: nn.Module, tmp: Path, out: Path, names: list[str]) -> ExportReport:
    """Write ``model.safetensors`` and ``quant_config.json`` of ``src`` into ``tmp``; the report's sizes."""
    col = collect(src)
    cfg = col.config
    # The config's digest in the weights file ties the two files together (see config_digest).
    metadata = {
        "format": "qatkit",
        "schema_version": str(cfg["schema_version"]),
        "config_sha256": config_digest(cfg),
    }
    cfg["files"]["weights"] = write_safetensors(tmp / schema.WEIGHTS_FILE, col.tensors, metadata)
    write_json_atomic(tmp / schema.CONFIG_FILE, cfg)
    bad = max(col.weight_error, key=col.weight_error.get, default=None)  # type: ignore[arg-type]
    if bad is not None and col.weight_error[bad] != 0.0:
        raise VerificationError(
            f"{bad}: stored weight differs from the fake-quant weight by {col.weight_error[bad]:.3g}"
        )
    payload = sum(col.bytes.values())
    return ExportReport(
        out_dir=str(out),
        written=names,
        float_bytes=size.float_size_bytes(model),
        exported_bytes=payload,
        file_bytes=cfg["files"]["weights"]["bytes"],
        ratio=size.float_size_bytes(model) / max(payload, 1),
        budget_bytes=col.budget,
        nominal_budget_bytes=col.nominal,
        budget_ok=payload <= 1.02 * col.budget,
        breakdown={
            "codes": col.bytes["codes"],
            "scales_zero_points": col.bytes["qparams"],
            "float_kept": col.bytes["float"],
        },
        layers=col.layers,
    )


def _verify(model: nn.Module, src: nn.Module, tmp: Path, report: ExportReport, batches: list[Any],
            task: str | None, forward: Forward) -> dict[str, Any]:  # fmt: skip
    """Reload the written export into the integer runtime and compare it with ``model`` on ``batches``."""
    runtime = load_quantized(tmp, unprepare(copy.deepcopy(src)))
    figures = compare(model, runtime, batches, task=task, forward=forward)
    figures["weights_bit_exact"] = True
    paths = {n: getattr(m, "uses_int_mm", None) for n, m in runtime.named_modules()}
    for row in report.layers:
        row["int_mm"] = bool(paths.get(row["name"]))
    fails = check(figures, task)
    if fails:
        raise VerificationError(f"export to {report.out_dir} failed verification: " + "; ".join(fails))
    return figures
