"""Loading an export into the user's model: ``load_quantized`` reads ``model.safetensors`` and
``quant_config.json``, checks them against the skeleton, and swaps each quantized layer for its runtime
module (:mod:`qat.deploy.runtime`); other targets load through :func:`load_with` with their own builders.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qat.deploy import schema
from qat.deploy.codec import ExportFormatError, QWeight
from qat.deploy.registry import ACTIVATION, GENERIC, NATIVE, OPS, stored_form
from qat.deploy.runtime import RuntimeActQuant, StoredLayer, pack_weights
from qat.deploy.storage import config_digest, read_safetensors
from qat.quant.attention import ATTENTION_HOOKS, add_attention_hooks, hf_attention_modules
from qat.quant.modules import is_quant_module


def load_quantized(
    out_dir: str | Path,
    model: nn.Module,
    *,
    int_matmul: bool = True,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Turn ``model`` (the float skeleton the export came from; weights may be random) into the integer
    runtime model, in place, and return it in eval mode. Everything is checked before ``model`` changes:
    on an error it is left as it was.

    Reads only ``quant_config.json`` and ``model.safetensors`` (no pickle). Raises
    :class:`ExportFormatError` for missing, truncated or corrupt files, an unknown schema version, tensors
    that do not match the config, or a skeleton whose layers or parameters do not match the export.
    ``int_matmul=False`` forces the exact-dequantisation path everywhere (a reference for tests).
    A prepared (fake-quant) skeleton is accepted and converted back to float first; a Hugging Face
    skeleton gets the attention hooks an export of quantized attention needs.
    """
    return load_with(out_dir, model, NATIVE, device, int_matmul)


def load_with(
    out_dir: str | Path,
    model: nn.Module,
    target: str = NATIVE,
    device: str | torch.device = "cpu",
    int_matmul: bool = True,
) -> nn.Module:
    """The loader behind :func:`load_quantized`: each stored layer is replaced by the module that its op's
    builder for ``target`` makes (:data:`qat.deploy.registry.OPS`; the ONNX target builds QDQ modules).

    Every problem with the files ends in :class:`ExportFormatError`: the checks above catch the expected
    ones; a field of the right type but an impossible value that only fails deeper down (a KeyError,
    a reshape error) is reported the same way, with the underlying error in the message.

    The conversion runs on a copy of the module tree (sharing the parameters, so nothing large is copied)
    and replaces ``model``'s contents only once it has succeeded: after an error ``model`` is untouched
    (same modules, same tensors)."""
    work = copy.deepcopy(model, memo={id(p): p for p in model.parameters()})
    try:
        _load_with(Path(out_dir), work, target, device, int_matmul)
    except ExportFormatError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError, OverflowError) as e:
        detail = " ".join(f"{type(e).__name__}: {e}".split())
        raise ExportFormatError(f"{out_dir}: malformed export ({detail[:500]})") from e
    # `model` becomes the converted copy: the same object the caller holds (the API converts in place).
    vars(model).clear()
    vars(model).update(vars(work))
    return model


def read_export(out_dir: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], Path]:
    """The native export in ``out_dir`` as every reader takes it: ``quant_config.json``, the tensors of
    its weights file (checked against the config: digest, dtypes, shapes) and that file's path."""
    out_dir = Path(out_dir)
    cfg = schema.read_config(out_dir / schema.CONFIG_FILE)
    wfile = cfg["files"]["weights"]
    path = out_dir / wfile.get("path", schema.WEIGHTS_FILE)
    tensors, header = read_safetensors(path, wfile, config_digest(cfg))
    schema.check_tensors(cfg, header, str(path))
    return cfg, tensors, path


def _load_with(
    out_dir: Path, model: nn.Module, target: str, device: str | torch.device, int_matmul: bool
) -> nn.Module:
    cfg, tensors, path = read_export(out_dir)
    tensors = {k: v.to(device) for k, v in tensors.items()}

    if any(is_quant_module(m) for m in model.modules()):
        from qat.rewrite import unprepare

        unprepare(model)
    _drop_folded_bn(model, cfg)
    _add_attention_hooks(model, cfg)
    stored_form(model)
    modules = dict(model.named_modules())
    prefixes = tuple(f"{n}." for n in cfg["layers"])
    want = {k for k in model.state_dict() if not k.startswith(prefixes)}
    for name, layer in cfg["layers"].items():
        where = f"{schema.CONFIG_FILE}: layers[{name!r}]"
        mod = modules.get(name)
        if mod is None:
            raise ExportFormatError(f"{where}: the model has no module {name!r}; is it the right skeleton?")
        op = OPS[layer["op"]]
        act = RuntimeActQuant(layer["input"], tensors, name) if layer.get("input") else None
        if op is not ACTIVATION and type(mod).__name__ != layer["module"]:
            raise ExportFormatError(
                f"{where}: exported from a {layer['module']}, the model has a {type(mod).__name__}"
            )
        qw = QWeight(layer["weight"], tensors, where) if layer.get("weight") else None
        if qw is not None and list(mod.weight.shape) != qw.shape:
            raise ExportFormatError(
                f"{where}: weight shape {qw.shape} does not match the model's {list(mod.weight.shape)}"
            )
        fw = tensors[layer["weight_float"]] if layer.get("weight_float") else None
        bias = tensors[layer["bias"]] if layer.get("bias") else None
        if op is GENERIC:  # a registered layer type: its own float state is stored under its name
            own = {
                k[len(name) + 1 :]: v
                for k, v in tensors.items()
                if k.startswith(f"{name}.") and k in cfg["float_tensors"]
            }
            mod.load_state_dict(own, strict=False, assign=True)
        stored = StoredLayer(op.name, mod, qw, fw, bias, act, int_matmul)
        model.set_submodule(name, op.build[target](stored).to(device))

    # Everything outside the quantized layers comes from the float tensors; the skeleton must
    # expect exactly these.
    floats = {k: tensors[k] for k in cfg["float_tensors"] if not k.startswith(prefixes)}
    floats.update({k: tensors[v] for k, v in cfg["aliases"].items() if not k.startswith(prefixes)})
    sd = model.state_dict()
    missing = sorted(want - set(floats))
    if missing:
        raise ExportFormatError(
            f"{path}: the model expects {missing[0]!r}, which the export does not hold "
            f"({len(missing)} missing); is it the right skeleton?"
        )
    extra = sorted(set(floats) - want)
    if extra:
        raise ExportFormatError(
            f"{path}: tensor {extra[0]!r} has no place in the model ({len(extra)} unexpected)"
        )
    for k in floats:
        if tuple(sd[k].shape) != tuple(floats[k].shape):
            raise ExportFormatError(
                f"{path}: {k!r} is {list(floats[k].shape)} in the export, {list(sd[k].shape)} in the model"
            )
    model.load_state_dict(floats, strict=False, assign=True)
    model.to(device)
    model.eval()
    pack_weights(model)
    model.qat_export = cfg  # type: ignore[assignment]
    return model


def _drop_folded_bn(model: nn.Module, cfg: Mapping[str, Any]) -> None:
    """Layers trained with Conv-BN folding were exported with the BN folded in: the BatchNorm each layer
    entry names in ``folded_bn`` becomes an identity in the skeleton (a skeleton already folded has an
    identity or nothing there). Everything is checked before the skeleton changes."""
    names = {n: layer["folded_bn"] for n, layer in cfg["layers"].items() if layer.get("folded_bn")}
    if any(bn is True for bn in names.values()):  # written before the BN name was stored: pair by forward
        pairs = _traced_pairs(model)
        names = {n: pairs[n] if bn is True else bn for n, bn in names.items() if bn is not True or n in pairs}
    modules = dict(model.named_modules())
    for name, bn in names.items():
        found = modules.get(bn)
        if found is not None and not isinstance(found, (nn.BatchNorm2d, nn.Identity)):
            raise ExportFormatError(
                f"{schema.CONFIG_FILE}: layers[{name!r}].folded_bn names {bn!r}, which is a "
                f"{type(found).__name__} in the model, not a BatchNorm2d; is it the right skeleton?"
            )
    for bn in names.values():
        if isinstance(modules.get(bn), nn.BatchNorm2d):
            model.set_submodule(bn, nn.Identity())


def _add_attention_hooks(model: nn.Module, cfg: Mapping[str, Any]) -> None:
    """An export of quantized attention inputs stores ``q_quant`` / ``k_quant`` / ``v_quant`` layers; a
    fresh Hugging Face skeleton gets those hook modules (and the attention functions that call them) here."""
    modules = dict(model.named_modules())
    hooks = [n for n in cfg["layers"] if n.rpartition(".")[2] in ATTENTION_HOOKS and n not in modules]
    if hooks and hf_attention_modules(model):
        add_attention_hooks(model)


def _traced_pairs(model: nn.Module) -> dict[str, str]:
    from qat.config import QuantConfigError
    from qat.quant.bnpairs import find_conv_bn_pairs

    try:
        return find_conv_bn_pairs(model).pairs
    except QuantConfigError as e:
        raise ExportFormatError(
            f"{schema.CONFIG_FILE}: 'folded_bn: true' (an export from an older qatkit) needs a model "
            f"torch.fx can trace to find the folded BatchNorms; re-export it ({e})"
        ) from None
