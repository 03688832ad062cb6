"""``qat.hf.prepare``: :func:`qat.prepare` plus what Hugging Face models need around it.

Conv1D is registered on import of :mod:`qat.hf`; here we add the attention hooks when ``quant.attention``
is set and enforce one quantization per tied weight (see :mod:`qat.hf.tied`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from qat.config import QuantConfig
from qat.hf.attention import add_attention_hooks
from qat.hf.tied import TIED_POLICIES, TiedWeightError, share_tied_quantizers, tied_groups, untie
from qat.rewrite import prepare as core_prepare
from qat.rewrite import unprepare


def prepare(
    model: nn.Module,
    config: QuantConfig | Mapping[str, Any],
    *,
    tied: str = "share",
    example_inputs: Any = None,
) -> nn.Module:
    """Rewrite a ``transformers`` model (or any model) in place for QAT and return it.

    ``tied``: "share" (default): layers that share a weight get one shared weight quantizer, and
    differing specs on a tied pair are refused (:class:`~qat.hf.tied.TiedWeightError`, the model is left
    as it was); "untie": tied layers get separate weight copies first, so each may have its own spec.
    The shared groups are listed on ``model.qat_tied``. ``example_inputs``: as in :func:`qat.prepare`.
    """
    if tied not in TIED_POLICIES:
        raise ValueError(f"tied: {tied!r} is not valid; allowed: {', '.join(TIED_POLICIES)}")
    cfg = QuantConfig.from_dict(config)
    if cfg.attention is not None:
        add_attention_hooks(model)
    groups = tied_groups(model)
    if tied == "untie":
        untie(model, groups)
        groups = []
    core_prepare(model, cfg, example_inputs=example_inputs)
    try:
        model.qat_tied = share_tied_quantizers(model, groups)  # type: ignore[assignment]
    except TiedWeightError:
        unprepare(model)
        raise
    return model
