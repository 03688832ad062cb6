"""Tied weights (GPT-2's ``lm_head`` sharing ``wte``, BERT's MLM decoder sharing the word embeddings, any
model that assigns one ``Parameter`` to two layers).

The quantized layers reuse the float layers' ``Parameter`` objects, so a tied pair stays tied through
prepare and training. What must not happen is one tensor quantized two ways: two independent quantizers
on it (two learned scales drifting apart), or one side quantized and the other float, would make the
export store the tensor twice and the two layers compute with different weights. So ``prepare``, with its
``tied`` policy:

* ``"share"`` (default): same weight spec on every layer of the group -> they share ONE ``FakeQuantizer``
  (one scale, one set of codes; the exporter stores the codes once); different specs (e.g. ``lm_head`` at
  int8, ``wte`` at int4, or one side excluded) -> refused with a message naming the layers;
* ``"untie"``: each layer but the first gets its own copy of the weight (and a Hugging Face
  ``config.tie_word_embeddings`` is set to False), a deliberate duplication trained and exported
  separately, so each may have its own spec.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping

from torch import nn

from qat.config import QuantConfigError
from qat.quant.modules import is_quant_module, quant_modules
from qat.quant.quantizer import FakeQuantizer

TIED_POLICIES = ("share", "untie")


class TiedWeightError(QuantConfigError):
    """A tied weight would be quantized two different ways."""


def tied_groups(model: nn.Module) -> list[list[str]]:
    """Names of quantizable (or quantized) layers that share one weight ``Parameter``, one list per tensor."""
    registry = quant_modules()
    owners: dict[int, list[str]] = defaultdict(list)
    for name, mod in model.named_modules():  # each module once, under its first name
        if type(mod) in registry or is_quant_module(mod):
            w = getattr(mod, "weight", None)
            if isinstance(w, nn.Parameter):
                owners[id(w)].append(name)
    return [names for names in owners.values() if len(names) > 1]


def untie(model: nn.Module, groups: list[list[str]]) -> None:
    """Give every layer of each tied group but the first its own copy of the weight, in place."""
    for names in groups:
        for name in names[1:]:
            mod = model.get_submodule(name)
            mod.weight = nn.Parameter(mod.weight.detach().clone(), requires_grad=mod.weight.requires_grad)
    config = getattr(model, "config", None)
    if groups and config is not None and hasattr(config, "tie_word_embeddings"):
        config.tie_word_embeddings = False  # otherwise transformers re-ties them in tie_weights()


def _spec_key(fq: FakeQuantizer | None) -> str:
    return "float" if fq is None else json.dumps(fq.spec.to_dict(), sort_keys=True)


def _describe(fq: FakeQuantizer | None) -> str:
    return "float" if fq is None else fq.spec.describe()


def share_tied_quantizers(layers: Mapping[str, nn.Module], groups: list[list[str]]) -> list[list[str]]:
    """Make each tied group use one weight quantizer, or raise :class:`TiedWeightError`.

    ``layers``: each group member by name as it will be after ``prepare`` (its quantized layer, or the
    float one it keeps). Returns the groups that now share a quantizer (groups left in float are skipped).
    """
    shared = []
    for names in groups:
        mods = [layers[n] for n in names]
        quants = [getattr(m, "weight_quant", None) for m in mods]
        keys = [_spec_key(q) for q in quants]
        if all(k == "float" for k in keys):
            continue
        smoothed = [n for n, m in zip(names, mods, strict=True) if getattr(m, "smooth", None) is not None]
        if smoothed:  # one set of codes cannot be both W * s (smoothed layer) and W (the others)
            raise TiedWeightError(
                f"tied weights: SmoothQuant (quant.smooth) makes {smoothed[0]} quantize its weight times "
                f"per-channel factors, so it cannot share codes with "
                f"{', '.join(n for n in names if n != smoothed[0])}; turn it off there "
                f"(quant.overrides: {{{smoothed[0]}: {{smooth: null}}}}) or pass tied='untie'"
            )
        if len(set(keys)) > 1 or any(q.stat_shape != quants[0].stat_shape for q in quants if q is not None):
            members = ", ".join(f"{n} ({_describe(q)})" for n, q in zip(names, quants, strict=True))
            raise TiedWeightError(
                f"tied weights: {members} share one weight tensor but would be quantized differently; "
                "give them the same weight spec in quant.overrides, or pass tied='untie' to train and "
                "export a separate copy for each"
            )
        for mod in mods[1:]:
            mod.weight_quant = quants[0]
        shared.append(names)
    return shared
