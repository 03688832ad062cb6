"""Export and reload Hugging Face models through :mod:`qat.deploy`.

BERT, Llama, ViT and other models built from ``nn.Linear`` / ``nn.Embedding`` / ``nn.Conv2d`` go through
``qat.deploy.export`` / ``qat.deploy.load_quantized`` unchanged. GPT-2's ``Conv1D`` is not a layer the
integer runtime knows, but it is a linear layer with a transposed weight: the export is taken from a copy
of the model in which every (quantized) Conv1D is the equivalent (quantized) ``nn.Linear`` with the same
quantizers, and the skeleton is converted the same way before loading. The stored layers are then plain
``linear`` entries (integer matmul where the formats allow), and nothing else changes.

``model`` outputs are often ``ModelOutput`` objects: pass ``forward=qat.hf.models.logits`` (or any
``forward(model, batch) -> tensor``) for the verification, as with ``qat.deploy.export``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from qat.deploy import ExportReport, schema
from qat.deploy import export as core_export
from qat.deploy import load_quantized as core_load_quantized
from qat.deploy.verify import Forward, default_forward
from qat.hf.attention import add_attention_hooks, has_attention_hooks
from qat.hf.modules import conv1d_as_linear
from qat.rewrite import ATTENTION_HOOKS


def linearize(model: nn.Module) -> nn.Module:
    """Replace every ``Conv1D`` / ``QuantHFConv1D`` by the equivalent (quantized) ``nn.Linear``, in place."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, Conv1D):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, conv1d_as_linear(mod))
    return model


def has_conv1d(model: nn.Module) -> bool:
    return any(isinstance(m, Conv1D) for m in model.modules())


def export(model: nn.Module, out_dir: str | os.PathLike, **kwargs: Any) -> ExportReport:
    """``qat.deploy.export`` for Hugging Face models; ``model`` itself is not modified."""
    if has_conv1d(model):
        model = linearize(copy.deepcopy(model))
    kwargs["forward"] = _MarkedForward(kwargs.get("forward", default_forward))
    return core_export(model, out_dir, **kwargs)


def load_quantized(out_dir: str | os.PathLike, model: nn.Module, **kwargs: Any) -> nn.Module:
    """``qat.deploy.load_quantized`` for Hugging Face skeletons (a float model of the same config).

    Adds the attention hooks when the export quantized attention inputs, and converts Conv1D layers.
    """
    cfg = schema.read_config(Path(out_dir) / schema.CONFIG_FILE)
    hooked = any(name.rpartition(".")[2] in ATTENTION_HOOKS for name in cfg["layers"])
    if hooked and not has_attention_hooks(model):
        add_attention_hooks(model)
    return add_dtype_markers(core_load_quantized(out_dir, linearize(model), **kwargs))


def add_dtype_markers(runtime: nn.Module) -> nn.Module:
    """Give integer-GEMM layers of a runtime model an empty float ``weight``, in place.

    Those layers keep only int8 codes (``weight`` is None), but transformers code reads a layer's
    ``weight.dtype`` (ViT casts pixel values to its patch projection's dtype). The marker holds no
    values, so nothing can silently compute with it.
    """
    for mod in runtime.modules():
        if getattr(mod, "uses_int_mm", False) and getattr(mod, "weight", 0) is None:
            mod.weight = torch.empty(0, dtype=torch.float32, device=mod.w_scale.device)
    return runtime


class _MarkedForward:
    """The export's ``forward`` with :func:`add_dtype_markers` applied to the model it is given, so the
    exporter's own verification can run the reloaded runtime of models such as ViT."""

    def __init__(self, forward: Forward) -> None:
        self.forward = forward

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return self.forward(add_dtype_markers(model), batch)
