"""Verification: run the same batches through the fake-quant model and a reloaded runtime, compare outputs.

The integer runtime and the quantized layers share their arithmetic (``qat.quant.intgemm`` for integer
GEMMs, the same dequantised values elsewhere), and a quantized model in eval mode without autograd
computes exactly what the runtime computes. So the comparison is free-running (each model runs on its
own outputs, as deployed) and is expected to be exact; :func:`check` enforces the thresholds of the
export issue: classification top-1 agreement 100%, max |logit difference| at most 1e-3 of the logit
range; language models: perplexities equal to 4 significant digits (the logit figures are reported).

Runtimes with their own arithmetic (onnxruntime runs a QDQ graph: float matmuls of dequantised values)
sum in a different order, and an activation within float32 noise of a rounding boundary can land on the
neighbouring code. For those, ``compare(..., float_reference=True)`` also evaluates the reference's float
fake-quant forward (``*_float``) and scores each sample against the closer of the two (``*_best``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qat.calibrate import batch_inputs
from qat.tasks import TASKS

Forward = Callable[[nn.Module, Any], torch.Tensor]

LOGIT_TOL = 1e-3  # max |logit difference| / logit range
PPL_REL_TOL = 5e-5  # perplexities agree to 4 significant digits


def criterion(task: str | None) -> str | None:
    """What an export of ``task`` is checked by (its registry entry): "top1", "perplexity" or None."""
    return TASKS[task].verify if task in TASKS else None


class VerificationError(RuntimeError):
    """The reloaded export does not reproduce the fake-quant model; nothing was written."""


def logits_of(out: Any) -> torch.Tensor:
    """The logits of a model's output: the tensor itself, or a Hugging Face output's ``.logits``."""
    return getattr(out, "logits", out)


def default_forward(model: nn.Module, batch: Any) -> torch.Tensor:
    return logits_of(model(batch_inputs(batch)))


def targets_of(batch: Any) -> torch.Tensor | None:
    return batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None


class _Tally:
    """Running comparison of the candidate with one reference, or (``add_best``) with the closer of two."""

    def __init__(self) -> None:
        self.agree = self.items = 0
        self.max_diff = 0.0
        self.lo, self.hi = math.inf, -math.inf

    def add(self, r: torch.Tensor, c: torch.Tensor) -> None:
        self.max_diff = max(self.max_diff, float((r - c).abs().max()))
        self.lo, self.hi = min(self.lo, float(r.min())), max(self.hi, float(r.max()))
        self.agree += int((r.argmax(-1) == c.argmax(-1)).sum())
        self.items += r.shape[:-1].numel()

    def add_best(self, r: torch.Tensor, r2: torch.Tensor, c: torch.Tensor) -> None:
        d = torch.minimum((r - c).abs().amax(-1), (r2 - c).abs().amax(-1))
        self.max_diff = max(self.max_diff, float(d.max()))
        self.lo, self.hi = min(self.lo, float(r.min())), max(self.hi, float(r.max()))
        top = c.argmax(-1)
        self.agree += int(((r.argmax(-1) == top) | (r2.argmax(-1) == top)).sum())
        self.items += r.shape[:-1].numel()

    def figures(self, suffix: str = "") -> dict[str, Any]:
        rng = max(self.hi - self.lo, 1e-12)
        return {
            f"top1_agreement{suffix}": self.agree / max(self.items, 1),
            f"max_abs_logit_diff{suffix}": self.max_diff,
            f"logit_range{suffix}": self.hi - self.lo,
            f"max_rel_logit_diff{suffix}": self.max_diff / rng,
        }


@torch.no_grad()
def compare(
    reference: nn.Module,
    candidate: Callable[[Any], torch.Tensor] | nn.Module,
    batches: Iterable[Any],
    task: str | None = None,
    forward: Forward = default_forward,
    max_batches: int | None = None,
    float_reference: bool = False,
) -> dict[str, Any]:
    """Figures comparing ``candidate`` with ``reference`` on ``batches`` (both in eval mode, no grad).

    ``task``: "classification" (logits ``[B, C]``, targets ``[B]``), "lm" (logits ``[B, T, V]``, targets
    ``[B, T]``) or None (outputs compared elementwise, top-1 over the last dimension). ``float_reference``:
    also compare with ``reference``'s float fake-quant forward (autograd on: float matmuls of dequantised
    values, what a QDQ graph computes), as ``*_float`` figures and per sample the closer of the two,
    ``*_best`` (for runtimes with their own arithmetic).
    A ``candidate`` that is not a module is called as ``candidate(batch)``.
    """
    crit = criterion(task)
    n_batches = 0
    tally, tally_float, tally_best = _Tally(), _Tally(), _Tally()
    ref_correct = cand_correct = 0
    ref_nll = cand_nll = 0.0
    n_tokens = 0
    for batch in batches:
        if max_batches is not None and n_batches >= max_batches:
            break
        r = forward(reference, batch).float()
        c = (forward(candidate, batch) if isinstance(candidate, nn.Module) else candidate(batch)).float()
        if r.shape != c.shape:
            raise VerificationError(
                f"output shapes differ: reference {tuple(r.shape)}, reloaded {tuple(c.shape)}"
            )
        tally.add(r, c)
        if float_reference:
            with torch.enable_grad():
                rf = forward(reference, batch).detach().float()
            tally_float.add(rf, c)
            tally_best.add_best(r, rf, c)
        y = targets_of(batch)
        if y is not None and crit == "top1":
            ref_correct += int((r.argmax(-1) == y).sum())
            cand_correct += int((c.argmax(-1) == y).sum())
        if y is not None and crit == "perplexity":
            ref_nll += float(F.cross_entropy(r.reshape(-1, r.shape[-1]), y.reshape(-1), reduction="sum"))
            cand_nll += float(F.cross_entropy(c.reshape(-1, c.shape[-1]), y.reshape(-1), reduction="sum"))
            n_tokens += y.numel()
        n_batches += 1
    if n_batches == 0:
        raise VerificationError("verification got no batches")
    out: dict[str, Any] = {"batches": n_batches, "items": tally.items, **tally.figures()}
    if float_reference:
        out.update(tally_float.figures("_float"))
        out.update(tally_best.figures("_best"))
    if crit == "top1":
        out["accuracy_reference"] = ref_correct / tally.items
        out["accuracy_exported"] = cand_correct / tally.items
    if crit == "perplexity" and n_tokens:
        out["perplexity_reference"] = math.exp(ref_nll / n_tokens)
        out["perplexity_exported"] = math.exp(cand_nll / n_tokens)
    return out


def check(
    figures: dict[str, Any],
    task: str | None,
    logit_tol: float = LOGIT_TOL,
) -> list[str]:
    """The failed criteria, as sentences (empty when verification passes); sets ``figures["passed"]``.

    Classification and unspecified tasks: max |logit difference| at most ``logit_tol`` of the logit range,
    and for classification top-1 agreement 100%; both against the per-sample closer of two references when
    ``compare`` computed them. Language models: perplexities equal to 4 significant digits.
    """
    crit = criterion(task)
    sfx = "_best" if "max_rel_logit_diff_best" in figures else ""
    fails = []
    rel = figures[f"max_rel_logit_diff{sfx}"]
    if crit != "perplexity" and rel > logit_tol:  # language models: the perplexity criterion below
        fails.append(f"max |logit difference| {figures[f'max_abs_logit_diff{sfx}']:.3g} is {rel:.3g} of the "
                     f"logit range (allowed {logit_tol:g})")  # fmt: skip
    key = f"top1_agreement{sfx}"
    if crit == "top1" and figures[key] < 1.0:
        fails.append(f"top-1 agreement {100 * figures[key]:.2f}% (required 100%)")
    if crit == "perplexity":
        if "perplexity_reference" not in figures:
            fails.append("task=lm needs (inputs, targets) batches to compare perplexities")
        else:
            a, b = figures["perplexity_reference"], figures["perplexity_exported"]
            if abs(a - b) > PPL_REL_TOL * abs(a):
                fails.append(f"perplexity {b:.6g} vs {a:.6g} does not agree to 4 significant digits")
    figures["passed"] = not fails
    return fails
