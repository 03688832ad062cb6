"""Automatic mixed precision: per-layer weight bit widths from measured sensitivity under a size budget.

1. Sensitivity: for each searched layer and candidate width ``b``, only that layer's weight is quantized at
   ``b`` bits (post-training: MSE-optimal clipping with the base config's granularity) and the damage is
   measured on calibration batches as KL(float || quantized) of the model's output distribution (or, with
   ``metric="loss"``, the increase of the task loss). One layer at a time is what HAWQ-style methods assume:
   layer damages add up to first order.
2. Assignment: minimise the summed sensitivity subject to
   ``sum(bits_l * params_l) <= budget * sum(params_l)``: a multiple-choice knapsack, solved exactly by
   dynamic programming over parameter counts.
3. Output: a quant config in the format of ``qat/conf/quant``, the base config plus one weight override per
   layer, that ``qat-train`` (or :func:`qat.prepare`) uses like any hand-written one.

Searched layers are those the base config quantizes with an int weight format, except layers whose weight
an override of the base config sets (kept as given: "pinned", e.g. embeddings at int8). The budget counts
the searched layers' weights only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from qat.calibrate import batch_inputs
from qat.config import QuantConfig, QuantConfigError, QuantSpec
from qat.quant.quantizer import FakeQuantizer
from qat.rewrite import layer_types

METRICS = ("kl", "loss")
# Largest dynamic-programming table (budget units); bigger problems use coarser, conservative units.
_MAX_UNITS = 2_000_000


@dataclass
class LayerSensitivity:
    """One searched layer: its weight's parameter count and the damage at each candidate width."""

    name: str
    params: int
    scores: dict[int, float] = field(default_factory=dict)


@dataclass
class MixedResult:
    """The assignment with the figures a user checks: achieved bits per weight and predicted damage."""

    bits: dict[str, int]
    bits_per_weight: float
    budget: float
    pinned: list[str]
    layers: list[LayerSensitivity]
    predicted_damage: float
    config: dict[str, Any]

    def table(self) -> str:
        widths = sorted({b for layer in self.layers for b in layer.scores})
        head = f"{'layer':32s} {'params':>9s} " + " ".join(f"{'w' + str(b):>9s}" for b in widths) + "  chosen"
        rows = [head]
        for layer in self.layers:
            cells = " ".join(f"{layer.scores.get(b, float('nan')):9.2e}" for b in widths)
            rows.append(f"{layer.name:32s} {layer.params:9d} {cells}  int{self.bits[layer.name]}")
        pinned = f"; pinned: {', '.join(self.pinned)}" if self.pinned else ""
        rows.append(
            f"budget {self.budget:g} bits/weight -> {self.bits_per_weight:.3f} achieved, "
            f"predicted damage {self.predicted_damage:.3e}{pinned}"
        )
        return "\n".join(rows)


def _default_forward(model: nn.Module, batch: Any) -> torch.Tensor:
    x = batch_inputs(batch)
    return model(x)


def searched_layers(model: nn.Module, base: QuantConfig) -> tuple[list[tuple[str, nn.Module]], list[str]]:
    """(layers whose width is searched, names of layers pinned by a weight override of ``base``)."""
    if base.weight is None or base.weight.kind != "int":
        fmt = None if base.weight is None else base.weight.format
        raise QuantConfigError(
            f"quant.weight.format: {fmt!r} is not valid for mixed precision; allowed: an int format "
            "(int2..int8), whose granularity and group size the search keeps"
        )
    searched, pinned = [], []
    for name, mod in layer_types(model)[0]:
        included = any(fnmatchcase(name, g) for g in base.include)
        if not included or any(fnmatchcase(name, g) for g in base.exclude):
            continue
        if not isinstance(getattr(mod, "weight", None), torch.Tensor):
            continue
        if any(fnmatchcase(name, g) and "weight" in ov for g, ov in base.overrides.items()):
            pinned.append(name)
        else:
            searched.append((name, mod))
    if not searched:
        raise QuantConfigError("quant.include: the base config leaves no layer for the width search")
    return searched, pinned


def probe_spec(base: QuantSpec, bits: int) -> QuantSpec:
    """The base weight spec at ``bits`` with an MSE-optimal range (a post-training estimate of the damage)."""
    prefix = "int" if base.signed else "uint"
    return dataclasses.replace(base, format=f"{prefix}{bits}", scale="mse", _key="mixed.probe")


def _damage(metric: str, ref: torch.Tensor, out: torch.Tensor, batch: Any) -> float:
    logits, ref = out.flatten(0, -2).float(), ref.flatten(0, -2).float()
    if metric == "kl":
        log_p, log_q = F.log_softmax(ref, dim=-1), F.log_softmax(logits, dim=-1)
        return float(F.kl_div(log_q, log_p, log_target=True, reduction="batchmean"))
    y = batch[1].flatten()
    return float(F.cross_entropy(logits, y) - F.cross_entropy(ref, y))


@torch.no_grad()
def measure_sensitivity(
    model: nn.Module,
    batches: Iterable[Any],
    base: QuantConfig,
    candidates: Sequence[int],
    metric: str = "kl",
    forward: Callable[[nn.Module, Any], torch.Tensor] = _default_forward,
) -> tuple[list[LayerSensitivity], list[str]]:
    """Damage of quantizing each searched layer alone at each candidate width (the model is restored)."""
    if metric not in METRICS:
        raise QuantConfigError(f"mixed.metric: {metric!r} is not valid; allowed: {', '.join(METRICS)}")
    batches = list(batches)
    if not batches:
        raise ValueError("mixed.batches: no calibration batch to measure sensitivity on; allowed: >= 1")
    layers, pinned = searched_layers(model, base)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        refs = [forward(model, b) for b in batches]
        result = []
        for name, mod in layers:
            weight: torch.Tensor = mod.weight  # type: ignore[assignment]
            original = weight.detach().clone()
            sens = LayerSensitivity(name, weight.numel())
            for bits in candidates:
                fq = FakeQuantizer(probe_spec(base.weight, bits), "weight", tuple(weight.shape), name=name)
                weight.copy_(fq.to(weight.device)(original))
                pairs = zip(refs, batches, strict=True)
                damages = [_damage(metric, ref, forward(model, b), b) for ref, b in pairs]
                sens.scores[int(bits)] = sum(damages) / len(batches)
                weight.copy_(original)
            result.append(sens)
    finally:
        for m, mode in modes.items():
            m.train(mode)
    return result, pinned


def assign_bits(
    layers: Sequence[LayerSensitivity], bits_per_weight: float, candidates: Sequence[int]
) -> dict[str, int]:
    """Exact multiple-choice knapsack: least summed damage with ``sum(b * n) <= bits_per_weight * sum(n)``."""
    cands = sorted({int(b) for b in candidates})
    if not cands:
        raise QuantConfigError("mixed.candidates: [] is not valid; allowed: a list of widths 2..8")
    if bits_per_weight < cands[0]:
        raise QuantConfigError(
            f"budget.bits_per_weight: {bits_per_weight} is not valid; allowed: >= {cands[0]} "
            f"(the smallest candidate width)"
        )
    # Costs in units of the gcd of the parameter counts keep the table small and the budget exact.
    unit = math.gcd(*[layer.params for layer in layers])
    sizes = [layer.params // unit for layer in layers]
    cap = math.floor(bits_per_weight * sum(sizes) + 1e-9)
    coarse = max(1, math.ceil(cap / _MAX_UNITS))  # coarser units round costs up: never over budget
    cap //= coarse
    costs = [[math.ceil(n * b / coarse) for b in cands] for n in sizes]
    scores = np.array([[layer.scores.get(b, math.inf) for b in cands] for layer in layers], dtype=np.float64)
    scores = np.nan_to_num(scores, nan=np.inf)
    dp = np.full(cap + 1, np.inf)
    dp[0] = 0.0
    choices = []
    for i in range(len(layers)):
        new = np.full(cap + 1, np.inf)
        choice = np.full(cap + 1, -1, dtype=np.int16)
        for j, c in enumerate(costs[i]):
            if c > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[c:] = dp[: cap + 1 - c] + scores[i, j]
            better = cand < new
            new[better] = cand[better]
            choice[better] = j
        dp = new
        choices.append(choice)
    if not np.isfinite(dp).any():
        raise QuantConfigError(
            f"budget.bits_per_weight: {bits_per_weight} is not valid; allowed: a budget the candidate "
            f"widths {cands} can meet"
        )
    idx = int(np.argmin(dp))
    bits: dict[str, int] = {}
    for i in reversed(range(len(layers))):
        j = int(choices[i][idx])
        bits[layers[i].name] = cands[j]
        idx -= costs[i][j]
    return {layer.name: bits[layer.name] for layer in layers}


def mixed_config(base: QuantConfig, bits: dict[str, int], name: str) -> dict[str, Any]:
    """``base`` plus one ``{layer: {weight: {format: intB}}}`` override per searched layer, as a dict."""
    assert base.weight is not None
    prefix = "int" if base.weight.signed else "uint"
    cfg = base.to_dict()
    overrides = dict(cfg["overrides"])
    for layer, b in bits.items():
        overrides[layer] = {"weight": {"format": f"{prefix}{b}"}}
    cfg["overrides"] = overrides
    QuantConfig.from_dict(cfg)  # the written file must load: fail here rather than in the user's run
    return {"name": name, **cfg}


def auto_mixed(
    model: nn.Module,
    batches: Iterable[Any],
    base: QuantConfig,
    bits_per_weight: float,
    candidates: Sequence[int] = (2, 3, 4, 8),
    metric: str = "kl",
    name: str | None = None,
    forward: Callable[[nn.Module, Any], torch.Tensor] = _default_forward,
) -> MixedResult:
    """Measure sensitivities on ``batches`` (float ``model``), assign widths, build the quant config."""
    for b in candidates:
        if isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 8:
            raise QuantConfigError(
                f"mixed.candidates: {list(candidates)!r} is not valid; allowed: a list of widths 2..8"
            )
    layers, pinned = measure_sensitivity(model, batches, base, candidates, metric, forward)
    bits = assign_bits(layers, bits_per_weight, candidates)
    total = sum(layer.params for layer in layers)
    achieved = sum(bits[layer.name] * layer.params for layer in layers) / total
    damage = sum(layer.scores[bits[layer.name]] for layer in layers)
    cfg = mixed_config(base, bits, name or f"mixed_w{bits_per_weight:g}")
    return MixedResult(bits, achieved, float(bits_per_weight), pinned, layers, damage, cfg)


def usage_hint(path: Path) -> str:
    """The ``qat-train`` overrides that select a config written at ``path``."""
    if path.parent.name == "quant":
        return f"hydra.searchpath=[file://{path.parent.parent.absolute()}] quant={path.stem}"
    return f"quant={path.stem} (with the file in <dir>/quant/ and hydra.searchpath=[file://<dir>])"


def write_quant_config(path: str | Path, result: MixedResult) -> Path:
    """Write ``result.config`` as a ``qat/conf/quant``-style YAML file (atomically), with a header comment."""
    from qat.io import write_text_atomic

    path = Path(path)
    use = usage_hint(path)
    header = [
        f"# Automatic mixed precision (qat-mixed): {result.bits_per_weight:.3f} bits per searched weight "
        f"(budget {result.budget:g}).",
        "# Per-layer widths minimise the summed output damage measured one layer at a time.",
        f"# Use: qat-train <recipe> {use}",
    ]
    body = yaml.safe_dump(result.config, sort_keys=False, default_flow_style=None, width=110)
    write_text_atomic(path, "\n".join(header) + "\n" + body)
    return path
