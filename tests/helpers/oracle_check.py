"""Compare an exported model with the independent reference of :mod:`helpers.oracle`.

Two comparisons, both on real inputs:

* **layer by layer** (the precise one): hooks capture every quantized layer's input and output while the
  model runs; the oracle computes the layer from the same input. The float32 output may differ from the
  oracle's float64 value only by float32 rounding (``U = 2**-24`` per operation):
  - exact layers (embedding lookups, activation quantizers): equal to the oracle rounded to float32;
  - integer GEMMs (``Result.int_gemm``) in a runtime that claims them (``int_gemm=True``): the integer
    accumulator is exact and one rescale follows (int32 -> float32, ``sa * sw``, the product, the bias:
    at most 4 roundings), so ``|err| <= 8 U (|acc sa sw| + |bias|)``, a factor 2 to spare. A 1% error in
    the rescale is 10^4 times that. A code off by one changes an accumulator by a nonzero integer, i.e.
    the output by at least ``sa sw``, more than this bound wherever ``|acc| + |bias| / (sa sw) < 2**21``:
    for such outputs the check is an exact comparison of the integer accumulators;
  - everything else (float ops on dequantized values, or a model whose path is not the runtime's): the
    float32 sum of ``k`` products, ``|err| <= (k + 8) U (sum |x| |w| + |bias|)``.
* **whole model**: the float skeleton with every quantized layer replaced by an oracle layer (and the
  BatchNorms named by ``folded_bn`` replaced by identities, the float tensors loaded from the export),
  run end to end, against the runtime and the fake-quant model. Outputs of one layer feed the next, so a
  last-bit difference can flip a later code: the criterion is on the median difference
  (:func:`assert_close_logits`).

The quantized layers are computed by the oracle alone; ``qat`` only provides the model's float glue.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from helpers.oracle import Export, Result

U = 2.0**-24  # float32 unit roundoff
ROUNDINGS = 8  # twice the roundings of one rescale


def conv_geometry(mod: nn.Module) -> dict[str, Any] | None:
    """What the format does not store about a convolution: its float module's geometry."""
    if not isinstance(mod, (nn.Conv1d, nn.Conv2d)):
        return None
    keys = ("stride", "padding", "dilation", "groups", "padding_mode")
    return {k: getattr(mod, k) for k in keys}


def tolerance(res: Result, int_gemm: bool) -> np.ndarray:
    """Allowed ``|float32 - oracle|`` per output element (see the module docstring)."""
    if res.exact:
        return np.zeros_like(res.y)
    if int_gemm and res.int_gemm:
        return ROUNDINGS * U * res.mag
    return (res.k + ROUNDINGS) * U * res.mag_sum


def compare(res: Result, got: torch.Tensor, int_gemm: bool, where: str) -> float:
    """Assert ``got`` (float32) equals the oracle within :func:`tolerance`; return the worst error as a
    fraction of the tolerance (0 for exact layers)."""
    got64 = got.detach().double().cpu().numpy()
    assert got64.shape == res.y.shape, f"{where}: shape {got64.shape} vs oracle {res.y.shape}"
    if res.exact:
        want = res.y.astype(np.float32)
        bad = np.flatnonzero(got.detach().cpu().numpy() != want)
        assert bad.size == 0, (
            f"{where}: {bad.size} of {want.size} values differ from the oracle rounded to float32, e.g. "
            f"{got64.flat[bad[0]]!r} vs {float(want.flat[bad[0]])!r}"
        )
        return 0.0
    err = np.abs(got64 - res.y)
    tol = tolerance(res, int_gemm)
    ratio = err / np.maximum(tol, np.finfo(np.float64).tiny)
    worst = int(np.argmax(ratio))
    assert (err <= tol).all(), (
        f"{where}: {(err > tol).sum()} of {err.size} outputs off the oracle by more than float32 rounding "
        f"({'integer GEMM' if int_gemm and res.int_gemm else f'float sum of {res.k}'}); worst: "
        f"{got64.flat[worst]!r} vs {res.y.flat[worst]!r} (error {err.flat[worst]:.3g}, allowed "
        f"{tol.flat[worst]:.3g}, relative {err.flat[worst] / max(abs(res.y.flat[worst]), 1e-300):.3g})"
    )
    return float(ratio.max())


Forward = Callable[[nn.Module, Any], Any]


def call(model: nn.Module, x: Any) -> Any:
    return model(x)


def capture(
    model: nn.Module, names: Sequence[str], inputs: Sequence[Any], forward: Forward = call
) -> list[tuple[str, Any, Any]]:
    """``(layer, input, output)`` of every call of the named modules while ``forward(model, x)`` runs."""
    calls: list[tuple[str, Any, Any]] = []
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    assert not missing, f"the model has no module {missing[0]!r}"

    def hook(name: str) -> Callable:
        def record(_mod: nn.Module, args: tuple, out: Any) -> None:
            calls.append((name, args[0].detach().clone(), out.detach().clone()))

        return record

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            for x in inputs:
                forward(model, x)
    finally:
        for h in handles:
            h.remove()
    return calls


def check_layers(
    ref: Export,
    model: nn.Module,
    skeleton: nn.Module,
    inputs: Sequence[Any],
    int_gemm: bool,
    forward: Forward = call,
) -> dict[str, float]:
    """Every quantized layer of ``model`` against the oracle on the inputs it saw; returns the worst
    error / tolerance ratio per layer. ``int_gemm``: hold integer-GEMM layers to the rescale bound (the
    runtime claims that path; a fake-quant model may take either)."""
    geometry = {n: conv_geometry(m) for n, m in skeleton.named_modules()}
    worst: dict[str, float] = {}
    for name, x, y in capture(model, list(ref.layers), inputs, forward):
        res = ref.forward(name, x.numpy(), geometry.get(name))
        ratio = compare(res, y, int_gemm, f"{name} ({type(model).__name__})")
        worst[name] = max(worst.get(name, 0.0), ratio)
    unseen = sorted(set(ref.layers) - set(worst))
    assert not unseen, f"quantized layers never called, so never compared: {unseen}"
    return worst


class OracleLayer(nn.Module):
    """A quantized layer computed by the oracle (numpy), as a module of the float skeleton."""

    def __init__(self, ref: Export, name: str, geometry: dict[str, Any] | None) -> None:
        super().__init__()
        self.ref, self.name, self.geometry = ref, name, geometry

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res = self.ref.forward(self.name, x.detach().cpu().numpy(), self.geometry)
        return torch.from_numpy(res.y.astype(np.float32))


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def oracle_model(ref: Export, skeleton: nn.Module) -> nn.Module:
    """``skeleton`` (a float model of the exported architecture) with every quantized layer computed by
    the oracle, folded BatchNorms removed, and every other tensor loaded from the export."""
    modules = dict(skeleton.named_modules())
    for bn in ref.folded_bn().values():
        assert isinstance(modules[bn], (nn.BatchNorm2d, nn.Identity)), f"{bn}: not a BatchNorm"
        _set_module(skeleton, bn, nn.Identity())
    for name in ref.layers:
        _set_module(skeleton, name, OracleLayer(ref, name, conv_geometry(modules[name])))
    prefixes = tuple(f"{n}." for n in ref.layers)
    stored = dict.fromkeys(ref.config["float_tensors"]) | ref.config["aliases"]
    want = skeleton.state_dict()
    floats = {}
    for key, source in stored.items():
        if not key.startswith(prefixes):
            floats[key] = torch.from_numpy(ref.tensors[source or key]).to(want[key].dtype)
    skeleton.load_state_dict(floats, strict=True)
    return skeleton.eval()


def assert_close_logits(a: torch.Tensor, b: torch.Tensor, what: str) -> float:
    """Whole-model agreement: the median |difference| at most 1e-5 of the logit range; returns it.

    Not the maximum: a last-bit difference upstream can flip the odd code of a later layer (an
    activation or a dynamic scale within an ulp of a rounding boundary), which moves the logits of the
    samples or tokens it reaches by up to ~1e-3 of the range, or more at 2 bits. Flips are rare, so
    most logits stay at float32 rounding (~1e-7 of the range); an error in every output (a wrong
    scale, a dropped or mis-loaded layer) moves the median. The precise check is layer by layer."""
    diff = (a - b).abs().flatten().double()
    span = float(b.max() - b.min())
    median = float(diff.median()) / span
    assert median <= 1e-5, (
        f"{what}: median logit difference {median:.3g} of the range {span:.3g} "
        f"(max {float(diff.max()) / span:.3g}): more than float32 rounding and rare code flips"
    )
    return median


def assert_matches_oracle(
    out_dir: str | Path,
    make_skeleton: Callable[[], nn.Module],
    inputs: Sequence[Any],
    runtime: nn.Module | None = None,
    fake_quant: nn.Module | None = None,
    int_gemm: bool = True,
    forward: Forward = call,
    whole_model: bool = True,
) -> dict[str, Any]:
    """The export in ``out_dir`` against the oracle, on ``forward(model, x)`` for each of ``inputs``: the
    integer runtime (``qat.load_quantized`` of a fresh skeleton unless given; ``int_gemm=False`` for
    one loaded with ``int_matmul=False``) layer by layer and, with ``whole_model``, end to end; the
    eval-mode fake-quant model (optional) the same way. Returns the figures (worst error / tolerance
    per layer, logit differences as fractions of the range)."""
    import qat

    ref = Export(out_dir)
    if runtime is None:
        runtime = qat.load_quantized(out_dir, make_skeleton())
    models = {"runtime": (runtime, int_gemm)}
    if fake_quant is not None:
        models["fake_quant"] = (fake_quant, False)
    figures: dict[str, Any] = {}
    for what, (model, strict) in models.items():
        figures[f"{what}_layers"] = check_layers(ref, model, make_skeleton(), inputs, strict, forward)
    if not whole_model:
        return figures
    whole = oracle_model(ref, make_skeleton())
    with torch.no_grad():
        want = [forward(whole, x) for x in inputs]
        for what, (model, _) in models.items():
            got = [forward(model, x) for x in inputs]
            figures[f"{what}_logits"] = max(
                assert_close_logits(g, w, f"{what} vs oracle model") for g, w in zip(got, want, strict=True)
            )
    return figures
