"""Fake-quantized attention-matmul inputs for Hugging Face models, through transformers' AttentionInterface.

The rewriting pass turns ``nn.Identity`` modules named ``q_quant`` / ``k_quant`` / ``v_quant`` into
activation fake-quantizers when ``quant.attention`` is set. Hugging Face attention modules have no such
modules, and their q·kᵀ and attn·v products happen inside a shared attention function, not in a layer
we could swap. So :func:`add_attention_hooks` (1) adds the three identity hooks to every attention module
and (2) switches the model to an attention function registered here ("qat_sdpa" / "qat_eager") that
passes q, k and v through those hooks and then calls the stock sdpa / eager implementation. Models without
hooks are untouched; with the hooks left as identities the outputs are bit-identical to the stock path.

The softmax probabilities (the other input of attn·v) stay in float: the fused sdpa kernel never exposes
them, and integer-attention kernels commonly keep them in higher precision.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from qat.rewrite import ATTENTION_HOOKS

# Stock implementation -> the name of its fake-quantizing twin (registered below).
QAT_ATTENTION = {"sdpa": "qat_sdpa", "eager": "qat_eager"}


class AttentionHookError(ValueError):
    """The model cannot take attention hooks (no attention modules, or an unsupported implementation)."""


def _quantize_qkv(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out = []
    for hook, t in zip(ATTENTION_HOOKS, (query, key, value), strict=True):
        fq = getattr(module, hook, None)
        out.append(t if fq is None else fq(t))
    return out[0], out[1], out[2]


def qat_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    **kw: Any,
) -> tuple[torch.Tensor, Any]:
    """transformers' sdpa attention on fake-quantized q, k, v."""
    query, key, value = _quantize_qkv(module, query, key, value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)


def qat_eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    **kw: Any,
) -> tuple[torch.Tensor, Any]:
    """The model's own eager attention on fake-quantized q, k, v.

    Each architecture's ``eager_attention_forward`` differs (GQA repeat, upcasting), so it is looked up in
    the modeling file of the module's class.
    """
    eager: Callable[..., Any] | None = getattr(
        sys.modules[type(module).__module__], "eager_attention_forward", None
    )
    if eager is None:
        raise AttentionHookError(
            f"{type(module).__name__}: its modeling file has no eager_attention_forward; "
            "use attn_implementation='sdpa'"
        )
    query, key, value = _quantize_qkv(module, query, key, value)
    return eager(module, query, key, value, attention_mask, **kw)


AttentionInterface.register("qat_sdpa", qat_sdpa_attention)
AttentionInterface.register("qat_eager", qat_eager_attention)
# Masks are built per implementation name: ours need exactly the masks of the implementation they wrap.
AttentionMaskInterface.register("qat_sdpa", sdpa_mask)
AttentionMaskInterface.register("qat_eager", eager_mask)


def is_attention_module(m: nn.Module) -> bool:
    """Hugging Face attention modules (BERT, GPT-2, Llama, ViT, ...) call the attention interface with
    ``self.scaling`` and ``self.is_causal``, reading the implementation from ``self.config``."""
    return all(hasattr(m, a) for a in ("config", "scaling", "is_causal"))


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if is_attention_module(m)]


def add_attention_hooks(model: nn.Module) -> nn.Module:
    """Give every attention module identity ``q_quant`` / ``k_quant`` / ``v_quant`` hooks and route the
    model's attention through the matching ``qat_*`` function. In place; idempotent; returns ``model``.

    Call it before :func:`qat.prepare` with ``quant.attention`` set (``qat.hf.prepare`` does), and on a
    fresh skeleton before loading an export that quantized attention (``qat.hf.load_quantized`` does).
    """
    mods = attention_modules(model)
    if not mods:
        raise AttentionHookError(
            f"quant.attention: {type(model).__name__} has no Hugging Face attention modules "
            "(modules with config, scaling and is_causal); set quant.attention=null"
        )
    configs = {id(m.config): m.config for _, m in mods}
    for cfg in configs.values():
        impl = cfg._attn_implementation
        if impl in QAT_ATTENTION.values():
            continue
        if impl not in QAT_ATTENTION:
            raise AttentionHookError(
                f"quant.attention: attn_implementation {impl!r} is not supported; allowed: "
                f"{', '.join(QAT_ATTENTION)} (load the model with attn_implementation='sdpa')"
            )
        cfg._attn_implementation = QAT_ATTENTION[impl]
    for _, m in mods:
        for hook in ATTENTION_HOOKS:
            if not hasattr(m, hook):
                setattr(m, hook, nn.Identity())
    return model


def has_attention_hooks(model: nn.Module) -> bool:
    return any(isinstance(getattr(m, "q_quant", None), nn.Module) for _, m in attention_modules(model))
