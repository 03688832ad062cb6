"""Verification: run the same batches through the fake-quant model and a reloaded runtime, compare outputs.

The figures (top-1 agreement, max |logit difference| relative to the logit range, task metrics such as
accuracy or perplexity for both models) go into ``export_report.json``; :func:`check` turns them into a
pass/fail with thresholds from the export issue: 100% top-1 agreement and max |diff| at most 1e-3 of the
logit range for classification, perplexities equal to 4 significant digits for language models.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Forward = Callable[[nn.Module, Any], torch.Tensor]

LOGIT_TOL = 1e-3  # max |logit difference| / logit range
PPL_REL_TOL = 5e-5  # perplexities agree to 4 significant digits


class VerificationError(RuntimeError):
    """The reloaded export does not reproduce the fake-quant model; nothing was written."""


def default_forward(model: nn.Module, batch: Any) -> torch.Tensor:
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    return model(x)


def targets_of(batch: Any) -> torch.Tensor | None:
    return batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None


@torch.no_grad()
def compare(
    reference: nn.Module,
    candidate: Callable[[Any], torch.Tensor] | nn.Module,
    batches: Iterable[Any],
    task: str | None = None,
    forward: Forward = default_forward,
    max_batches: int | None = None,
    candidate_forward: Forward | None = None,
) -> dict[str, Any]:
    """Figures comparing ``candidate`` with ``reference`` on ``batches`` (both in eval mode, no grad).

    ``task``: "classification" (logits ``[B, C]``, targets ``[B]``), "lm" (logits ``[B, T, V]``, targets
    ``[B, T]``) or None (outputs compared elementwise, top-1 over the last dimension).
    """
    cf = candidate_forward or forward
    n_batches = n_items = agree = 0
    max_diff = 0.0
    lo, hi = math.inf, -math.inf
    ref_correct = cand_correct = 0
    ref_nll = cand_nll = 0.0
    n_tokens = 0
    for batch in batches:
        if max_batches is not None and n_batches >= max_batches:
            break
        r = forward(reference, batch).float()
        c = (cf(candidate, batch) if isinstance(candidate, nn.Module) else candidate(batch)).float()
        if r.shape != c.shape:
            raise VerificationError(
                f"output shapes differ: reference {tuple(r.shape)}, reloaded {tuple(c.shape)}"
            )
        max_diff = max(max_diff, float((r - c).abs().max()))
        lo, hi = min(lo, float(r.min())), max(hi, float(r.max()))
        rt, ct = r.argmax(-1), c.argmax(-1)
        agree += int((rt == ct).sum())
        n_items += rt.numel()
        y = targets_of(batch)
        if y is not None and task == "classification":
            ref_correct += int((rt == y).sum())
            cand_correct += int((ct == y).sum())
        if y is not None and task == "lm":
            ref_nll += float(F.cross_entropy(r.reshape(-1, r.shape[-1]), y.reshape(-1), reduction="sum"))
            cand_nll += float(F.cross_entropy(c.reshape(-1, c.shape[-1]), y.reshape(-1), reduction="sum"))
            n_tokens += y.numel()
        n_batches += 1
    if n_batches == 0:
        raise VerificationError("verification got no batches")
    rng = max(hi - lo, 1e-12)
    out: dict[str, Any] = {
        "batches": n_batches,
        "items": n_items,
        "top1_agreement": agree / n_items,
        "max_abs_logit_diff": max_diff,
        "logit_range": hi - lo,
        "max_rel_logit_diff": max_diff / rng,
    }
    if task == "classification" and ref_correct + cand_correct >= 0 and n_items:
        out["accuracy_reference"] = ref_correct / n_items
        out["accuracy_exported"] = cand_correct / n_items
    if task == "lm" and n_tokens:
        out["perplexity_reference"] = math.exp(ref_nll / n_tokens)
        out["perplexity_exported"] = math.exp(cand_nll / n_tokens)
    return out


def check(figures: dict[str, Any], task: str | None, logit_tol: float = LOGIT_TOL) -> list[str]:
    """The failed criteria, as sentences (empty when verification passes).

    Classification (and unknown tasks): top-1 agreement 100% (classification only) and max |logit
    difference| at most ``logit_tol`` of the logit range. Language models: perplexities equal to 4
    significant digits; their max logit difference is reported, not enforced, because over hundreds of
    thousands of positions an exact integer GEMM and the float GEMM of the fake-quant model round a few
    activations to neighbouring codes, and one such flip moves a few logits by more than 1e-3 of the range.
    """
    fails = []
    if task != "lm" and figures["max_rel_logit_diff"] > logit_tol:
        fails.append(
            f"max |logit difference| {figures['max_abs_logit_diff']:.3g} is "
            f"{figures['max_rel_logit_diff']:.3g} of the logit range (allowed {logit_tol:g})"
        )
    if task == "classification" and figures["top1_agreement"] < 1.0:
        fails.append(f"top-1 agreement {100 * figures['top1_agreement']:.2f}% (required 100%)")
    if task == "lm":
        if "perplexity_reference" not in figures:
            fails.append("task=lm needs (inputs, targets) batches to compare perplexities")
        else:
            a, b = figures["perplexity_reference"], figures["perplexity_exported"]
            if abs(a - b) > PPL_REL_TOL * abs(a):
                fails.append(f"perplexity {b:.6g} vs {a:.6g} does not agree to 4 significant digits")
    figures["passed"] = not fails
    return fails
