"""The model-rewriting pass: ``prepare(model, config)`` swaps float layers for quantized ones in place.

Works on any module tree by name (no tracing), so models whose forward takes keyword arguments are fine.
Selection: a leaf is quantized when its type is in the layer registry (``QUANT_MODULES``, with the types of
optional packages such as GPT-2's Conv1D, :func:`~qat.quant.modules.quant_modules`), its qualified name
matches an ``include`` glob and no ``exclude`` glob; ``overrides`` change the specs of the layers their
glob matches. Layers of other types that hold a weight of two or more dimensions stay float and are
reported ("left float: unknown type"; ``strict=True`` refuses them).

Around the layers: the pattern passes of ``PATTERN_PASSES`` rewrite a layer together with the module it
feeds (Conv-BN folding), attention hooks quantize the inputs of attention matmuls
(:mod:`qat.quant.attention`), and layers that share a weight get one weight quantizer
(:mod:`qat.quant.tied`). Every new module is built before any is swapped in, so a ``prepare`` that fails
leaves the model as it was.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from torch import nn

from qat.config import QuantConfig, QuantConfigError, QuantSpec
from qat.quant import attention
from qat.quant.bnfold import QuantConvBn2d
from qat.quant.bnpairs import ConvBnPairs, find_conv_bn_pairs
from qat.quant.modules import NO_INPUT_QUANT, is_quant_module, quant_modules
from qat.quant.quantizer import FakeQuantizer
from qat.quant.tied import TIED_POLICIES, share_tied_quantizers, tied_groups, untie

log = logging.getLogger(__name__)

UNKNOWN_TYPE = "left float: unknown type"


@dataclass
class LayerReport:
    name: str
    type: str
    weight: str
    activation: str
    reason: str = ""


@dataclass
class PrepareReport:
    """What ``prepare`` did: each quantized layer with its formats, each float layer with the reason (layers
    of types the registry does not know: ``UNKNOWN_TYPE``), and each module a pattern pass left alone
    (with ``quant.fold_bn``: each BatchNorm2d left unfolded) with the reason."""

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


@dataclass(frozen=True)
class PatternPass:
    """A rewrite of a layer together with the module its output feeds into one quantized layer.

    ``find(model, example_inputs)``: the pairs ``{layer: partner}`` and ``{partner: why not}``;
    ``build(layer, partner, weight_spec, act_spec, name, partner_name)``: the quantized layer, which holds
    the partner (the partner's place becomes an ``nn.Identity``; ``unprepare`` gives back the layer's
    ``to_float()`` and keeps the identity); export encodes its ``deployable()``. ``label``: the report's
    type of a fused layer; ``nothing``: why the config flag is invalid when nothing matches.
    """

    find: Callable[[nn.Module, Any], ConvBnPairs]
    build: Callable[..., nn.Module]
    label: str
    nothing: str


# Pattern passes by the QuantConfig flag that turns them on. Data, not code.
PATTERN_PASSES: dict[str, PatternPass] = {
    "fold_bn": PatternPass(
        find=find_conv_bn_pairs,
        build=QuantConvBn2d.from_float,
        label="Conv2d+BN",
        nothing="no Conv2d output feeds a foldable BatchNorm2d",
    ),
}


class AlreadyPreparedError(RuntimeError):
    """``prepare`` was called on a model that already holds quantized layers."""


def _matches(name: str, globs: list[str]) -> bool:
    return any(fnmatchcase(name, g) for g in globs)


def layer_types(model: nn.Module) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, str]]]:
    """The named modules whose type the registry knows, in definition order (their children are not
    visited), and ``(name, type name)`` of the other modules that hold a weight of two or more dimensions."""
    registry = quant_modules()
    known: list[tuple[str, nn.Module]] = []
    unknown: list[tuple[str, str]] = []

    def visit(mod: nn.Module, prefix: str) -> None:
        for cname, child in mod.named_children():
            qname = f"{prefix}.{cname}" if prefix else cname
            if type(child) in registry:
                known.append((qname, child))
                continue
            if any("weight" in n and p.dim() >= 2 for n, p in child.named_parameters(recurse=False)):
                unknown.append((qname, type(child).__name__))
            visit(child, qname)

    visit(model, "")
    return known, unknown


def prepare(
    model: nn.Module,
    config: QuantConfig | Mapping[str, Any] | str,
    *,
    example_inputs: Any = None,
    tied: str = "share",
    strict: bool = False,
) -> nn.Module:
    """Rewrite ``model`` in place for quantization-aware training and return it.

    ``config`` is a :class:`QuantConfig`, a dict / OmegaConf mapping of the same shape (a
    ``qat/conf/quant/*.yaml`` file), or the name of a packaged one (``"w4a4"``, ``"gguf_q4_0"``). The
    report is attached as ``model.qat_report`` and logged.
    ``example_inputs``: one forward call's positional arguments (a tuple, or the single argument), used by
    ``quant.fold_bn`` to pair each conv with the BatchNorm it feeds (:mod:`qat.quant.bnpairs`); without
    them the model is traced with ``torch.fx``. ``tied``: what layers sharing a weight get, "share" (one
    weight quantizer; different specs are refused) or "untie" (a copy each), see :mod:`qat.quant.tied`;
    the shared groups are listed on ``model.qat_tied``. ``strict``: refuse a model with layers of types the
    registry does not know (they would stay float) instead of reporting them.
    """
    cfg = QuantConfig.from_dict(config)
    if tied not in TIED_POLICIES:
        raise QuantConfigError(f"tied: {tied!r} is not valid; allowed: {', '.join(TIED_POLICIES)}")
    if any(is_quant_module(m) for m in model.modules()):
        raise AlreadyPreparedError(
            "prepare: the model already holds quantized layers; call it once on the float model "
            "(use qat.unprepare(model) to get the float model back)"
        )
    candidates, unknown = layer_types(model)
    if strict and unknown:
        raise QuantConfigError(
            f"strict: True refuses layers of types the layer registry does not know (they would stay "
            f"float): {', '.join(f'{n} ({t})' for n, t in unknown)}; register a quantized type with "
            "qat.register_quant_module(float_type, quant_type), or pass strict=False"
        )
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
    found = {key: p.find(model, example_inputs) for key, p in PATTERN_PASSES.items() if getattr(cfg, key)}
    fused: dict[str, tuple[str, PatternPass]] = {}
    for key, matches in found.items():
        if not matches.pairs:
            first = next(iter(matches.unfolded.items()), None)
            why = f"; {first[0]!r}: {first[1]}" if first else ""
            raise QuantConfigError(
                f"quant.{key}: true is not valid for this model ({PATTERN_PASSES[key].nothing}{why}); "
                "allowed: false"
            )
        fused.update({layer: (partner, PATTERN_PASSES[key]) for layer, partner in matches.pairs.items()})
    registry = quant_modules()
    report = PrepareReport()
    swaps: list[tuple[str, nn.Module]] = []
    absorbed: set[str] = set()  # the partners fused into their layer
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
        qtype = registry[type(mod)]
        if qtype in NO_INPUT_QUANT:
            aspec = None
        if wspec is None and aspec is None:
            reason = "override keeps it in float" if overridden else "weight and activation specs are null"
            report.skipped.append(LayerReport(qname, tname, "float", "float", reason))
            continue
        if qname in fused:  # the partner module moves inside the quantized layer
            partner, p = fused[qname]
            qmod = p.build(mod, model.get_submodule(partner), wspec, aspec, qname, partner)
            swaps.append((partner, nn.Identity()))
            absorbed.add(partner)
            tname = p.label
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
    report.skipped += [LayerReport(n, t, "float", "float", UNKNOWN_TYPE) for n, t in unknown]
    for matches in found.values():
        kept = {b: f"its layer {a!r} is kept in float" for a, b in matches.pairs.items() if b not in absorbed}
        for name, reason in {**matches.unfolded, **kept}.items():
            tname = type(model.get_submodule(name)).__name__
            report.not_folded.append(LayerReport(name, tname, "float", "float", reason))

    if not report.quantized:
        raise QuantConfigError(
            f"quant.include: {cfg.include} with exclude {cfg.exclude} selects no quantizable layer; "
            f"quantizable layers are: {_preview(names)}"
        )
    hooks = attention.attention_quantizers(model, cfg.attention) if cfg.attention is not None else []
    groups = tied_groups(model)
    new = dict(swaps)
    planned = {n: new.get(n, model.get_submodule(n)) for names in groups for n in names}  # as it will be
    shared = share_tied_quantizers(planned, groups) if tied == "share" else []

    for qname, qmod in swaps:
        model.set_submodule(qname, qmod)
    if tied == "untie":
        untie(model, groups)
    attention.attach(model, hooks)
    for (_, qname, _), _ in hooks:
        report.quantized.append(LayerReport(qname, "attention", "-", _describe(cfg.attention)))
    model.qat_report = report  # type: ignore[assignment]
    model.qat_config = cfg  # type: ignore[assignment]
    model.qat_tied = shared  # type: ignore[assignment]
    log.info("qat.prepare:\n%s", report)
    return model


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
    """Swap quantized layers back to float ones (same parameters), in place; drops quantizer state. A layer
    fused by a pattern pass gives back its ``to_float()`` (a folded conv stays folded)."""
    for qname, mod in list(model.named_modules()):
        if is_quant_module(mod):
            model.set_submodule(qname, mod.to_float())  # type: ignore[operator]
        attention.detach(mod)
    for attr in ("qat_report", "qat_config", "qat_tied"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model
