"""Which ``nn.Conv2d`` feeds which ``nn.BatchNorm2d``: the pairs that Conv-BN folding may fold.

A pair is found from the model's forward pass, never from names or definition order: the BN's input must
be exactly the conv's output tensor, and that output must be used by nothing else (a residual add that
also reads it would see the BN applied once folded). Two ways to look at the forward:

* ``example_inputs`` given: forward hooks on one eval-mode pass of a copy of the model find each BN whose
  input *is* a conv's output (the same tensor object, not changed in place since). Each candidate is then
  verified: on the copy, with random BN statistics so that no BN is close to an identity, the conv with
  its BN folded in must give the same output as conv then BN; a pair whose fold changes it is not folded.
* no example inputs: ``torch.fx`` traces the model; a BN node whose input is a conv node with no other
  user is a pair. A model fx cannot trace needs example inputs (:class:`~qat.config.QuantConfigError`).

Every BatchNorm2d that is not paired comes back with the reason, for ``model.qat_report``.
"""

from __future__ import annotations

import copy
import weakref
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qat.calibrate import _device, _to_device
from qat.config import QuantConfigError
from qat.quant.bnfold import QuantConvBn2d

NO_RUNNING_STATS = "no running statistics (track_running_stats=False)"
NOT_A_CONV_OUTPUT = "BN input is not a Conv2d's output"
BN_CALLED_TWICE = "BN is called more than once per forward"
# Relative difference above which a fold counts as changing the model's output (float folding itself
# changes it by rounding only, ~1e-6 relative).
VERIFY_RTOL = 1e-4


@dataclass
class ConvBnPairs:
    """``pairs``: ``{conv name: bn name}`` safe to fold; ``unfolded``: ``{bn name: why not}``."""

    pairs: dict[str, str] = field(default_factory=dict)
    unfolded: dict[str, str] = field(default_factory=dict)


def find_conv_bn_pairs(model: nn.Module, example_inputs: Any = None) -> ConvBnPairs:
    """The conv-BN pairs of ``model``, found from its forward pass (see the module docstring).

    ``example_inputs``: the positional arguments of one forward call (a tuple), or the single argument.
    The model is not changed (the analysis runs on a copy).
    """
    bns = [(n, m) for n, m in model.named_modules() if type(m) is nn.BatchNorm2d]
    if not bns or not any(type(m) is nn.Conv2d for m in model.modules()):
        return ConvBnPairs(unfolded={n: NOT_A_CONV_OUTPUT for n, _ in bns})
    if example_inputs is None:
        return _pairs_by_fx(model)
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    with torch.random.fork_rng(devices=[]):  # building the folded convs draws: keep the caller's stream
        return _pairs_by_hooks(model, args)


def _why_not(bn: nn.BatchNorm2d, calls: int, conv: str | None, conv_calls: int) -> str:
    """Why a BN cannot be folded into ``conv`` (the producer of its input, if a conv), or "" if it can."""
    if not bn.track_running_stats:
        return NO_RUNNING_STATS
    if calls == 0:
        return "BN is not called in the forward"
    if calls > 1:
        return BN_CALLED_TWICE
    if conv is None:
        return NOT_A_CONV_OUTPUT
    if conv_calls > 1:
        return f"conv {conv!r} is called more than once per forward"
    return ""


def _used_elsewhere(conv: str) -> str:
    return f"conv {conv!r} output is also used elsewhere (folding would change the output)"


def _pairs_by_fx(model: nn.Module) -> ConvBnPairs:
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as e:  # any tracing failure means the same thing to the user: give a sample
        detail = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        raise QuantConfigError(
            f"quant.fold_bn: torch.fx cannot trace this model ({detail}); pass example inputs: "
            "qat.prepare(model, config, example_inputs=...)"
        ) from None
    modules = dict(model.named_modules())
    nodes = [n for n in graph.nodes if n.op == "call_module"]
    calls = Counter(n.target for n in nodes)
    found = ConvBnPairs()
    for node in nodes:
        bn = modules[node.target]
        if type(bn) is not nn.BatchNorm2d:
            continue
        src = node.args[0] if node.args else None
        is_conv = isinstance(src, torch.fx.Node) and src.op == "call_module"
        conv = src.target if is_conv and type(modules[src.target]) is nn.Conv2d else None
        reason = _why_not(bn, calls[node.target], conv, calls[conv])
        if conv is not None and not reason:
            if len(src.users) == 1:
                found.pairs[conv] = node.target
                continue
            reason = _used_elsewhere(conv)
        found.unfolded[node.target] = reason
    for name, m in modules.items():  # BNs the traced forward never calls
        if type(m) is nn.BatchNorm2d and name not in calls:
            found.unfolded[name] = _why_not(m, 0, None, 0)
    return found


@torch.no_grad()
def _pairs_by_hooks(model: nn.Module, args: tuple[Any, ...]) -> ConvBnPairs:
    probe = copy.deepcopy(model).eval()
    args = _to_device(args, _device(probe))
    modules = dict(probe.named_modules())
    calls: Counter[str] = Counter()
    # id(conv output) -> (conv, weak reference to the output, its version counter then)
    produced: dict[int, tuple[str, weakref.ref[torch.Tensor], int]] = {}
    source: dict[str, str | None] = {}  # bn name -> the conv whose unchanged output is its input

    def conv_hook(name: str):
        def hook(_m: nn.Module, _inp: Any, out: torch.Tensor) -> None:
            calls[name] += 1
            produced[id(out)] = (name, weakref.ref(out), out._version)

        return hook

    def bn_hook(name: str):
        def hook(_m: nn.Module, inp: tuple[Any, ...]) -> None:
            calls[name] += 1
            x = inp[0] if inp else None
            hit = produced.get(id(x))
            same = hit is not None and hit[1]() is x and x._version == hit[2]  # not changed in place since
            source[name] = hit[0] if same else None  # type: ignore[index]

        return hook

    handles = []
    for name, m in modules.items():
        if type(m) is nn.Conv2d:
            handles.append(m.register_forward_hook(conv_hook(name)))
        elif type(m) is nn.BatchNorm2d:
            handles.append(m.register_forward_pre_hook(bn_hook(name)))
    try:
        probe(*args)
    finally:
        for h in handles:
            h.remove()
    produced.clear()

    found = ConvBnPairs()
    candidates: list[tuple[str, str]] = []
    for name, bn in modules.items():
        if type(bn) is not nn.BatchNorm2d:
            continue
        conv = source.get(name)
        reason = _why_not(bn, calls[name], conv, calls[conv] if conv else 0)
        if conv is not None and not reason:
            candidates.append((conv, name))
        else:
            found.unfolded[name] = reason
    changed = _folds_that_change_output(probe, candidates, args)
    for conv, bn in candidates:
        if (conv, bn) in changed:  # e.g. a residual also reads the conv output, or two BNs do
            found.unfolded[bn] = _used_elsewhere(conv)
        else:
            found.pairs[conv] = bn
    return found


def _folds_that_change_output(
    probe: nn.Module, candidates: list[tuple[str, str]], args: tuple[Any, ...]
) -> set[tuple[str, str]]:
    """The (conv, bn) candidates whose fold, tried one at a time on ``probe``, changes its output."""
    if not candidates:
        return set()
    gen = torch.Generator().manual_seed(0)
    for _, bn in candidates:  # statistics far from an identity BN, so that any misuse shows
        _randomize(probe.get_submodule(bn), gen)
    reference = _tensors(probe(*args))
    changed = set()
    for conv_name, bn_name in candidates:
        conv, bn = probe.get_submodule(conv_name), probe.get_submodule(bn_name)
        probe.set_submodule(conv_name, QuantConvBn2d.from_float(conv, bn, None, None).to_float())
        probe.set_submodule(bn_name, nn.Identity())
        out = _tensors(probe(*args))
        probe.set_submodule(conv_name, conv)
        probe.set_submodule(bn_name, bn)
        if len(out) != len(reference) or not all(map(_close, out, reference)):
            changed.add((conv_name, bn_name))
    return changed


def _randomize(bn: nn.BatchNorm2d, gen: torch.Generator) -> None:
    def draw(t: torch.Tensor, lo: float, hi: float) -> None:
        t.copy_(torch.empty(t.shape).uniform_(lo, hi, generator=gen))

    draw(bn.running_mean, -1.0, 1.0)
    draw(bn.running_var, 0.5, 2.0)
    if bn.affine:
        draw(bn.weight, 0.5, 2.0)
        draw(bn.bias, -1.0, 1.0)


def _tensors(out: Any) -> list[torch.Tensor]:
    """Every tensor in a forward's output (a tensor, or tuples / lists / dicts of them)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    a, b = a.double(), b.double()
    return bool((a - b).abs().max() <= VERIFY_RTOL * (1.0 + b.abs().max())) if a.numel() else True
