"""Fake-quantized inputs of the attention matmuls (q, k, v): the hook points, and for Hugging Face models
the attention functions that call them.

A model exposes hook points as ``nn.Identity`` modules named ``q_quant`` / ``k_quant`` / ``v_quant`` on the
inputs of its attention matmuls (``qat.models.gpt`` does); with ``quant.attention`` set, ``prepare`` turns
them into activation fake-quantizers. Hugging Face attention modules have no such modules, and their q·kᵀ
and attn·v products happen inside a shared attention function, not in a layer we could swap. So for them
(recognised by their ``config``, ``scaling`` and ``is_causal`` attributes, once ``transformers`` is imported)
``prepare`` adds the three hooks and switches the model to an attention function registered here
("qat_sdpa" / "qat_eager") that passes q, k and v through those hooks and then calls the stock sdpa /
eager implementation. With the hooks left as identities the outputs are bit-identical to the stock path.

The softmax probabilities (the other input of attn·v) stay in float: the fused sdpa kernel never exposes
them, and integer-attention kernels commonly keep them in higher precision.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from qat.config import QuantConfigError, QuantSpec
from qat.quant.quantizer import FakeQuantizer

ATTENTION_HOOKS = ("q_quant", "k_quant", "v_quant")
# Stock implementation -> the name of its fake-quantizing twin (registered with transformers on first use).
QAT_ATTENTION = {"sdpa": "qat_sdpa", "eager": "qat_eager"}
HF_ATTENTION_ATTRS = ("config", "scaling", "is_causal")

Point = tuple[nn.Module, str, str]  # (owner, qualified hook name, hook attribute)


class AttentionHookError(QuantConfigError):
    """The model cannot take attention hooks (none at all, or an unsupported attention implementation)."""


def hf_attention_modules(model: nn.Module) -> list[nn.Module]:
    """Hugging Face attention modules (BERT, GPT-2, Llama, ViT, T5, Whisper, ...): they call the attention
    interface with ``self.scaling`` and ``self.is_causal``; ``self.config`` names the implementation."""
    if "transformers" not in sys.modules:  # no model holds one
        return []
    return [m for m in model.modules() if all(hasattr(m, a) for a in HF_ATTENTION_ATTRS)]


def hook_points(model: nn.Module) -> list[Point]:
    """Every attention hook point: the identity hooks the model has and those its Hugging Face attention
    modules get. Raises :class:`AttentionHookError` when there is none or the implementation is not
    supported; changes nothing."""
    hf = hf_attention_modules(model)
    for impl in {m.config._attn_implementation for m in hf}:
        if impl not in QAT_ATTENTION and impl not in QAT_ATTENTION.values():
            raise AttentionHookError(
                f"quant.attention: attn_implementation {impl!r} is not supported; allowed: "
                f"{', '.join(QAT_ATTENTION)} (load the model with attn_implementation='sdpa')"
            )
    ids = {id(m) for m in hf}
    points = []
    for qname, mod in model.named_modules():
        for hook in ATTENTION_HOOKS:
            current = getattr(mod, hook, None)
            if isinstance(current, nn.Identity) or (current is None and id(mod) in ids):
                points.append((mod, f"{qname}.{hook}" if qname else hook, hook))
    if not points:
        raise AttentionHookError(
            "quant.attention: the model exposes no attention hook points (q_quant/k_quant/v_quant "
            "nn.Identity modules, or Hugging Face attention modules with config, scaling and is_causal); "
            "set quant.attention=null"
        )
    return points


def add_attention_hooks(model: nn.Module) -> nn.Module:
    """Give every Hugging Face attention module identity ``q_quant`` / ``k_quant`` / ``v_quant`` hooks and
    route its attention through the matching ``qat_*`` function. In place; idempotent; returns ``model``.

    ``prepare`` does this itself; a fresh skeleton needs it before loading an export that quantized
    attention. Raises :class:`AttentionHookError` for a model without hook points."""
    for mod, _, hook in hook_points(model):
        if not hasattr(mod, hook):
            setattr(mod, hook, nn.Identity())
    _route(model)
    return model


def attention_quantizers(model: nn.Module, spec: QuantSpec) -> list[tuple[Point, FakeQuantizer]]:
    """A quantizer for every hook point (see :func:`hook_points`), built, not attached."""
    return [(p, FakeQuantizer(spec, "activation", name=p[1])) for p in hook_points(model)]


def attach(model: nn.Module, quantizers: list[tuple[Point, FakeQuantizer]]) -> None:
    """Set the quantizers built by :func:`attention_quantizers` as the hooks (the ``prepare`` commit)."""
    for (mod, _, hook), fq in quantizers:
        setattr(mod, hook, fq)
    if quantizers:
        _route(model)


def detach(mod: nn.Module) -> None:
    """Turn the attention quantizers of ``mod`` back into identity hooks (``unprepare``)."""
    for hook in ATTENTION_HOOKS:
        if isinstance(getattr(mod, hook, None), FakeQuantizer):
            setattr(mod, hook, nn.Identity())


def _route(model: nn.Module) -> None:
    hf = hf_attention_modules(model)
    if hf:
        _register()
    for m in hf:
        impl = m.config._attn_implementation
        m.config._attn_implementation = QAT_ATTENTION.get(impl, impl)


def _quantizing(stock: Callable[[nn.Module], Callable[..., Any]]) -> Callable[..., Any]:
    """An attention function: the one ``stock(module)`` returns, on q, k, v passed through the hooks."""

    def attention(
        module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        attention_mask: Any, **kw: Any,
    ) -> tuple[torch.Tensor, Any]:  # fmt: skip
        hooks = (getattr(module, h, None) for h in ATTENTION_HOOKS)
        q, k, v = (t if fq is None else fq(t) for fq, t in zip(hooks, (query, key, value), strict=True))
        return stock(module)(module, q, k, v, attention_mask, **kw)

    return attention


def _model_eager(module: nn.Module) -> Callable[..., Any]:
    """The eager attention of the module's own modeling file (each architecture's differs: GQA repeat,
    upcasting)."""
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise AttentionHookError(
            f"{type(module).__name__}: its modeling file has no eager_attention_forward; "
            "use attn_implementation='sdpa'"
        )
    return eager


@functools.cache
def _register() -> None:
    """Register the ``qat_*`` attention functions and their masks with transformers (once)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register("qat_sdpa", _quantizing(lambda _: sdpa_attention_forward))
    AttentionInterface.register("qat_eager", _quantizing(_model_eager))
    # Masks are built per implementation name: ours need exactly the masks of the implementation they wrap.
    AttentionMaskInterface.register("qat_sdpa", sdpa_mask)
    AttentionMaskInterface.register("qat_eager", eager_mask)
