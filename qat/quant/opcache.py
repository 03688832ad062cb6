"""Operands derived from a module's tensors (the integer GEMM operand of a weight: codes, sums, scales,
the kernel's packed copy), kept while those tensors are unchanged, so that evaluation pays for the
weight once per change instead of once per call.

Whether they changed is read on the host, with no device sync: each tensor's version counter (bumped by
every in-place write: optimizer steps, ``load_state_dict``'s copies, observer and scale updates), its
storage and device (new after ``.to()`` or ``load_state_dict(..., assign=True)``), and the count of
optimizer steps taken in this process, for fused optimizers (``fused=True``), which update parameters
without bumping their version counters. ``.to()`` and every other ``Module._apply`` empty the cache
outright (:class:`KeepsOperands`): a chain of them can put new storage at a freed address. Not seen:
writes through ``.data`` and in-place writes by code that is neither an ``Optimizer`` step nor a PyTorch
in-place op.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

_optimizer_steps = 0


def _count_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


_STEP_HOOK = register_optimizer_step_post_hook(_count_step)

Key = tuple[Any, ...]


class OperandCache:
    """One derived value and the key of the state it was built from. Never copied or pickled with its
    module: deep copies and unpickled modules start empty."""

    def __init__(self) -> None:
        self.key: Key | None = None
        self.value: Any = None

    def get(self, key: Callable[[], Key | None], build: Callable[[], Any]) -> Any:
        """The value for the current state: the kept one while ``key()`` equals the key read right after
        the last ``build()`` (which may itself update the state: a weight observer), else a new build.
        A key of None (state not readable) builds every time."""
        k = key()
        if k is None or k != self.key:
            value = build()
            self.key, self.value = key(), value
        return self.value

    def __deepcopy__(self, memo: dict[int, Any]) -> OperandCache:
        return OperandCache()

    def __reduce__(self) -> tuple[Any, ...]:
        return OperandCache, ()


class KeepsOperands:
    """Mixin of the ``nn.Module`` classes that keep :class:`OperandCache` s (one per ``slot``: the weight
    operand, the activation side), which ``.to()``, ``.half()`` and the rest of ``_apply`` empty."""

    def operand_cache(self, slot: str) -> OperandCache:
        caches = self.__dict__.setdefault("_operands", {})
        cache = caches.get(slot)
        if cache is None:
            cache = caches[slot] = OperandCache()
        return cache

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> Any:
        self.__dict__.pop("_operands", None)
        return super()._apply(fn, recurse)  # type: ignore[misc]


def tensors_key(tensors: Iterable[torch.Tensor | None], *extra: Any) -> Key | None:
    """Version, storage and device of each tensor, the optimizer step count and ``extra`` (plain values
    the operand also depends on); None where the tensors cannot be read (while ``torch.compile`` traces,
    inference-mode tensors, which have no version counter)."""
    if torch.compiler.is_compiling():
        return None
    try:
        key = tuple((t._version, t.data_ptr(), t.device) for t in tensors if t is not None)
    except RuntimeError:  # "Inference tensors do not track version counter"
        return None
    return (_optimizer_steps, *extra, *key)


def state_key(module: nn.Module, skip: nn.Module | None = None, *extra: Any) -> Key | None:
    """:func:`tensors_key` of every parameter and buffer of ``module`` and its submodules but ``skip``."""
    tensors: list[torch.Tensor | None] = []
    stack = [module]
    while stack:
        m = stack.pop()
        tensors += (*m._parameters.values(), *m._buffers.values())
        stack.extend(c for c in m._modules.values() if c is not None and c is not skip)
    return tensors_key(tensors, *extra)
