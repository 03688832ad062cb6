"""Hugging Face ``transformers`` support (an optional extra: ``pip install 'qatkit[transformers]'``).

Importing this package registers GPT-2's ``Conv1D`` as a quantizable layer type. Public API:
``prepare`` (``qat.prepare`` + attention hooks + tied-weight policy), ``add_attention_hooks``,
``export`` / ``load_quantized`` (``qat.export`` that also handles Conv1D), ``QuantHFConv1D``,
``tied_groups`` / ``TiedWeightError``, and the model builders in :mod:`qat.hf.models`.
"""

try:
    import transformers  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without the extra installed
    raise ImportError(
        "qat.hf needs the optional dependency 'transformers': pip install 'qatkit[transformers]'"
    ) from e

from transformers.pytorch_utils import Conv1D

from qat.hf.attention import AttentionHookError, add_attention_hooks, has_attention_hooks
from qat.hf.exporting import export, linearize, load_quantized
from qat.hf.modules import QuantHFConv1D
from qat.hf.prepare import prepare
from qat.hf.tied import TiedWeightError, share_tied_quantizers, tied_groups, untie
from qat.quant.modules import register_quant_module

register_quant_module(Conv1D, QuantHFConv1D)

__all__ = [
    "AttentionHookError",
    "QuantHFConv1D",
    "TiedWeightError",
    "add_attention_hooks",
    "export",
    "has_attention_hooks",
    "linearize",
    "load_quantized",
    "prepare",
    "share_tied_quantizers",
    "tied_groups",
    "untie",
]
