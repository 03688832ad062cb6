"""The deploy registry, as data: the export targets, the layer ops of the format, the layer types.

* ``TARGETS``: what an export writes. ``safetensors`` is the native format (``model.safetensors`` +
  ``quant_config.json``, always written, loaded into the integer runtime by ``load_quantized``); every
  other target writes its file from it (``onnx``: a QDQ ``model.onnx``). A new target is an entry here,
  its builder for each op in ``OPS``, and a module with ``write(job) -> figures``.
* ``OPS``: the ops of ``quant_config.json`` (``layers[...].op``), each with, per target, the builder of
  the module that replaces a stored layer (``build(StoredLayer) -> nn.Module``).
* ``LAYERS``: float layer type -> its op and, for a type stored as another module (GPT-2's ``Conv1D`` as
  the ``nn.Linear`` it computes, weight transposed), the conversion. Types of optional packages are in
  ``LAZY_LAYERS`` by dotted name, resolved like the quantized-layer registry
  (:func:`qat.quant.modules.resolve_lazy`). Other registered layer types are op ``generic``.
"""

from __future__ import annotations

import copy
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from qat.deploy.qdq import QdqAct, QdqConv, QdqEmbedding, QdqLinear
from qat.deploy.runtime import DequantLayer, IntConv, IntEmbedding, IntLinear, StoredLayer
from qat.deploy.verify import Forward
from qat.quant.modules import deployed, resolve_lazy

Builder = Callable[[StoredLayer], nn.Module]
NATIVE = "native"


@dataclass(frozen=True)
class Op:
    """A layer op of the format: its name in ``quant_config.json`` and, per target, its builder."""

    name: str
    build: Mapping[str, Builder]


@dataclass(frozen=True)
class Layer:
    """How a float layer type is stored: its ``op``, and ``stored_as`` (the module the format stores in
    its place, built from a skeleton's layer) when it is stored as another layer type."""

    op: Op
    stored_as: Callable[[nn.Module], nn.Module] | None = None


@dataclass
class ExportJob:
    """What a target's ``write`` gets: the export directory being written (its native files complete),
    a fresh float ``skeleton()`` to load them into, the fake-quant ``reference`` model, the verification
    ``batches`` (None: no verification), an ``example`` input to trace with (None: none given), the task,
    the forward function of the verification and the model's ``tokenizer`` (a Hugging Face tokenizer, for
    the targets that ship one; None: none given)."""

    directory: Path
    skeleton: Callable[[], nn.Module]
    reference: nn.Module
    batches: list[Any] | None
    example: Any
    task: str | None
    forward: Forward
    tokenizer: Any = None


@dataclass(frozen=True)
class Target:
    """An export target: its file (or directory) in the export directory; ``label``, its row in the
    before/after tables; the dotted names of its ``write(job: ExportJob) -> figures`` (None for the native
    target, which the exporter writes itself) and of its ``run(path, skeleton, threads) -> predict``, the
    engine that runs the written file for ``qat-eval`` (``predict(inputs) -> logits``; ``skeleton``: a
    fresh float model; None when the engine is not installed). Both are imported when the target is used,
    with whatever optional packages they need."""

    file: str
    label: str
    run: str
    write: str | None = None

    def writer(self) -> Callable[[ExportJob], dict[str, Any]]:
        assert self.write is not None, "the native target is written by the exporter itself"
        return pkgutil.resolve_name(self.write)

    def runner(self) -> Callable[[Path, nn.Module, int | None], Callable[[Any], Any] | None]:
        return pkgutil.resolve_name(self.run)


def _activation(layer: StoredLayer) -> nn.Module:
    return layer.act  # type: ignore[return-value]  # a standalone quantizer: the module is the quantizer


def _qdq_activation(layer: StoredLayer) -> nn.Module:
    return QdqAct(layer.act)  # type: ignore[arg-type]


TARGETS = {
    NATIVE: Target("model.safetensors", "integer (export)", "qat.deploy.evaluate.run_native"),
    "onnx": Target(
        "model.onnx", "onnx (onnxruntime)", "qat.deploy.evaluate.run_onnx", "qat.deploy.onnx.write"
    ),
    "compressed-tensors": Target(  # a directory that transformers' from_pretrained (and vLLM) loads
        "compressed-tensors",
        "compressed-tensors (transformers)",
        "qat.deploy.compressed_tensors.run",
        "qat.deploy.compressed_tensors.write",
    ),
    "gguf": Target("model.gguf", "gguf (llama.cpp)", "qat.deploy.llamacpp.run", "qat.deploy.gguf.write"),
}

LINEAR = Op("linear", {NATIVE: IntLinear, "onnx": QdqLinear})
CONV1D = Op("conv1d", {NATIVE: IntConv, "onnx": QdqConv})
CONV2D = Op("conv2d", {NATIVE: IntConv, "onnx": QdqConv})
EMBEDDING = Op("embedding", {NATIVE: IntEmbedding, "onnx": QdqEmbedding})
GENERIC = Op("generic", {NATIVE: DequantLayer, "onnx": DequantLayer})  # any other registered layer type
ACTIVATION = Op("activation", {NATIVE: _activation, "onnx": _qdq_activation})  # standalone quantizers
OPS = {op.name: op for op in (LINEAR, CONV1D, CONV2D, EMBEDDING, GENERIC, ACTIVATION)}

LAYERS: dict[type[nn.Module], Layer] = {
    nn.Linear: Layer(LINEAR),
    nn.Conv1d: Layer(CONV1D),
    nn.Conv2d: Layer(CONV2D),
    nn.Embedding: Layer(EMBEDDING),
}


def _conv1d_as_linear(mod: nn.Module) -> nn.Module:
    from qat.quant.conv1d import conv1d_as_linear  # imports transformers, which the model already did

    return conv1d_as_linear(mod)


HF_CONV1D = Layer(LINEAR, stored_as=_conv1d_as_linear)
LAZY_LAYERS = {"transformers.pytorch_utils.Conv1D": "qat.deploy.registry.HF_CONV1D"}


def layers() -> dict[type[nn.Module], Layer]:
    """``LAYERS`` with the lazy entries of the optional packages imported so far."""
    return resolve_lazy(LAYERS, LAZY_LAYERS)


def op_of(float_type: type[nn.Module]) -> Op:
    """The op a float layer type is stored as (``generic`` for registered types without an entry)."""
    entry = layers().get(float_type)
    return GENERIC if entry is None else entry.op


def targets(names: str | list[str] | tuple[str, ...]) -> list[str]:
    """The targets an export writes for ``names`` (one name or several; the native one always, first)."""
    names = [names] if isinstance(names, str) else list(names)
    bad = [f for f in names if f not in TARGETS]
    if bad:
        raise ValueError(f"target: {bad[0]!r} is not valid; allowed: {', '.join(TARGETS)}")
    return [NATIVE, *(n for n in names if n != NATIVE)]


def stored_form(model: nn.Module) -> nn.Module:
    """Replace, in place, every layer of a type the format stores as another module by that module (GPT-2's
    ``Conv1D`` by the equivalent ``nn.Linear``): done to the model export encodes and to the skeleton an
    export is loaded into, so both hold the same layers. Returns ``model``."""
    registry = layers()
    for name, mod in list(model.named_modules()):
        entry = registry.get(type(mod))
        if entry is not None and entry.stored_as is not None:
            model.set_submodule(name, entry.stored_as(mod))
    return model


def encoded(model: nn.Module) -> nn.Module:
    """The model as export encodes it: a copy in which each layer that computes as another module in eval
    mode is that module (``deployable()``: conv+BN pairs trained folded, GPT-2's quantized Conv1D) and each
    layer type the format stores as another is converted (:func:`stored_form`);
    ``model`` itself when there is none. ``model`` is never changed."""
    converted = {t for t, entry in layers().items() if entry.stored_as is not None}
    if any(callable(getattr(m, "deployable", None)) or type(m) in converted for m in model.modules()):
        return stored_form(deployed(copy.deepcopy(model))).eval()
    return model
