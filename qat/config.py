"""Quantization configs: plain dataclasses of strings and numbers, so they round-trip through YAML.

Every check lives in ``__post_init__`` and raises :class:`QuantConfigError` with one line that names the
key, the bad value and the allowed values, so a bad Hydra override fails before any training starts.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class QuantConfigError(ValueError):
    """A quantization config value is invalid; the message says which key and what is allowed."""


INT_FORMATS = tuple(f"int{b}" for b in range(2, 9)) + tuple(f"uint{b}" for b in range(2, 9))
FP8_FORMATS = ("fp8_e4m3", "fp8_e5m2")
FORMATS = INT_FORMATS + ("binary", "ternary") + FP8_FORMATS
GRANULARITIES = ("per_tensor", "per_channel", "per_group", "per_token")

# Which scale sources each family of formats understands. The first one is the default.
SCALES_BY_KIND: dict[str, tuple[str, ...]] = {
    "int": ("minmax", "ema", "percentile", "mse", "lsq", "pact", "gguf", "vllm", "compressed_tensors"),
    "binary": ("mean", "lsq"),
    "ternary": ("twn", "ttq", "absmean", "gguf"),
    "fp8": ("minmax", "ema", "lsq"),
}
# The scales a dynamic spec may name: the tensor's own range, or an engine's run-time rule.
DYNAMIC_SCALES = ("minmax", "gguf", "vllm", "compressed_tensors")
# Engines' run-time activation rules (dynamic only, signed symmetric int): see qat.quant.engines.
RUNTIME_SCALES = ("vllm", "compressed_tensors")
# llama.cpp's block formats, (format, values per block along the input dimension) -> GGML type: the grids
# ``scale: gguf`` trains on, with llama.cpp's reference quantizers (qat.quant.engines). Q8_0 and Q8_K are
# also what llama.cpp quantizes activations to at run time (Q8_K for ternary weights); Q8_K is never stored.
GGUF_TYPES = {("int8", 32): "Q8_0", ("int4", 32): "Q4_0", ("ternary", 256): "TQ2_0", ("int8", 256): "Q8_K"}
GGUF_BY_SIDE = {"weight": ("Q8_0", "Q4_0", "TQ2_0"), "activation": ("Q8_0", "Q8_K")}


def format_kind(fmt: str) -> str:
    """'int' for int2..uint8, else the family name: 'binary', 'ternary' or 'fp8'."""
    if fmt in INT_FORMATS:
        return "int"
    if fmt in FP8_FORMATS:
        return "fp8"
    return fmt


LEARNED_INITS = ("lsq", "minmax", "mse")


def format_bits(fmt: str) -> float:
    """Storage bits per value (ternary counts as 2: it is packed four per byte)."""
    if fmt in INT_FORMATS:
        return float(re.sub(r"\D", "", fmt))
    return {"binary": 1.0, "ternary": 2.0, "fp8_e4m3": 8.0, "fp8_e5m2": 8.0}[fmt]


def _err(key: str, value: Any, allowed: str) -> QuantConfigError:
    return QuantConfigError(f"{key}: {value!r} is not valid; allowed: {allowed}")


@dataclass
class QuantSpec:
    """How one tensor (a weight, or a layer's input activation) is fake-quantized.

    ``format``: "int2".."int8" (signed), "uint2".."uint8", "binary", "ternary", "fp8_e4m3", "fp8_e5m2".
    ``granularity``: one scale per tensor, per channel (``axis``), per group of ``group_size`` values
    along the input dimension, or per token (the last dimension is reduced; dynamic activations only).
    ``scale``: where the scale comes from; observers ("minmax", "ema", "percentile", "mse"), learned
    ("lsq"; with ``symmetric=False`` also a learned offset, i.e. LSQ+), "pact" (learned clipping), the
    binary/ternary rules ("mean", "twn", "ttq", "absmean"), and engines' own quantizers, recomputed from the
    tensor at every forward pass (:mod:`qat.quant.engines`): "gguf" (llama.cpp's block formats of
    :data:`GGUF_TYPES`: weights, and activations with ``dynamic``), "vllm" and "compressed_tensors" (their
    dynamic int8 activation rules).
    ``dynamic``: the scale is computed from each tensor at run time (activations only): from its range
    ("minmax"), or by an engine's rule ("gguf", "vllm", "compressed_tensors").
    ``init``: the first value of a learned int scale (``scale="lsq"``; other scale sources ignore it, so
    ``scale=mse`` can override a config that sets it): "lsq" (the paper's
    ``2 mean|x| / sqrt(Qp)``), "minmax" (the tensor's range) or "mse" (the range that minimises the
    quantization error). LSQ's rule is coarse on pretrained weights (3-6x the min/max step at 8 bit, 1.6x
    the MSE step at 2 bit), so fine-tuning a trained model starts better from "mse".
    """

    format: str = "int8"
    granularity: str = "per_tensor"
    group_size: int | None = None
    axis: int = 0
    symmetric: bool = True
    scale: str | None = None
    dynamic: bool = False
    percentile: float = 99.99
    ema_decay: float = 0.9
    init: str = "lsq"
    _key: str = field(default="spec", repr=False, compare=False)

    def __post_init__(self) -> None:
        k = self._key
        if self.format not in FORMATS:
            raise _err(f"{k}.format", self.format, ", ".join(FORMATS))
        kind = format_kind(self.format)
        scales = SCALES_BY_KIND[kind]
        if self.scale is None:
            self.scale = scales[0]
        if self.scale not in scales:
            raise _err(f"{k}.scale", self.scale, f"{', '.join(scales)} (for format {self.format})")
        if self.granularity not in GRANULARITIES:
            raise _err(f"{k}.granularity", self.granularity, ", ".join(GRANULARITIES))
        if self.granularity == "per_group":
            gs = self.group_size
            if not isinstance(gs, int) or isinstance(gs, bool) or gs < 1:
                raise _err(f"{k}.group_size", gs, "a positive integer when granularity=per_group")
        elif self.group_size is not None:
            raise _err(f"{k}.group_size", self.group_size, "null unless granularity=per_group")
        if self.granularity == "per_token" and not self.dynamic:
            raise _err(f"{k}.granularity", "per_token", "per_token only with dynamic=true")
        if self.dynamic and kind in ("binary", "ternary"):
            raise _err(f"{k}.dynamic", True, f"false for format {self.format} (dynamic: int and fp8 formats)")
        if self.dynamic and self.scale not in DYNAMIC_SCALES:
            allowed = ", ".join(DYNAMIC_SCALES)
            raise _err(f"{k}.scale", self.scale, f"{allowed} (dynamic scales are computed from each tensor)")
        if kind in ("binary", "ternary") and self.granularity == "per_group" and self.scale != "gguf":
            raise _err(f"{k}.granularity", "per_group", f"per_tensor, per_channel (for format {self.format})")
        rule = f"with scale={self.scale} (an engine's run-time rule: signed symmetric codes)"
        if self.scale in RUNTIME_SCALES and not self.dynamic:
            raise _err(f"{k}.dynamic", False, f"true {rule}")
        if self.scale in RUNTIME_SCALES and not (self.signed and self.symmetric):
            key, bad = (f"{k}.format", self.format) if not self.signed else (f"{k}.symmetric", False)
            raise _err(key, bad, f"int2..int8, symmetric {rule}")
        if self.scale == "gguf":
            self._check_gguf()
        if self.scale == "pact" and self.format.startswith("int"):
            raise _err(f"{k}.format", self.format, "uint2..uint8 with scale=pact (PACT clips to [0, alpha])")
        if self.scale == "pact" and not self.symmetric:
            raise _err(f"{k}.symmetric", False, "true with scale=pact (PACT clips to [0, alpha]: no offset)")
        if not 50.0 < float(self.percentile) <= 100.0:
            raise _err(f"{k}.percentile", self.percentile, "a number in (50, 100]")
        if not 0.0 <= float(self.ema_decay) < 1.0:
            raise _err(f"{k}.ema_decay", self.ema_decay, "a number in [0, 1)")
        if not isinstance(self.axis, int):
            raise _err(f"{k}.axis", self.axis, "an integer dimension index")
        if self.init not in LEARNED_INITS:
            raise _err(f"{k}.init", self.init, ", ".join(LEARNED_INITS))

    def _check_gguf(self) -> None:
        """``scale: gguf`` names a llama.cpp block format: one of :data:`GGUF_TYPES`, symmetric."""
        k, rule = self._key, "with scale=gguf (llama.cpp's block formats)"
        if self.format not in {fmt for fmt, _ in GGUF_TYPES}:
            raise _err(f"{k}.format", self.format, f"int8 (Q8_0), int4 (Q4_0), ternary (TQ2_0) {rule}")
        if self.granularity != "per_group":
            raise _err(f"{k}.granularity", self.granularity, f"per_group {rule}")
        if self.ggml_type is None:
            sizes = ", ".join(f"{g} ({t})" for (fmt, g), t in GGUF_TYPES.items() if fmt == self.format)
            raise _err(f"{k}.group_size", self.group_size, f"{sizes} for format {self.format} {rule}")
        if not self.symmetric:
            raise _err(f"{k}.symmetric", False, f"true {rule}: they have no zero point")

    # Derived facts the quantizer and the exporter share.
    @property
    def ggml_type(self) -> str | None:
        """The llama.cpp block format (``"Q4_0"``) a ``scale: gguf`` spec trains on, else None."""
        return GGUF_TYPES.get((self.format, self.group_size)) if self.scale == "gguf" else None

    @property
    def kind(self) -> str:
        return format_kind(self.format)

    @property
    def bits(self) -> float:
        return format_bits(self.format)

    @property
    def signed(self) -> bool:
        return not self.format.startswith("uint")

    @property
    def qmin_qmax(self) -> tuple[int, int]:
        """Integer grid of an int format (binary/ternary use {-1, +1} / {-1, 0, 1})."""
        if self.kind in ("binary", "ternary"):
            return -1, 1
        b = int(self.bits)
        if self.signed:
            return -(2 ** (b - 1)), 2 ** (b - 1) - 1
        return 0, 2**b - 1

    def describe(self) -> str:
        """Short human label, e.g. 'int4 per_group(32) lsq' or 'int8 per_token dynamic'."""
        gran = f"per_group({self.group_size})" if self.granularity == "per_group" else self.granularity
        parts = [self.format, gran, "dynamic" if self.dynamic else str(self.scale)]
        if self.dynamic and self.scale != "minmax":
            parts.append(str(self.scale))
        if not self.symmetric:
            parts.append("asym")
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | QuantSpec, key: str = "spec") -> QuantSpec:
        """Build from a YAML mapping; unknown fields are an error that lists the known ones."""
        if isinstance(d, QuantSpec):
            return dataclasses.replace(d, _key=key)
        if not isinstance(d, Mapping):
            raise _err(key, d, "a mapping of QuantSpec fields, or null to keep this side in float")
        names = [f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")]
        for name in d:
            if name not in names:
                raise QuantConfigError(f"{key}.{name}: unknown field; allowed: {', '.join(names)}")
        return cls(**dict(d), _key=key)


def _as_list(value: Any, key: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if value is None:
        return []
    try:
        items = list(value)
    except TypeError:
        raise _err(key, value, "a glob string or a list of glob strings") from None
    if not all(isinstance(v, str) for v in items):
        raise _err(key, value, "a glob string or a list of glob strings")
    return items


def _check_smooth(value: Any, key: str) -> float | None:
    """SmoothQuant's alpha: a number in (0, 1], or null."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise _err(key, value, "a number in (0, 1] (SmoothQuant migration strength alpha), or null")
    return float(value)


def _check_side(side: str, spec: QuantSpec | None, key: str) -> None:
    """Rules that depend on which side a spec quantizes (applied to the base specs and to overrides)."""
    if spec is None:
        return
    if side == "weight":
        if spec.dynamic:
            raise _err(f"{key}.dynamic", True, "false (weights have static scales)")
        if spec.granularity == "per_token":
            raise _err(f"{key}.granularity", "per_token", "per_tensor, per_channel, per_group")
    if spec.ggml_type not in (None, *GGUF_BY_SIDE[side]):
        fits = ", ".join(f"{f} per_group({g})" for (f, g), t in GGUF_TYPES.items() if t in GGUF_BY_SIDE[side])
        bad = f"{spec.format} per_group({spec.group_size})"
        raise _err(f"{key}.format", bad, f"{fits} for {side}s with scale=gguf (llama.cpp's formats)")
    if side == "activation" and spec.scale == "gguf" and not spec.dynamic:
        raise _err(f"{key}.dynamic", False, "true with scale=gguf (llama.cpp quantizes inputs at run time)")
    if side == "activation" and spec.granularity == "per_group" and not spec.dynamic:
        raise _err(f"{key}.granularity", "per_group", "per_tensor, per_channel (static)")


@dataclass
class QuantConfig:
    """What to quantize and how: one weight and one activation spec, module globs, per-layer overrides.

    ``include`` / ``exclude``: shell globs on qualified module names ("*", "blocks.*.mlp.fc").
    ``overrides``: ``{glob: {"weight": {...} | None, "activation": {...} | None}}``; fields given in an
    override replace those of the base spec (``None`` keeps that side in float). Later globs win.
    ``attention``: also fake-quantize the inputs of attention matmuls (q, k, v) where a model exposes them.
    ``fold_bn``: fold each BatchNorm2d into the Conv2d whose output it takes in the forward pass, before
    weight fake quantization (see :mod:`qat.quant.bnfold`, :mod:`qat.quant.bnpairs`); the deployed model
    has no BatchNorm but those that cannot be folded (listed with the reason in ``model.qat_report``).
    ``smooth``: SmoothQuant migration strength ``alpha`` in (0, 1] for linear layers with quantized weight
    and input (see :mod:`qat.quant.smooth`), or ``None`` (off). Overrides may set it per layer
    (``{glob: {smooth: null}}`` turns it off there).
    """

    weight: QuantSpec | None = field(
        default_factory=lambda: QuantSpec(format="int8", granularity="per_channel")
    )
    activation: QuantSpec | None = None
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    attention: QuantSpec | None = None
    fold_bn: bool = False
    smooth: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.fold_bn, bool):
            raise _err("quant.fold_bn", self.fold_bn, "true, false")
        self.smooth = _check_smooth(self.smooth, "quant.smooth")
        if self.weight is not None:
            self.weight = QuantSpec.from_dict(self.weight, "quant.weight")
            _check_side("weight", self.weight, "quant.weight")
        if self.activation is not None:
            self.activation = QuantSpec.from_dict(self.activation, "quant.activation")
            _check_side("activation", self.activation, "quant.activation")
        if self.attention is not None:
            self.attention = QuantSpec.from_dict(self.attention, "quant.attention")
        self.include = _as_list(self.include, "quant.include")
        self.exclude = _as_list(self.exclude, "quant.exclude")
        if not self.include:
            raise _err("quant.include", self.include, "at least one glob, e.g. ['*']")
        if not isinstance(self.overrides, Mapping):
            raise _err(
                "quant.overrides", self.overrides, "a mapping {glob: {weight: {...}, activation: {...}}}"
            )
        self.overrides = {str(g): dict(o) if isinstance(o, Mapping) else o for g, o in self.overrides.items()}
        for glob, ov in self.overrides.items():
            if not isinstance(ov, Mapping):
                raise _err(f"quant.overrides.{glob}", ov, "a mapping with keys weight and/or activation")
            for side in ov:
                if side not in ("weight", "activation", "smooth"):
                    raise QuantConfigError(
                        f"quant.overrides.{glob}.{side}: unknown field; allowed: weight, activation, smooth"
                    )
            if "smooth" in ov:
                ov["smooth"] = _check_smooth(ov["smooth"], f"quant.overrides.{glob}.smooth")
            # Validate now so a typo in an override fails at config time, not mid-prepare.
            for side in ("weight", "activation"):
                if side in ov:
                    self.spec_for(side, ov, glob)

    def spec_for(self, side: str, override: Mapping[str, Any], glob: str | None = None) -> QuantSpec | None:
        """The base spec for ``side`` with one override's fields applied (``None`` = stays float).

        ``glob`` (the override's key) only makes error messages name the exact config key.
        """
        base: QuantSpec | None = getattr(self, side)
        if side not in override:
            return base
        ov = override[side]
        key = f"quant.overrides.{glob}.{side}" if glob is not None else f"quant.overrides.{side}"
        if ov is None:
            return None
        if isinstance(ov, QuantSpec):
            spec = dataclasses.replace(ov, _key=key)
            _check_side(side, spec, key)
            return spec
        if not isinstance(ov, Mapping):
            raise _err(key, ov, "a mapping of QuantSpec fields, or null")
        merged = base.to_dict() if base is not None else {}
        if (
            base is not None
            and "format" in ov
            and "scale" not in ov
            and (
                format_kind(ov["format"]) != base.kind
                or (base.scale == "pact" and str(ov["format"]).startswith("int"))
            )
        ):
            # The base scale source may not exist for the new format (another family, or PACT -> signed).
            merged.pop("scale", None)
        if "granularity" in ov and ov["granularity"] != "per_group" and "group_size" not in ov:
            merged.pop("group_size", None)  # switching away from per_group drops the base group size
        merged.update(ov)
        spec = QuantSpec.from_dict(merged, key)
        _check_side(side, spec, key)
        return spec

    def to_dict(self) -> dict[str, Any]:
        def side(s: QuantSpec | None) -> dict[str, Any] | None:
            return None if s is None else s.to_dict()

        return {
            "weight": side(self.weight),
            "activation": side(self.activation),
            "include": list(self.include),
            "exclude": list(self.exclude),
            "overrides": {g: dict(o) for g, o in self.overrides.items()},
            "attention": side(self.attention),
            "fold_bn": self.fold_bn,
            "smooth": self.smooth,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | QuantConfig | str) -> QuantConfig:
        """Accepts a dict, an OmegaConf DictConfig (what ``qat/conf/quant/*.yaml`` holds) or the name of a
        packaged quant config ("w4a4", "gguf_q4_0": :func:`qat.conf.quant_preset`)."""
        if isinstance(d, QuantConfig):
            return d
        if isinstance(d, str):
            from qat.conf import quant_preset

            d = quant_preset(d)
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(d, DictConfig):
                d = OmegaConf.to_container(d, resolve=True)  # type: ignore[assignment]
        except ImportError:  # pragma: no cover - omegaconf comes with hydra-core
            pass
        if not isinstance(d, Mapping):
            raise _err("quant", d, "a mapping with keys weight, activation, include, exclude, overrides")
        names = [f.name for f in dataclasses.fields(cls)]
        extra = [k for k in d if k not in names and k != "name"]
        if extra:
            raise QuantConfigError(f"quant.{extra[0]}: unknown field; allowed: {', '.join(names)}")
        return cls(**{k: v for k, v in d.items() if k in names})


def quant_config_of(node: Mapping[str, Any]) -> QuantConfig | None:
    """A run's ``quant`` node (dict or DictConfig) as a QuantConfig, or None for a float-only run: no weight
    and no activation spec (``quant=fp32``)."""
    if isinstance(node, Mapping) and node.get("weight") is None and node.get("activation") is None:
        return None
    return QuantConfig.from_dict(node)
