"""The model-rewriting pass: ``prepare(model, config)`` swaps float layers for quantized ones in place.

Works on any module tree by name (no tracing), so models whose forward takes keyword arguments are fine.
Selection: a leaf is quantized when its type is in ``QUANT_MODULES``, its qualified name matches an
``include`` glob and no ``exclude`` glob; ``overrides`` change the specs of the layers their glob matches.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from torch import nn

from qat.config import QuantConfig, QuantConfigError, QuantSpec
from qat.quant.bnfold import QuantConvBn2d
from qat.quant.bnpairs import find_conv_bn_pairs
from qat.quant.modules import NO_INPUT_QUANT, QUANT_MODULES, is_quant_module
from qat.quant.quantizer import FakeQuantizer

log = logging.getLogger(__name__)


@dataclass
class LayerReport:
    name: str
    type: str
    weight: str
    activation: str
    reason: str = ""


@dataclass
class PrepareReport:
    """What ``prepare`` did: each quantized layer with its formats, each float layer with the reason, and
    (with ``quant.fold_bn``) each BatchNorm2d left unfolded with the reason."""

    quantized: list[LayerReport] = field(default_factory=list)
    skipped: list[LayerReport] = field(default_factory=list)
    not_folded: list[LayerReport] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{'layer':40s} {'type':14s} {'weight':28s} activation"]
        lines += [f"{r.name:40s} {r.type:14s} {r.weight:28s} {r.activation}" for r in self.quantized]
        if self.skipped:
            lines.append("kept in float:")
            lines += [f"  {r.name:38s} {r.type:14s} {r.reason}" for r in self.skipped]
        if self.not_folded:
            lines.append("BatchNorm not folded (kept as a float BatchNorm):")
            lines += [f"  {r.name:38s} {r.type:14s} {r.reason}" for r in self.not_folded]
        return "\n".join(lines)


class AlreadyPreparedError(RuntimeError):
    """``prepare`` was called on a model that already holds quantized layers."""


def _matches(name: str, globs: list[str]) -> bool:
    return any(fnmatchcase(name, g) for g in globs)


def _leaf_candidates(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Named modules whose type the registry knows, in definition order (their children are not visited)."""
    for cname, child in model.named_children():
        qname = f"{prefix}.{cname}" if prefix else cname
        if type(child) in QUANT_MODULES:
            yield qname, child
        else:
            yield from _leaf_candidates(child, qname)


def _set_submodule(model: nn.Module, qname: str, new: nn.Module) -> None:
    parent_name, _, attr = qname.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def prepare(
    model: nn.Module, config: QuantConfig | Mapping[str, Any], *, example_inputs: Any = None
) -> nn.Module:
    """Rewrite ``model`` in place for quantization-aware training and return it.

    ``config`` is a :class:`QuantConfig`, or a dict / OmegaConf mapping of the same shape (a
    ``configs/quant/*.yaml`` file). The report is attached as ``model.qat_report`` and logged.
    ``example_inputs``: one forward call's positional arguments (a tuple, or the single argument), used by
    ``quant.fold_bn`` to pair each conv with the BatchNorm it feeds (:mod:`qat.quant.bnpairs`); without
    them the model is traced with ``torch.fx``.
    """
    cfg = QuantConfig.from_dict(config)
    if any(is_quant_module(m) or isinstance(m, QuantConvBn2d) for m in model.modules()):
        raise AlreadyPreparedError(
            "prepare: the model already holds quantized layers; call it once on the float model "
            "(use qat.unprepare(model) to get the float model back)"
        )
    candidates = list(_leaf_candidates(model))
    names = [n for n, _ in candidates]
    for glob in cfg.include:
        # Checked against the quantizable layers: a glob naming only a container ("encoder") would
        # otherwise pass here and then silently select nothing (include matches layer names).
        if glob != "*" and not any(fnmatchcase(n, glob) for n in names):
            raise QuantConfigError(
                f"quant.include: {glob!r} matches no quantizable layer; allowed names: {_preview(names)}"
            )
    # A typo in exclude or an override glob would otherwise quantize a layer meant to stay float.
    for key, globs in (("exclude", cfg.exclude), ("overrides", list(cfg.overrides))):
        for glob in globs:
            if not any(fnmatchcase(n, glob) for n in names):
                raise QuantConfigError(
                    f"quant.{key}: {glob!r} matches no quantizable layer; allowed names: {_preview(names)}"
                )

    # Build every quantized layer first and swap them in only once nothing can fail any more, so that an
    # error (a group size that does not divide one layer, no attention hooks) leaves the float model intact.
    found = find_conv_bn_pairs(model, example_inputs) if cfg.fold_bn else None
    bn_pairs = found.pairs if found is not None else {}
    if found is not None and not bn_pairs:
        first = next(iter(found.unfolded.items()), None)
        why = f"; {first[0]!r}: {first[1]}" if first else ""
        raise QuantConfigError(
            f"quant.fold_bn: true is not valid for this model (no Conv2d output feeds a foldable "
            f"BatchNorm2d{why}); allowed: false"
        )
    report = PrepareReport()
    swaps: list[tuple[str, nn.Module]] = []
    folded: set[str] = set()  # the BatchNorms folded into their conv
    for qname, mod in candidates:
        tname = type(mod).__name__
        if not _matches(qname, cfg.include):
            report.skipped.append(LayerReport(qname, tname, "float", "float", "not matched by include"))
            continue
        if _matches(qname, cfg.exclude):
            report.skipped.append(LayerReport(qname, tname, "float", "float", "matched by exclude"))
            continue
        wspec, aspec, alpha = cfg.weight, cfg.activation, cfg.smooth
        overridden = False
        for glob, ov in cfg.overrides.items():
            if fnmatchcase(qname, glob):
                overridden = overridden or "weight" in ov or "activation" in ov
                if "weight" in ov:
                    wspec = cfg.spec_for("weight", ov, glob)
                if "activation" in ov:
                    aspec = cfg.spec_for("activation", ov, glob)
                if "smooth" in ov:
                    alpha = ov["smooth"]
        qtype = QUANT_MODULES[type(mod)]
        if qtype in NO_INPUT_QUANT:
            aspec = None
        if wspec is None and aspec is None:
            reason = "override keeps it in float" if overridden else "weight and activation specs are null"
            report.skipped.append(LayerReport(qname, tname, "float", "float", reason))
            continue
        if qname in bn_pairs:  # conv + its BatchNorm folded: the BN module moves inside the quantized conv
            bn = model.get_submodule(bn_pairs[qname])
            qmod = QuantConvBn2d.from_float(mod, bn, wspec, aspec, name=qname, bn_name=bn_pairs[qname])
            swaps.append((bn_pairs[qname], nn.Identity()))
            folded.add(bn_pairs[qname])
            tname = "Conv2d+BN"
        else:
            qmod = qtype.from_float(mod, wspec, aspec, name=qname)  # type: ignore[attr-defined]
        act_label = _describe(aspec)
        # SmoothQuant needs both sides quantized and a layer that knows how to scale them (linears).
        if (
            alpha is not None
            and wspec is not None
            and aspec is not None
            and hasattr(qmod, "enable_smoothing")
        ):
            qmod.enable_smoothing(alpha)
            act_label += f" smooth({alpha:g})"
        swaps.append((qname, qmod))
        report.quantized.append(LayerReport(qname, tname, _describe(wspec), act_label))
    if found is not None:
        kept = {bn: f"its conv {c!r} is kept in float" for c, bn in bn_pairs.items() if bn not in folded}
        for bn, reason in {**found.unfolded, **kept}.items():
            report.not_folded.append(LayerReport(bn, "BatchNorm2d", "float", "float", reason))

    if not report.quantized:
        raise QuantConfigError(
            f"quant.include: {cfg.include} with exclude {cfg.exclude} selects no quantizable layer; "
            f"quantizable layers are: {_preview(names)}"
        )
    attention = _attention_quantizers(model, cfg.attention) if cfg.attention is not None else []
    for qname, qmod in swaps:
        _set_submodule(model, qname, qmod)
    for mod, qname, hook, fq in attention:
        setattr(mod, hook, fq)
        report.quantized.append(LayerReport(qname, "attention", "-", _describe(cfg.attention)))
    model.qat_report = report  # type: ignore[assignment]
    model.qat_config = cfg  # type: ignore[assignment]
    log.info("qat.prepare:\n%s", report)
    return model


# Attention hook points: models expose identity modules named q_quant / k_quant / v_quant on the inputs of
# the attention matmuls; with ``quant.attention`` set they become activation fake-quantizers.
ATTENTION_HOOKS = ("q_quant", "k_quant", "v_quant")


def _attention_quantizers(
    model: nn.Module, spec: QuantSpec
) -> list[tuple[nn.Module, str, str, FakeQuantizer]]:
    """(owner, qualified hook name, hook attribute, quantizer) for every hook point; built, not attached."""
    found = []
    for qname, mod in model.named_modules():
        for hook in ATTENTION_HOOKS:
            if isinstance(getattr(mod, hook, None), nn.Identity):
                name = f"{qname}.{hook}" if qname else hook
                found.append((mod, name, hook, FakeQuantizer(spec, "activation", name=name)))
    if not found:
        raise QuantConfigError(
            "quant.attention: the model exposes no attention hook points (q_quant/k_quant/v_quant "
            "nn.Identity modules); set quant.attention=null"
        )
    return found


def _describe(spec: QuantSpec | None) -> str:
    return "float" if spec is None else spec.describe()


def _preview(names: list[str], n: int = 12) -> str:
    shown = ", ".join(names[:n])
    return shown + (f", ... ({len(names)} in all)" if len(names) > n else "") if names else "(none)"


def quantizers(model: nn.Module) -> Iterator[tuple[str, FakeQuantizer]]:
    """Every fake quantizer in the model with its qualified name."""
    for name, mod in model.named_modules():
        if isinstance(mod, FakeQuantizer):
            yield name, mod


def unprepare(model: nn.Module) -> nn.Module:
    """Swap quantized layers back to float ones (same parameters), in place; drops quantizer state."""
    for qname, mod in list(model.named_modules()):
        if is_quant_module(mod) or isinstance(mod, QuantConvBn2d):  # a folded conv stays folded
            _set_submodule(model, qname, mod.to_float())  # type: ignore[operator]
        for hook in ATTENTION_HOOKS:
            if isinstance(getattr(mod, hook, None), FakeQuantizer):
                setattr(mod, hook, nn.Identity())
    for attr in ("qat_report", "qat_config"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model
