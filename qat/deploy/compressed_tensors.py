"""The compressed-tensors target: a Hugging Face model directory that transformers loads with
``from_pretrained`` and vLLM serves (``vllm serve <dir>``), holding the trained codes and scales.

It is written into the subdirectory ``compressed-tensors/`` of the export (the native target owns
``model.safetensors`` there): ``config.json`` (the model's config plus ``quantization_config``),
``model.safetensors``, ``generation_config.json`` and, given a tokenizer, the tokenizer files.

Each quantized layer of the native export maps to one scheme of :data:`SCHEMES`; its codes and scales are
read from the export through the codec and written as they are (nothing is re-quantized):

* int4 / int8 symmetric weights, per group of 32, 64 or 128 input features or per output channel, input
  in float: W4A16 / W8A16, format ``pack-quantized``: ``weight_packed`` int32 ``[out, in * bits / 32]``
  (element ``k * n + j`` of a row, ``n = 32 / bits``, in bits ``j * bits ...`` of word ``k``, stored as
  ``code + 2 ** (bits - 1)``), ``weight_scale`` ``[out, groups]`` (``[out, 1]`` per channel) and
  ``weight_shape``;
* int8 symmetric per-channel weights with int8 inputs, dynamic per token (symmetric) or static per tensor
  (``input_scale``, and ``input_zero_point`` when asymmetric): W8A8, format ``int-quantized``: ``weight``
  int8 ``[out, in]`` and ``weight_scale`` ``[out, 1]``.

Scales are stored in the model's dtype and must be exactly representable in it. The linear layers left in
float are listed in ``ignore``; there is one config group per distinct scheme. Anything else (asymmetric,
ternary or fp8 weights, other activations, SmoothQuant, quantized embeddings or attention inputs) is
refused with a one-line error naming the layer.

Verification (when the export has batches): transformers loads the directory on CPU and runs the same
batches as the fake-quant model; it computes float matmuls of the dequantised weights, so it is scored
against the closer of the fake-quant model's integer eval path and its float forward (as onnxruntime).
Its dynamic per-token inputs follow compressed-tensors' rule (``scale = amax / 127.5``,
``round(x / scale)``), not necessarily the trained one (``scale: minmax``: ``amax / 127``, the rule of
vLLM's kernel; ``scale: compressed_tensors`` is transformers' rule), so the check swaps transformers' rule
into the fake-quant model's dynamic inputs (:func:`transformers_rule`): the logits must then agree to
:data:`WEIGHT_TOL` of their range (0 in practice; the figures as trained are reported beside). Static
inputs are quantized by ``round(x / scale)`` where the fake-quant model multiplies by ``1 / scale``, which
differ on rare ties: with them the logits must agree to :data:`WEIGHT_TOL` with those inputs in float on
both sides, and with them quantized to :data:`ACT_NOISE_FACTOR` times the model's own activation noise
(its logits with those inputs quantized vs in float: one tie moves a value by one step, where quantizing
it moves it by at most half a step).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qat.calibrate import restored
from qat.deploy import schema
from qat.deploy.codec import QWeight, act_spec
from qat.deploy.loader import read_export
from qat.deploy.packing import pack
from qat.deploy.registry import TARGETS, ExportJob
from qat.deploy.storage import write_safetensors
from qat.deploy.verify import VerificationError, compare

NAME = "compressed-tensors"
GROUP_SIZES = (32, 64, 128)  # group sizes vLLM's W4A16 / W8A16 kernels take (besides per channel)
WEIGHT_TOL = 1e-5  # max |logit difference| / logit range with float inputs on both sides
ACT_NOISE_FACTOR = 2.0  # allowed difference with quantized inputs, in units of the activation noise
HALF_DTYPES = (torch.bfloat16, torch.float16)
TRANSFORMERS_RULE = "compressed_tensors"  # QuantSpec.scale of transformers' rule (qat.quant.engines)


@dataclasses.dataclass(frozen=True)
class Scheme:
    """A compressed-tensors scheme: its usual name and its storage format."""

    name: str
    format: str


W4A16 = Scheme("W4A16", "pack-quantized")
W8A16 = Scheme("W8A16", "pack-quantized")
W8A8 = Scheme("W8A8", "int-quantized")
W4A8 = Scheme("W4A8", "pack-quantized")
# (weight bits, weight strategy, input strategy or None for float inputs) -> scheme. The weights are int,
# signed and symmetric; int8 inputs are dynamic per token (symmetric) or static per tensor.
SCHEMES = {
    (4, "group", None): W4A16,
    (4, "channel", None): W4A16,
    (8, "group", None): W8A16,
    (8, "channel", None): W8A16,
    (8, "channel", "token"): W8A8,
    (8, "channel", "tensor"): W8A8,
    (4, "group", "token"): W4A8,
    (4, "channel", "token"): W4A8,
}
WEIGHT_STRATEGIES = {"per_group": "group", "per_channel": "channel"}
# Our input granularity -> compressed-tensors input strategy, with whether it is dynamic.
INPUT_STRATEGIES = {("per_token", True): "token", ("per_tensor", False): "tensor"}
SUPPORTED = (
    f"int4/int8 symmetric weights per_group ({'/'.join(map(str, GROUP_SIZES))}) or per_channel with "
    "float input (W4A16/W8A16); int8 symmetric per_channel weights with int8 input, dynamic per_token "
    "symmetric or static per_tensor (W8A8)"
)


class UnsupportedError(ValueError):
    """A layer of the export has no compressed-tensors scheme (the message names it and what is allowed)."""


def _describe(entry: dict[str, Any] | None, key: str) -> str:
    return "float" if entry is None else act_spec({"dynamic": False, **entry}, key).describe()


def weight_args(w: dict[str, Any]) -> dict[str, Any] | None:
    """compressed-tensors' weight args for a weight entry of ``quant_config.json`` (None: it has none)."""
    strategy = WEIGHT_STRATEGIES.get(w["granularity"])
    if not (w["kind"] == "int" and w["signed"] and w["symmetric"] and strategy):
        return None
    if (strategy == "channel" and int(w["axis"]) != 0) or (
        strategy == "group" and w["group_size"] not in GROUP_SIZES
    ):
        return None
    group = int(w["group_size"]) if strategy == "group" else None
    return {"num_bits": int(w["bits"]), "type": "int", "symmetric": True, "strategy": strategy,
            "group_size": group, "dynamic": False}  # fmt: skip


def input_args(a: dict[str, Any]) -> dict[str, Any] | None:
    """compressed-tensors' input args for an input entry (None: it has none)."""
    strategy = INPUT_STRATEGIES.get((a["granularity"], bool(a["dynamic"])))
    if (
        a["format"] != "int8"
        or strategy is None
        or a.get("smooth")
        or (strategy == "token" and not a["symmetric"])
    ):
        return None
    return {"num_bits": 8, "type": "int", "symmetric": bool(a["symmetric"]), "strategy": strategy,
            "dynamic": bool(a["dynamic"])}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Group:
    """A config group's content: the scheme, its weight args and its input args (None: float inputs)."""

    scheme: Scheme
    weights: tuple
    inputs: tuple | None

    def block(self, targets: list[str]) -> dict[str, Any]:
        inputs = None if self.inputs is None else dict(self.inputs)
        return {"targets": targets, "weights": dict(self.weights), "input_activations": inputs,
                "output_activations": None, "format": self.scheme.format}  # fmt: skip


def group_of(name: str, layer: dict[str, Any], linear: bool) -> Group:
    """The config group of layer ``name`` (its ``quant_config.json`` entry; ``linear``: an ``nn.Linear`` in
    the model). Raises :class:`UnsupportedError` naming the layer, its formats and what is supported."""
    w, a = layer.get("weight"), layer.get("input")
    wargs = weight_args(w) if w is not None and linear else None
    iargs = input_args(a) if a is not None else None
    key = (wargs["num_bits"], wargs["strategy"], iargs and iargs["strategy"]) if wargs else None
    if key not in SCHEMES or (a is not None and iargs is None):
        smooth = " with SmoothQuant" if a and a.get("smooth") else ""
        raise UnsupportedError(
            f"{NAME}: layer {name!r} ({layer['module']}, weight {_describe(w, name)}, input "
            f"{_describe(a, name)}{smooth}) has no compressed-tensors scheme; supported: {SUPPORTED}"
        )
    return Group(SCHEMES[key], tuple(wargs.items()), iargs and tuple(iargs.items()))


def quantization_config(groups: dict[str, Group], ignore: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` block of ``config.json`` for the quantized layers' ``groups``: one
    config group per distinct scheme (targets ``Linear`` when one scheme covers every quantized layer,
    else the layer names), the float linear layers in ``ignore``."""
    members: dict[Group, list[str]] = {}
    for name, g in groups.items():
        members.setdefault(g, []).append(name)
    if len(members) == 1:
        members = {g: ["Linear"] for g in members}
    formats = {g.scheme.format for g in members}
    return {
        "quant_method": NAME,
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": {f"group_{i}": g.block(t) for i, (g, t) in enumerate(members.items())},
        "ignore": ignore,
        "kv_cache_scheme": None,
    }


# ----------------------------------------------------------------------------------------------- tensors
def _exact(t: torch.Tensor, dtype: torch.dtype) -> bool:
    return torch.equal(t.to(dtype).to(t.dtype), t)


def _in_dtype(name: str, what: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Trained scales in the model's ``dtype``, which must hold them exactly."""
    out = t.to(dtype)
    if not _exact(t, dtype):
        err = float(((out.to(t.dtype) - t).abs() / t.abs()).max())
        raise UnsupportedError(
            f"{NAME}: layer {name!r}: the trained {what} is not exactly representable in the model dtype "
            f"{str(dtype).removeprefix('torch.')} (relative error up to {err:.2g}); allowed: scales exact in "
            "that dtype (export the model in float32, or train it in its deployment dtype)"
        )
    return out


def pack_int32(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``[out, in]`` as compressed-tensors' ``weight_packed``: int32 ``[out, in * bits / 32]``,
    element ``k * n + j`` of a row (``n = 32 / bits``) in bits ``j * bits ...`` of word ``k``, stored as
    ``code + 2 ** (bits - 1)``: the export's own byte packing (LSB first) read as little-endian words."""
    rows, cols = q.shape
    if cols * bits % 32:
        raise UnsupportedError(f"{NAME}: rows of {cols} {bits}-bit codes do not fill whole int32 words")
    return pack(q, bits, offset=-(1 << (bits - 1))).view(torch.int32).reshape(rows, cols * bits // 32)


def layer_tensors(name: str, layer: dict[str, Any], group: Group, tensors: dict[str, torch.Tensor],
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:  # fmt: skip
    """The tensors compressed-tensors stores for layer ``name``, under their checkpoint names."""
    w, a = layer["weight"], layer.get("input")
    qw = QWeight(w, tensors, f"{schema.CONFIG_FILE}: layers[{name!r}]")
    scale = _in_dtype(name, "weight scale", tensors[w["scale"]["tensor"]].reshape(qw.shape[0], -1), dtype)
    if group.scheme.format == "pack-quantized":
        out = {"weight_packed": pack_int32(qw.q, int(w["bits"])), "weight_scale": scale,
               "weight_shape": torch.tensor(qw.shape, dtype=torch.int64)}  # fmt: skip
    else:
        out = {"weight": qw.q.to(torch.int8), "weight_scale": scale}
    if a is not None and a.get("scale") is not None:  # static inputs
        out["input_scale"] = _in_dtype(name, "input scale", tensors[a["scale"]["tensor"]].reshape(1), dtype)
    if a is not None and a.get("zero_point") is not None:
        out["input_zero_point"] = tensors[a["zero_point"]["tensor"]].reshape(1).to(torch.int8)
    return {f"{name}.{k}": v.contiguous() for k, v in out.items()}


# ----------------------------------------------------------------------------------------------- write
def _check_model(reference: nn.Module, groups: dict[str, Group], modules: dict[str, nn.Module]) -> None:
    if not hasattr(getattr(reference, "config", None), "to_json_string"):
        raise UnsupportedError(
            f"{NAME}: the model is a {type(reference).__name__}, not a Hugging Face PreTrainedModel; "
            "allowed: a transformers model (its config is written with the weights)"
        )
    head = reference.get_output_embeddings()
    name = next((n for n, m in modules.items() if m is head and head is not None), None)
    if getattr(reference.config, "tie_word_embeddings", False) and name in groups:
        raise UnsupportedError(
            f"{NAME}: layer {name!r} is quantized but tied to the float input embeddings "
            "(tie_word_embeddings); allowed: keep it float (exclude it) or untie it before training"
        )


def write(job: ExportJob) -> dict[str, Any]:
    """The compressed-tensors target of an export (:data:`qat.deploy.registry.TARGETS`): the subdirectory
    ``compressed-tensors/`` of the export directory, checked in transformers when the export has batches."""
    reference = job.reference
    cfg, tensors, _ = read_export(job.directory)
    modules = dict(reference.named_modules())
    groups = {
        n: group_of(n, layer, isinstance(modules.get(n), nn.Linear)) for n, layer in cfg["layers"].items()
    }
    _check_model(reference, groups, modules)
    dtype = reference.dtype
    out = {k: tensors[k] for k in cfg["float_tensors"]}  # tied tensors: transformers ties them on load
    for name, group in groups.items():
        out.update(layer_tensors(name, cfg["layers"][name], group, tensors, dtype))
    ignore = [n for n, m in modules.items() if isinstance(m, nn.Linear) and n not in groups]
    block = quantization_config(groups, ignore)

    subdir = job.directory / TARGETS[NAME].file
    subdir.mkdir()
    config = copy.deepcopy(reference.config)
    config.quantization_config, config.architectures, config.dtype = block, [type(reference).__name__], dtype
    config.save_pretrained(str(subdir))
    if getattr(reference, "generation_config", None) is not None:
        reference.generation_config.save_pretrained(str(subdir))
    if job.tokenizer is not None:
        job.tokenizer.save_pretrained(str(subdir))
    written = write_safetensors(subdir / "model.safetensors", out, {"format": "pt"})
    figures: dict[str, Any] = {
        "path": subdir.name,
        "format": block["format"],
        "schemes": dict(Counter(g.scheme.name for g in groups.values())),
        "config_groups": len(block["config_groups"]),
        "ignore": len(ignore),
        "bytes": written["bytes"],
    }
    # Whether serving in a half dtype (vLLM's kernels run in float16 / bfloat16) keeps the trained grid.
    scales = [t for k, t in out.items() if k.endswith("_scale")]
    figures["scales_exact"] = {
        str(d).removeprefix("torch."): all(_exact(t, d) for t in scales) for d in HALF_DTYPES
    }
    if job.batches:
        inputs = {n: cfg["layers"][n]["input"] for n, g in groups.items() if g.inputs is not None}
        figures.update(verify(subdir, job, inputs))
    return figures


# ----------------------------------------------------------------------------------------------- verify
def load(subdir: str | Path, model_class: Any = None) -> nn.Module:
    """The directory as transformers loads it on CPU (``model_class.from_pretrained``, by default
    ``AutoModelForCausalLM``), in eval mode."""
    if model_class is None:
        from transformers import AutoModelForCausalLM as model_class
    return model_class.from_pretrained(str(subdir)).eval()


def run(path: Path, skeleton: nn.Module, threads: int | None) -> Callable[[Any], torch.Tensor] | None:
    """The target's engine for ``qat-eval`` (:data:`qat.deploy.registry.TARGETS`): transformers running
    the directory on CPU, ``inputs -> logits``; None without the compressed-tensors package."""
    if importlib.util.find_spec("compressed_tensors") is None:
        return None
    from qat.hf.models import logits

    model = load(path, type(skeleton))
    return lambda inputs: logits(model, inputs)


@contextlib.contextmanager
def float_inputs(reference: nn.Module, loaded: nn.Module | None, names: list[str]) -> Iterator[None]:
    """Inputs of layers ``names`` in float, in the fake-quant ``reference`` and the ``loaded`` model."""
    layers = [] if loaded is None else [loaded.get_submodule(n) for n in names]
    with restored(reference):
        try:
            for n in names:
                reference.get_submodule(n).input_quant.enable_fake_quant(False)
            for m in layers:
                m.quantization_enabled = False  # compressed-tensors' switch of a layer's input / output QDQ
            yield
        finally:
            for m in layers:
                m.quantization_enabled = True


@contextlib.contextmanager
def transformers_rule(reference: nn.Module, names: list[str]) -> Iterator[None]:
    """The dynamic inputs of layers ``names`` of the fake-quant ``reference`` quantized by transformers' own
    rule (``scale: compressed_tensors``, :mod:`qat.quant.engines`) instead of their trained one."""
    from qat.quant.quantizer import SOURCES

    quantizers = [reference.get_submodule(n).input_quant for n in names]
    sources, rule = [q.source for q in quantizers], SOURCES[("int", TRANSFORMERS_RULE)]
    try:
        for q in quantizers:
            q.source = rule()  # sources are stateless: nothing else of the quantizer changes
        yield
    finally:
        for q, source in zip(quantizers, sources, strict=True):
            q.source = source


def verify(subdir: Path, job: ExportJob, inputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Compare transformers' logits on the directory with the fake-quant model's on ``job.batches`` (the
    criteria are in the module doc). ``inputs``: the input entries of the layers with quantized inputs.
    Returns the figures; raises :class:`VerificationError` when they disagree."""
    reference, batches, forward = job.reference, job.batches, job.forward
    loaded = load(subdir, type(reference))
    # transformers runs float matmuls of dequantised values: scored against the closer of the fake-quant
    # model's integer eval path and its float forward (qat.deploy.verify), as onnxruntime is.
    figures = compare(reference, loaded, batches, task=job.task, forward=forward, float_reference=True)
    rule = [n for n, a in inputs.items() if a["dynamic"] and a["scale_source"] != TRANSFORMERS_RULE]
    static = [n for n, a in inputs.items() if not a["dynamic"]]
    with transformers_rule(reference, rule):
        same = figures
        if rule:
            same = compare(reference, loaded, batches, forward=forward, float_reference=True)
            figures["max_rel_logit_diff_transformers_rule"] = same["max_rel_logit_diff_best"]
        checks = [("", same["max_rel_logit_diff_best"], WEIGHT_TOL)]
        if static:
            with float_inputs(reference, loaded, static):
                weights = compare(reference, loaded, batches, forward=forward)["max_rel_logit_diff"]

            def float_reference(batch: Any) -> torch.Tensor:
                with float_inputs(reference, None, static):
                    return forward(reference, batch)

            noise = compare(reference, float_reference, batches, forward=forward)["max_rel_logit_diff"]
            figures.update(max_rel_logit_diff_float_inputs=weights, activation_noise=noise)
            checks = [
                ("with float inputs ", weights, WEIGHT_TOL),
                ("", checks[0][1], ACT_NOISE_FACTOR * noise),
            ]
    fails = [f"{what}{v:.3g} of the logit range (allowed {tol:.3g})" for what, v, tol in checks if v > tol]
    figures["passed"] = not fails
    if fails:
        raise VerificationError(
            f"{NAME}: transformers' logits differ from the fake-quant model's by " + "; ".join(fails)
        )
    return figures


__all__ = ["SCHEMES", "Group", "Scheme", "UnsupportedError", "float_inputs", "group_of", "load", "pack_int32",
           "quantization_config", "run", "transformers_rule", "verify", "write"]  # fmt: skip
