"""Fused CPU kernels for the fake quant's hot loops, bit for bit the PyTorch ops they replace.

In eager mode a fake quant is a chain of PyTorch ops, each a full pass over the tensor: the per-token
int8 fake quant of an activation is about a dozen passes (range, scale, round, clamp, mask, codes, value).
``kernels.cpp`` does each of these hot loops in one pass over float32 rows, with the same float
operations in the same order (compiled without fast-math or contraction), so values, masks and codes are
equal bit for bit (``tests/quant/test_kernels.py`` compares them with the PyTorch ops on ties, clipped,
infinite and NaN values):

* :func:`affine_rows`: :func:`qat.quant.ste.affine_parts` (value, clip mask, codes);
* :func:`dequant_rows`: :func:`qat.quant.ste.affine_dequant` (the value from the codes);
* :func:`stopped`: :func:`qat.quant.ste._stopped` (the straight-through gradient where the mask is 0);
* :func:`finite_range`: :func:`qat.quant.observers.finite_range` (per-row min/max of the finite values).

Each returns None when the call is not one it covers, and the caller runs its PyTorch ops: not eager
(``torch.compile`` fuses the PyTorch ops itself; a JIT trace must see them), not plain contiguous float32
CPU tensors, a tensor autograd records through (a double backward), or scales that are not one per
leading index (a per-channel activation scale on dim 1).

The file is compiled on first use with ``torch.utils.cpp_extension`` (about 35 s), then imported from
``$TORCH_EXTENSIONS_DIR/<build_name()>`` (by default under ``~/.cache/torch_extensions``);
``QAT_KERNELS=0`` (read at import) turns the kernels off (for comparisons), and a machine without a C++
compiler runs the PyTorch ops after one warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.cpp")
CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"]
_CODE_KINDS = {None: 0, torch.int8: 1, torch.uint8: 2}  # the codes' dtype -> kernels.cpp's code_kind

# "off": QAT_KERNELS=0 (read at import) or inside disabled().
_state: dict[str, ModuleType | bool | None] = {
    "module": None,
    "tried": False,
    "off": os.environ.get("QAT_KERNELS", "1") == "0",
}


def load() -> ModuleType | None:
    """The compiled kernels (built on the first call), or None when they are off or cannot be built."""
    if _state["off"]:
        return None
    if not _state["tried"]:
        _state["tried"] = True
        try:
            _state["module"] = _import_or_build()
        except Exception as e:  # no compiler, no headers: the PyTorch ops do the same work
            log.warning(
                "fused fake-quant kernels unavailable (%s); using PyTorch ops", str(e).splitlines()[0]
            )
    return _state["module"]  # type: ignore[return-value]


def build_name() -> str:
    """The extension's name, from a digest of its source, flags and torch version: each version (another
    checkout, a mutant of the mutation check) builds in its own directory and never loads another's."""
    key = SOURCE.read_bytes() + " ".join([*CFLAGS, torch.__version__]).encode()
    return "qat_fake_quant_kernels_" + hashlib.sha256(key).hexdigest()[:12]


def _import_or_build() -> ModuleType:
    """The library built for this source before (imported directly: no build tool runs), else a build."""
    from torch.utils.cpp_extension import load as build

    name = build_name()
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    directory = Path(root) / name
    library = directory / f"{name}.so"
    if library.is_file():
        try:
            spec = importlib.util.spec_from_file_location(name, library)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        except ImportError:  # a build cut short: build it again
            library.unlink()
    directory.mkdir(parents=True, exist_ok=True)
    _ninja_on_path()
    return build(name, [str(SOURCE)], extra_cflags=CFLAGS, build_directory=str(directory), verbose=False)


def _ninja_on_path() -> None:
    """The build runs ``ninja`` from PATH: without one there, the ``ninja`` package's (a dependency)."""
    if shutil.which("ninja") is None:
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """The PyTorch ops everywhere inside the block (what the kernels are compared with)."""
    before = _state["off"]
    _state["off"] = True
    try:
        yield
    finally:
        _state["off"] = before


def _plain(*tensors: torch.Tensor) -> bool:
    """Eager, and every tensor a plain contiguous float32 CPU tensor (no subclass, not traced) that
    autograd does not record through (the kernels' outputs have no gradient: inside the fake quant's
    autograd Functions, and in backward passes unless they build a graph themselves)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    recording = torch.is_grad_enabled()
    for t in tensors:
        if type(t) is not torch.Tensor or t.dtype != torch.float32 or not t.is_cpu or not t.is_contiguous():
            return False
        if recording and t.requires_grad:
            return False
    return True


def _leading(x: torch.Tensor, p: torch.Tensor) -> int | None:
    """k when ``p`` broadcasts on ``x`` as one value per index of x's first k dimensions (0: one value for
    all), else None."""
    if p.numel() == 1:
        return 0
    if p.dim() > x.dim():
        return None
    shape = [1] * (x.dim() - p.dim()) + list(p.shape)
    k = len(shape)
    while k and shape[k - 1] == 1:
        k -= 1
    return k if shape[:k] == list(x.shape[:k]) else None


def _ready(
    x: torch.Tensor, s: torch.Tensor, z: torch.Tensor
) -> tuple[ModuleType, int, torch.Tensor, torch.Tensor] | None:
    """(the compiled kernels, rows, flat scale, flat zero point) of the kernels' row layout of ``x``, or
    None (a layout they do not cover, or no kernels)."""
    ks, kz = _leading(x, s), _leading(x, z)
    if ks is None or kz is None or x.numel() == 0 or (ks and kz and ks != kz):
        return None
    kernels = load()
    if kernels is None:
        return None
    rows = math.prod(x.shape[: max(ks, kz)])
    return kernels, rows, s.detach().reshape(-1).contiguous(), z.detach().reshape(-1).contiguous()


def affine_rows(
    x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmin: int, qmax: int, codes: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """:func:`qat.quant.ste.affine_parts` of ``x`` (value, bool clip mask, and codes of dtype ``codes``
    unless None), shaped like ``x``; None when not covered."""
    if codes not in _CODE_KINDS or not _plain(x, s, z):
        return None
    ready = _ready(x, s, z)
    if ready is None:
        return None
    kernels, rows, sf, zf = ready
    out = kernels.affine_rows(
        x.detach().reshape(rows, -1), sf, zf, float(qmin), float(qmax), _CODE_KINDS[codes]
    )
    y, mask, *c = (t.reshape(x.shape) for t in out)
    return y, mask, (c[0] if c else None)


def dequant_rows(codes: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor | None:
    """:func:`qat.quant.ste.affine_dequant` to float32 of int8/uint8 ``codes``; None when not covered."""
    if codes.dtype not in (torch.int8, torch.uint8) or not _plain(s, z) or not codes.is_contiguous():
        return None
    ready = _ready(codes, s, z)
    if ready is None:
        return None
    kernels, rows, sf, zf = ready
    return kernels.dequant_rows(codes.reshape(rows, -1), sf, zf).reshape(codes.shape)


def stopped(clipped: torch.Tensor, g: torch.Tensor) -> torch.Tensor | None:
    """``g`` where the bool mask ``clipped`` is False, else 0 (``torch.where(clipped, 0.0, g)``); None
    when not covered."""
    if (
        clipped.dtype != torch.bool
        or clipped.shape != g.shape
        or not _plain(g)
        or not clipped.is_contiguous()
    ):
        return None
    kernels = load()
    return None if kernels is None else kernels.stopped(g, clipped)


def finite_range(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-row (min, max) of the 2-D ``rows`` with inf/NaN counted as 0; None when not covered."""
    if rows.dim() != 2 or rows.shape[1] == 0 or not _plain(rows):
        return None
    kernels = load()
    if kernels is None:
        return None
    lo, hi = kernels.finite_range(rows.detach())
    return lo, hi
