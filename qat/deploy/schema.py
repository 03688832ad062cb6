"""``quant_config.json``: the versioned, self-describing index of an export directory.

The JSON names every tensor of ``model.safetensors`` and says how to turn it back into numbers, so a runtime
without this package can load an export. Abridged layout (schema version 1)::

    {"schema": "qatkit.quant_config", "schema_version": 1,
     "producer": {"name": "qatkit", "version": ..., "torch": ...},
     "files": {"weights": {"path": "model.safetensors", "bytes": N, "sha256": "..."}},
     "quant_config": {...the QuantConfig used for training, informative...},
     "layers": {"<module path>": {
         "module": "Linear", "op": "linear" | "conv1d" | "conv2d" | "embedding" | "generic" | "activation",
         "weight": <weight entry> | null,          # null: the weight stays float (see "weight_float")
         "weight_float": "<tensor>" | null, "bias": "<tensor>" | null,
         "input": <activation entry> | null,       # the layer's input quantizer; for op "activation" the
                                                   # module itself is a standalone quantizer (attention q/k/v)
         "folded_bn": "<module path>"}},           # optional (conv2d): the BatchNorm2d folded into this conv,
                                                   # an identity in the deployed model (older exports: true)
     "float_tensors": {"<tensor>": {"dtype": "F32", "shape": [...]}},   # norms, biases, float layers
     "aliases": {"<state-dict key>": "<tensor it shares storage with>"}}

A weight entry: ``format`` (int2..int8, uint2..uint8, binary, ternary, fp8_e4m3, fp8_e5m2), ``kind``,
``bits``, ``signed``, ``symmetric``, ``granularity`` (per_tensor / per_channel / per_group), ``axis``,
``group_size``, ``scale_source``, ``qmin``/``qmax``, ``shape`` (the float weight's shape) and

* ``codes``: ``{"tensor", "dtype", "container_bits", "packed", "offset", "count"}``. Packed codes are
  ``u = q - offset`` in ``container_bits``-bit fields, LSB first, C order (see ``qat.deploy.packing``);
  binary stores bit 1 for +1 and bit 0 for -1. Unpacked codes are int8 / uint8 (or float8 for fp8).
* ``scale``, ``zero_point`` (null = 0), ``scale_neg`` (TTQ only, null otherwise): ``{"tensor", "shape"}``,
  float32 / int8 (signed formats) or uint8 (unsigned formats). Shapes: ``[1]`` per tensor, ``[C]`` per
  channel along ``axis``, ``[out, K/g]`` per group of ``g``
  consecutive values of the weight flattened to ``[out, K]``.
* ``dequant``: the formula, e.g. ``(q - zero_point) * scale``.

An activation entry has the same format fields plus ``dynamic``, ``channel_axis`` and, when static, the
``scale`` / ``zero_point`` / ``scale_neg`` tensors (null when dynamic or computed by a rule at run time).

Version 2 adds ``smooth`` to the activation entry of ``linear`` layers: ``{"tensor", "shape": [in]}``
(float32) or null. The input is divided by it, channel by channel, before it is quantized; the weight
codes already hold ``W * smooth`` (SmoothQuant, :mod:`qat.quant.smooth`). Exports without it are written
as version 1, which this reader also loads.

The two files check each other: ``files.weights`` records the size and sha256 of ``model.safetensors``,
whose metadata holds ``config_sha256`` (:func:`qat.deploy.storage.config_digest`: this JSON without
``files``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qat.config import FORMATS, GRANULARITIES
from qat.deploy.codec import CODE_DTYPES, KINDS, ExportFormatError, entry_tensors
from qat.deploy.registry import ACTIVATION, LINEAR, NATIVE, OPS, TARGETS

SCHEMA_NAME = "qatkit.quant_config"
SCHEMA_VERSION = 2  # what this qatkit writes when it needs it (version 2 = 1 + SmoothQuant "smooth")
READ_VERSIONS = (1, 2)
CONFIG_FILE = "quant_config.json"
WEIGHTS_FILE = TARGETS[NATIVE].file
REPORT_FILE = "export_report.json"
ONNX_FILE = TARGETS["onnx"].file


def read_config(path: str | Path) -> dict[str, Any]:
    """Parse and validate ``quant_config.json`` (structure only; :func:`check_tensors` checks tensors)."""
    path = Path(path)
    if not path.is_file():
        raise ExportFormatError(
            f"{path}: missing; an export directory holds {CONFIG_FILE} and {WEIGHTS_FILE}"
        )
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportFormatError(f"{path}: not valid JSON (truncated or corrupt?): {e}") from None
    validate_config(cfg, str(path))
    return cfg


def _need(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ExportFormatError(f"{where}: {msg}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_config(cfg: Any, where: str = CONFIG_FILE) -> None:
    """Check the schema name/version and every entry's structure; one clear error at the first problem."""
    _need(isinstance(cfg, dict), where, "top level must be a JSON object")
    _need(
        cfg.get("schema") == SCHEMA_NAME, where, f"schema is {cfg.get('schema')!r}, expected {SCHEMA_NAME!r}"
    )
    version = cfg.get("schema_version")
    _need(_is_int(version), where, f"schema_version {version!r} is not an integer")
    if version not in READ_VERSIONS:
        newer = " (written by a newer qatkit; upgrade to read it)" if version > SCHEMA_VERSION else ""
        raise ExportFormatError(
            f"{where}: schema_version {version} is not supported{newer}; "
            f"this qatkit reads versions {', '.join(map(str, READ_VERSIONS))}"
        )
    for key in ("layers", "float_tensors", "aliases", "files"):
        _need(isinstance(cfg.get(key), dict), where, f"'{key}' must be a JSON object")
    weights = cfg["files"].get("weights")
    _need(isinstance(weights, dict), where, "files.weights must be an object")
    # The weights file: a plain name inside the export directory (never a path elsewhere), with the size
    # and checksum qatkit records (optional: other producers may not write them).
    name = weights.get("path", WEIGHTS_FILE)
    _need(
        isinstance(name, str) and re.fullmatch(r"[\w.-]+", name) is not None and name not in (".", ".."),
        where,
        f"files.weights.path {name!r} must be a file name inside the export directory",
    )
    _need(_is_int(weights.get("bytes", 0)), where, "files.weights.bytes must be an integer")
    sha = weights.get("sha256", "0" * 64)
    _need(
        isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha) is not None,
        where,
        "files.weights.sha256 must be a sha256 hex digest",
    )
    for name, layer in cfg["layers"].items():
        lw = f"{where}: layers[{name!r}]"
        _need(isinstance(layer, dict), lw, "must be an object")
        _need(layer.get("op") in OPS, lw, f"op {layer.get('op')!r} is not one of {', '.join(OPS)}")
        if layer.get("weight") is not None:
            _check_qentry(layer["weight"], f"{lw}.weight", weight=True)
        if layer.get("input") is not None:
            _check_qentry(layer["input"], f"{lw}.input", weight=False)
            _check_smooth(layer, version, f"{lw}.input")
        if layer["op"] == ACTIVATION.name:
            _need(layer.get("input") is not None, lw, "an activation quantizer needs an 'input' entry")
        folded = layer.get("folded_bn")
        _need(
            folded is None or folded is True or (isinstance(folded, str) and folded != ""),
            lw,
            f"folded_bn {folded!r} must be null or the folded BatchNorm's module name",
        )
    for name, meta in cfg["float_tensors"].items():
        _need(
            isinstance(meta, dict) and "dtype" in meta and "shape" in meta,
            f"{where}: float_tensors[{name!r}]",
            "needs dtype and shape",
        )


def _check_smooth(layer: dict[str, Any], version: int, where: str) -> None:
    ref = layer["input"].get("smooth")
    if ref is None:
        return
    _need(version >= 2, where, "'smooth' needs schema_version 2")
    _need(layer["op"] == LINEAR.name, where, f"'smooth' is only defined for op '{LINEAR.name}'")


def _check_qentry(e: Any, where: str, weight: bool) -> None:
    _need(isinstance(e, dict), where, "must be an object")
    _need(e.get("kind") in KINDS, where, f"kind {e.get('kind')!r} is not one of {', '.join(KINDS)}")
    for key in ("format", "granularity", "scale_source"):
        _need(isinstance(e.get(key), str), where, f"'{key}' must be a string")
    _need(e["format"] in FORMATS, where, f"format {e['format']!r} is not one of {', '.join(FORMATS)}")
    _need(
        e["granularity"] in GRANULARITIES,
        where,
        f"granularity {e['granularity']!r} is not one of {', '.join(GRANULARITIES)}",
    )
    for key in ("qmin", "qmax"):
        _need(_is_int(e.get(key)), where, f"'{key}' must be an integer")
    for key in ("scale", "zero_point", "scale_neg", "smooth"):
        ref = e.get(key)
        _need(
            ref is None
            or (
                isinstance(ref, dict)
                and isinstance(ref.get("tensor"), str)
                and isinstance(ref.get("shape"), list)
            ),
            where,
            f"'{key}' must be null or {{tensor, shape}}",
        )
    if weight:
        _need(isinstance(e.get("shape"), list), where, "'shape' (the float weight's shape) must be a list")
        codes = e.get("codes")
        _need(
            isinstance(codes, dict) and isinstance(codes.get("tensor"), str),
            where,
            "'codes' must name a tensor",
        )
        _need(
            codes.get("dtype") in CODE_DTYPES,
            where,
            f"codes.dtype {codes.get('dtype')!r} is not one of {', '.join(CODE_DTYPES)}",
        )
        for key in ("container_bits", "offset", "count"):
            _need(_is_int(codes.get(key)), where, f"codes.{key} must be an integer")
        _need(codes["container_bits"] in (1, 2, 4, 8), where, "codes.container_bits must be 1, 2, 4 or 8")
        _need(e.get("scale") is not None, where, "a quantized weight needs a scale")
    else:
        _need(isinstance(e.get("dynamic"), bool), where, "'dynamic' must be true or false")


def referenced_tensors(cfg: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Every tensor the config expects in the safetensors file: ``{name: {"dtype", "shape"}}``."""
    out: dict[str, dict[str, Any]] = {}

    def add(name: str, dtype: str, shape: list[int], where: str) -> None:
        prev = out.get(name)
        if prev is not None and (prev["dtype"], prev["shape"]) != (dtype, shape):
            raise ExportFormatError(
                f"{CONFIG_FILE}: {where} names tensor {name!r} with two different layouts"
            )
        out[name] = {"dtype": dtype, "shape": shape}

    for lname, layer in cfg["layers"].items():
        for side in ("weight", "input"):
            if layer.get(side) is not None:
                for name, dtype, shape in entry_tensors(layer[side], weight=side == "weight"):
                    add(name, dtype, shape, lname)
        for key in ("bias", "weight_float"):
            if layer.get(key):
                meta = cfg["float_tensors"].get(layer[key])
                if meta is None:
                    raise ExportFormatError(
                        f"{CONFIG_FILE}: layers[{lname!r}].{key} names {layer[key]!r}, "
                        "which is not listed in float_tensors"
                    )
    for name, meta in cfg["float_tensors"].items():
        add(name, meta["dtype"], list(meta["shape"]), "float_tensors")
    return out


def check_tensors(cfg: Mapping[str, Any], header: Mapping[str, tuple[str, list[int]]], where: str) -> None:
    """The safetensors header must hold exactly the tensors the config names, with their dtypes and shapes."""
    want = referenced_tensors(cfg)
    missing = sorted(set(want) - set(header))
    if missing:
        raise ExportFormatError(
            f"{where}: tensor {missing[0]!r} named in {CONFIG_FILE} is missing "
            f"({len(missing)} missing in all); the files do not belong together"
        )
    extra = sorted(set(header) - set(want))
    if extra:
        raise ExportFormatError(
            f"{where}: tensor {extra[0]!r} is not described by {CONFIG_FILE} ({len(extra)} unexpected in all)"
        )
    for name, meta in want.items():
        dtype, shape = header[name]
        if dtype != meta["dtype"] or list(shape) != list(meta["shape"]):
            raise ExportFormatError(
                f"{where}: tensor {name!r} is {dtype}{list(shape)} but {CONFIG_FILE} expects "
                f"{meta['dtype']}{list(meta['shape'])}"
            )
