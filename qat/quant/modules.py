"""Quantized layers: the float layer's own forward with fake-quantized weight and (optionally) input.

Each class subclasses its float counterpart (so ``isinstance`` checks in user code keep working), reuses
the float module's ``Parameter`` objects (so tied weights stay tied and optimizers see the same tensors),
and has the pair ``from_float`` / ``to_float``. A layer that export must encode as another module (Conv-BN
folded into the conv, GPT-2's Conv1D as a linear) defines ``deployable()`` returning it (:func:`deployed`).

The registry ``QUANT_MODULES`` is plain data, ``{float type: quantized type}``. Layer types of optional
packages (GPT-2's ``transformers.pytorch_utils.Conv1D``) are listed by dotted name in ``LAZY_QUANT_MODULES``
and added by :func:`resolve_lazy` once the float type's module is imported: a model can only hold an
instance of a type whose module is imported, so every model is covered while ``import qat`` imports no
optional package. Every read of the registry goes through :func:`quant_modules`.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from qat.config import QuantSpec
from qat.quant import intgemm
from qat.quant.layer_function import Operand, layer_op, operand
from qat.quant.opcache import KeepsOperands, state_key, tensors_key
from qat.quant.quantizer import FakeQuantizer
from qat.quant.smooth import Smoother


def _make_quantizers(
    module: nn.Module,
    weight: torch.Tensor,
    weight_spec: QuantSpec | None,
    act_spec: QuantSpec | None,
    act_channels: int,
    act_axis: int,
    name: str,
) -> None:
    """Attach ``weight_quant`` / ``input_quant`` (``None`` where that side stays float)."""
    module.weight_quant = (
        None if weight_spec is None else FakeQuantizer(weight_spec, "weight", tuple(weight.shape), name=name)
    )
    module.input_quant = (
        None
        if act_spec is None
        else FakeQuantizer(act_spec, "activation", (act_channels,), name=name, act_axis=act_axis)
    )


def _copy_params(dst: nn.Module, src: nn.Module) -> None:
    """Move the float module's parameters and buffers (same objects) onto the new module."""
    for pname, p in src.named_parameters(recurse=False):
        setattr(dst, pname, p)
    for bname, b in src.named_buffers(recurse=False):
        setattr(dst, bname, b)
    dst.train(src.training)


# ----------------------------------------------------------------------------------------------- eval path
# In eval mode without autograd, a layer whose weight and input formats allow an integer GEMM computes it
# on the integer codes (``qat.quant.intgemm``), exactly as the exported integer runtime does: the metric
# you evaluate is the metric you deploy, bit for bit. The value differs from the float fake-quant forward
# only by float32 summation noise; training (and anything that needs gradients) uses the float forward.
# The GEMM operand of the weight is kept while the layer's state is unchanged (qat.quant.opcache), so
# validation pays for the weight once per optimizer step.
def int_gemm_eval(layer: nn.Module, weight: torch.Tensor) -> bool:
    """Whether ``layer`` (with quantizers ``weight_quant`` / ``input_quant``) takes the integer eval path."""
    wq, aq = layer.weight_quant, layer.input_quant
    if layer.training or torch.is_grad_enabled() or wq is None or aq is None:
        return False
    if wq.training or aq.training or not (wq.fake_quant_on and aq.fake_quant_on):
        return False
    ws, acts = wq.spec, aq.spec
    two_scales = wq.scale_neg is not None
    return intgemm.weight_int_ok(ws.kind, ws.granularity, ws.axis, weight.dim(), two_scales) and (
        intgemm.act_int_ok(acts.kind, acts.granularity, acts.dynamic)
    )


def eval_int_weight(
    layer: nn.Module, weight: Callable[[], torch.Tensor], im2col_channels: int | None = None
) -> intgemm.IntWeight:
    """The GEMM operand of ``layer``'s weight (``weight()``: ``[out, ...]``, what ``weight_quant``
    quantizes), packed for the kernel (im2col column order for convolutions), after the state update a
    forward pass makes. Kept in the layer's "weight" cache while the layer's state is unchanged:
    then the weight is not read at all (the state update would give the same state: a weight observer
    sees the same weight, a learned scale is initialised once)."""
    wq = layer.weight_quant

    def build() -> intgemm.IntWeight:
        w = weight()
        wq.update_state(w)
        q, s, z = wq.codes(w)
        # An offset only for asymmetric int formats (as export stores it); binary/ternary z is a threshold.
        zero_point = z if wq.spec.kind == "int" and not wq.spec.symmetric else None
        iw = intgemm.int_weight(q.reshape(w.shape[0], -1), s, zero_point, wq.qmax)
        if im2col_channels is not None:
            iw = intgemm.conv_weight_im2col_order(iw, im2col_channels)
        return intgemm.pack(iw)

    cache = layer.operand_cache("weight")
    return cache.get(lambda: state_key(layer, layer.input_quant, wq.qmin, wq.qmax), build)


def weight_operand(layer: nn.Module, weight: Callable[[], torch.Tensor]) -> Operand:
    """``weight()`` as the operand of ``layer``'s op, fake-quantized by ``layer.weight_quant``. In eval mode
    without autograd (validation, the before/after table) the fake-quantized value is kept in the layer's
    "fake weight" cache while the layer's state is unchanged, as the integer path keeps its operand: a rule
    recomputed from the weight (llama.cpp's block formats) or an observer is paid once per change, not per
    call."""
    wq = layer.weight_quant
    if layer.training or torch.is_grad_enabled() or wq is None or wq.training:
        return operand(wq, weight())
    cache = layer.operand_cache("fake weight")
    return Operand(cache.get(lambda: state_key(layer, layer.input_quant), lambda: wq(weight())))


def act_operand(
    owner: KeepsOperands, aq: FakeQuantizer, x: torch.Tensor, w: intgemm.IntWeight
) -> intgemm.ActQuant:
    """The activation side of ``owner``'s integer GEMM of ``x`` (quantized by ``aq``) with ``w``. Static
    formats keep it in ``owner``'s "act" cache while ``aq``'s scale and zero point, its bit width, the
    weight operand and the shape of one sample (LSQ's gradient scale, which rounds into the value of a
    learned scale, depends on it) are unchanged; dynamic formats compute it from each ``x``."""

    def build() -> tuple[intgemm.IntWeight, intgemm.ActQuant]:  # w is kept: its id is in the key
        s, z = aq.qparams(x)
        shape = (-1, 1) if aq.spec.granularity == "per_token" else (1,)  # one scale per row / in all
        return w, intgemm.act_quant(
            s.reshape(shape), z.reshape(shape), aq.qmin, aq.qmax, aq.spec.symmetric, w
        )

    if aq.spec.dynamic:
        return build()[1]
    parts = (aq.scale, aq.zero_point)
    cache = owner.operand_cache("act")
    return cache.get(lambda: tensors_key(parts, aq.qmin, aq.qmax, x.shape[1:], id(w)), build)[1]


def int_linear(
    owner: KeepsOperands, aq: FakeQuantizer, x: torch.Tensor, w: intgemm.IntWeight, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x`` quantized by ``aq`` times ``w`` as an integer GEMM: the eval path's and the runtime's code
    (``owner``: the layer, which keeps the operands). The GEMM's float32 result is given in ``x``'s dtype
    (a model cast to bf16 gets bf16, as from its float layer)."""
    return intgemm.linear(x, act_operand(owner, aq, x, w), w, bias).to(x.dtype)


def int_conv(
    conv: Any, aq: FakeQuantizer, x: torch.Tensor, w: intgemm.IntWeight, bias: torch.Tensor | None
) -> torch.Tensor:
    """The convolution ``conv`` describes (kernel, stride, padding, dilation) on ``x`` quantized by
    ``aq``, as an integer im2col GEMM: the eval path's and the runtime's code."""
    return intgemm.conv(
        x, act_operand(conv, aq, x, w), w, bias, conv.kernel_size, conv.stride, conv.padding, conv.dilation
    ).to(x.dtype)  # as int_linear


def effective_weight(layer: nn.Module) -> torch.Tensor:
    """The tensor ``layer.weight_quant`` quantizes: ``layer.effective_weight()`` where the layer defines it
    (SmoothQuant's ``W * s``, Conv1D's ``[out, in]`` transpose), else ``layer.weight``."""
    return layer.effective_weight() if hasattr(layer, "effective_weight") else layer.weight


def linear_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The forward of a quantized linear-like layer (``QuantLinear``, GPT-2's ``QuantHFConv1D``): SmoothQuant
    scaling of the input, then the integer eval path or the float fake-quant forward on
    ``layer.effective_weight()`` (``[out, in]``)."""
    if layer.smooth is not None:
        x = layer.smooth.scale_input(x)
    if int_gemm_eval(layer, layer.weight):  # the same rank as the effective weight
        w = eval_int_weight(layer, layer.effective_weight)
        layer.input_quant.update_state(x)
        return int_linear(layer, layer.input_quant, x, w, layer.bias)
    x, w = operand(layer.input_quant, x), weight_operand(layer, layer.effective_weight)
    return layer_op("linear", (), x, w, layer.bias)


def conv_int_ok(conv: nn.modules.conv._ConvNd, aq: FakeQuantizer | None) -> bool:
    """Convolutions the integer path covers: groups 1, zero padding given as numbers, per-tensor input."""
    return (
        conv.groups == 1
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and aq is not None
        and aq.spec.granularity == "per_tensor"
    )


def eval_int_conv(conv: nn.modules.conv._ConvNd, x: torch.Tensor, weight: Callable[[], torch.Tensor],
                  bias: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """The fake-quant convolution computed as an integer im2col GEMM (see :func:`conv_int_ok`);
    ``weight()`` gives the weight the quantizer sees (called only when the cached operand is stale)."""
    w = eval_int_weight(conv, weight, conv.in_channels)
    conv.input_quant.update_state(x)
    return int_conv(conv, conv.input_quant, x, w, bias)


class QuantLinear(KeepsOperands, nn.Linear):
    """``nn.Linear`` with fake-quantized weight and input, optionally SmoothQuant-scaled (``smooth``)."""

    weight_quant: FakeQuantizer | None
    input_quant: FakeQuantizer | None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.smooth: Smoother | None = None

    def enable_smoothing(self, alpha: float) -> None:
        """Attach SmoothQuant factors, fitted by the next :func:`qat.calibrate` (:mod:`qat.quant.smooth`)."""
        self.smooth = Smoother(self.in_features, alpha).to(self.weight.device)

    @classmethod
    def from_float(
        cls, mod: nn.Linear, weight_spec: QuantSpec | None, act_spec: QuantSpec | None, name: str = ""
    ) -> QuantLinear:
        q = cls(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta")
        _copy_params(q, mod)
        _make_quantizers(q, mod.weight, weight_spec, act_spec, mod.in_features, -1, name)
        return q

    def to_float(self) -> nn.Linear:
        m = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        _copy_params(m, self)
        return m

    def float_weight(self) -> torch.Tensor:
        """The float weight in ``[out, in]`` layout (before smoothing)."""
        return self.weight

    def effective_weight(self) -> torch.Tensor:
        """The weight the quantizer sees: ``W * s`` with SmoothQuant on, else ``W``."""
        return self.weight if self.smooth is None else self.smooth.scale_weight(self.weight)

    def quantized_weight(self) -> torch.Tensor:
        w = self.effective_weight()
        return w if self.weight_quant is None else self.weight_quant(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_forward(self, x)


# Constructor arguments that a quantized twin (and the float layer given back) copies from a layer.
_CONV_ARGS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
              "padding_mode")  # fmt: skip
_EMBEDDING_ARGS = ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                   "scale_grad_by_freq", "sparse")  # fmt: skip


def _args(mod: nn.Module, names: tuple[str, ...]) -> dict[str, Any]:
    return {n: getattr(mod, n) for n in names}


def _conv_kwargs(mod: nn.modules.conv._ConvNd) -> dict[str, Any]:
    return {**_args(mod, _CONV_ARGS), "bias": mod.bias is not None}


class QuantConv(KeepsOperands):
    """Base of the quantized convolutions: the float convolution's own ``_conv_forward`` on the
    fake-quantized weight and input (per-channel activations along dim 1); a subclass names its float
    type (``float_type``) and derives from it."""

    float_type: ClassVar[type[nn.modules.conv._ConvNd]]
    weight_quant: FakeQuantizer | None
    input_quant: FakeQuantizer | None

    @classmethod
    def from_float(
        cls, mod: nn.modules.conv._ConvNd, weight_spec: QuantSpec | None, act_spec: QuantSpec | None,
        name: str = "",
    ) -> Any:  # fmt: skip
        q = cls(**_conv_kwargs(mod), device="meta")
        _copy_params(q, mod)
        _make_quantizers(q, mod.weight, weight_spec, act_spec, mod.in_channels, 1, name)
        return q

    def to_float(self) -> nn.modules.conv._ConvNd:
        m = self.float_type(**_conv_kwargs(self), device="meta")
        _copy_params(m, self)
        return m

    def quantized_weight(self) -> torch.Tensor:
        return self.weight if self.weight_quant is None else self.weight_quant(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if int_gemm_eval(self, self.weight) and conv_int_ok(self, self.input_quant):
            return eval_int_conv(self, x, lambda: self.weight, self.bias)
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            x = x if self.input_quant is None else self.input_quant(x)
            return self._conv_forward(x, self.quantized_weight(), self.bias)
        params = (self.stride, self.padding, self.dilation, self.groups)
        w = weight_operand(self, lambda: self.weight)
        return layer_op("conv", params, operand(self.input_quant, x), w, self.bias)


class QuantConv1d(QuantConv, nn.Conv1d):
    """``nn.Conv1d`` with fake-quantized weight and input."""

    float_type = nn.Conv1d


class QuantConv2d(QuantConv, nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized weight and input."""

    float_type = nn.Conv2d


class QuantEmbedding(KeepsOperands, nn.Embedding):
    """``nn.Embedding`` with a fake-quantized table (its input is indices: no activation quantizer)."""

    weight_quant: FakeQuantizer | None
    input_quant: FakeQuantizer | None

    @classmethod
    def from_float(
        cls, mod: nn.Embedding, weight_spec: QuantSpec | None, act_spec: QuantSpec | None, name: str = ""
    ) -> QuantEmbedding:
        q = cls(**_args(mod, _EMBEDDING_ARGS), device="meta")
        _copy_params(q, mod)
        _make_quantizers(q, mod.weight, weight_spec, None, 0, -1, name)
        return q

    def to_float(self) -> nn.Embedding:
        m = nn.Embedding(**_args(self, _EMBEDDING_ARGS), device="meta")
        _copy_params(m, self)
        return m

    def quantized_weight(self) -> torch.Tensor:
        return self.weight if self.weight_quant is None else self.weight_quant(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = weight_operand(self, lambda: self.weight).value()
        return F.embedding(
            x, w, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse
        )


# Float module type -> quantized type. Data, not code: users add their own layers with
# ``register_quant_module`` (a quantized type needs ``from_float(mod, weight_spec, act_spec, name)``).
QUANT_MODULES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: QuantLinear,
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Embedding: QuantEmbedding,
}
# The same for layer types of optional packages, by dotted name (see the module docstring).
LAZY_QUANT_MODULES: dict[str, str] = {"transformers.pytorch_utils.Conv1D": "qat.quant.conv1d.QuantHFConv1D"}

# Layer types whose input is not a real-valued activation (activation specs do not apply).
NO_INPUT_QUANT: tuple[type[nn.Module], ...] = (QuantEmbedding,)


def _import(dotted: str) -> Any:
    module, _, attr = dotted.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def resolve_lazy(registry: dict[type, Any], lazy: Mapping[str, str]) -> dict[type, Any]:
    """Add to ``registry`` each entry of ``lazy`` (``{"module.Type": "module.value"}``) whose type's module
    is already imported and whose type ``registry`` lacks (an entry a user registered is kept); returns
    ``registry``. For every registry keyed by layer type that must know types of optional packages."""
    for key, value in lazy.items():
        module, _, name = key.rpartition(".")
        ftype = getattr(sys.modules.get(module), name, None)
        if ftype is not None and ftype not in registry:
            registry[ftype] = _import(value)
    return registry


def quant_modules() -> dict[type[nn.Module], type[nn.Module]]:
    """The layer registry ``QUANT_MODULES`` with the lazy entries of the optional packages imported."""
    return resolve_lazy(QUANT_MODULES, LAZY_QUANT_MODULES)


def register_quant_module(float_type: type[nn.Module], quant_type: type[nn.Module]) -> None:
    """Teach :func:`qat.prepare` a new layer type (exact type match, like the built-in entries)."""
    if not hasattr(quant_type, "from_float"):
        raise TypeError(
            f"{quant_type.__name__} needs a classmethod from_float(mod, weight_spec, act_spec, name)"
        )
    QUANT_MODULES[float_type] = quant_type


def is_quant_module(m: nn.Module) -> bool:
    """A quantized layer: one that ``prepare`` built (it has ``weight_quant`` and ``to_float``), from the
    registry or from a pattern pass (:class:`~qat.quant.bnfold.QuantConvBn2d`)."""
    return hasattr(m, "weight_quant") and callable(getattr(m, "to_float", None))


def deployed(model: nn.Module) -> nn.Module:
    """Replace, in place, every layer that defines ``deployable()`` by the module it returns: the model as
    export encodes it (it computes what ``model`` computes in eval mode). Use it on a copy."""
    for name, mod in list(model.named_modules()):
        if callable(getattr(mod, "deployable", None)):
            model.set_submodule(name, mod.deployable())
    return model
