"""The mutants of ``scripts/mutants.py``: named, deliberate bugs, each a list of exact textual edits.

Each mutant names the invariant it breaks and the default-suite tests that must catch it (most specific
first). Keep an edit's old text unique in its file; when the code moves, update the text here.
"""

from __future__ import annotations

from dataclasses import dataclass

# qat/deploy/packing.py: value i of a byte at bit (i % n) * c, and the mutants' reversed order.
SHIFTS = "shifts = torch.arange(per, dtype=torch.int16) * c\n"
REVERSED = "shifts = torch.arange(per - 1, -1, -1, dtype=torch.int16) * c\n"
# qat/rewrite.py: the attention quantizers (and the tied-weight plan) are built before the swaps.
ATTENTION = (
    "    hooks = attention.attention_quantizers(model, cfg.attention) if cfg.attention is not None else []\n"
)
SWAPS = "    for qname, qmod in swaps:\n        model.set_submodule(qname, qmod)\n"


@dataclass(frozen=True)
class Edit:
    file: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str


@dataclass(frozen=True)
class Mutant:
    name: str
    breaks: str  # the invariant the bug breaks
    edits: tuple[Edit, ...]
    tests: tuple[str, ...]  # default-suite test files / node ids that must catch it, most specific first


MUTANTS: list[Mutant] = [
    Mutant(
        "resume-ignores-checkpoint",
        "resume=true continues from the newest checkpoint (the mutant restarts from scratch)",
        (Edit("qat/train/resume.py", "    return str(found)\n", "    return None\n"),),
        ("tests/train/test_resume.py",),
    ),
    Mutant(
        "resume-replays-the-epoch",
        "a mid-epoch resume skips the batches already trained on",
        (
            Edit(
                "qat/train/resume.py",
                "bs.sampler.skip = skip_batches * int(bs.batch_size)",
                "bs.sampler.skip = 0",
            ),
        ),
        ("tests/train/test_resume.py",),
    ),
    Mutant(
        "ddp-scale-from-rank-zero-removed",
        "learned scales initialised from per-rank data start from rank 0's value on every rank",
        (
            Edit(
                "qat/quant/sources.py",
                "        dist.broadcast(t, src=0)\n",
                "        return\n",
            ),
        ),
        ("tests/train/test_ddp.py",),
    ),
    Mutant(
        "gemm-rescale-off-by-1pct",
        "the integer GEMM's float rescale is acc * sx * w_scale exactly",
        (
            Edit(
                "qat/quant/intgemm.py",
                "        y = torch.mul(acc, c.scale)  # int32 * float32 -> float32: float(acc) * scale\n",
                "        y = torch.mul(acc, c.scale) * 1.01\n",
            ),
        ),
        ("tests/deploy/test_oracle.py", "tests/quant/test_intgemm.py"),
    ),
    Mutant(
        "packing-order-swapped-in-pack",
        "pack writes value i at bit (i % n) * bits of its byte (unpack unchanged: round trips break)",
        (
            Edit(
                "qat/deploy/packing.py",
                "    u = u.reshape(-1, per)\n    " + SHIFTS,
                "    u = u.reshape(-1, per)\n    " + REVERSED,
            ),
        ),
        ("tests/deploy/test_packing.py", "tests/deploy/test_oracle.py"),
    ),
    Mutant(
        "packing-order-swapped-both-ways",
        "the packed layout is the documented one (pack and unpack agree with each other, not with the docs)",
        (
            Edit(
                "qat/deploy/packing.py",
                "    u = u.reshape(-1, per)\n    " + SHIFTS,
                "    u = u.reshape(-1, per)\n    " + REVERSED,
            ),
            Edit(
                "qat/deploy/packing.py",
                "    p = packed.to(torch.int16)\n    " + SHIFTS,
                "    p = packed.to(torch.int16)\n    " + REVERSED,
            ),
        ),
        ("tests/deploy/test_packing.py", "tests/deploy/test_oracle.py"),
    ),
    Mutant(
        "lsq-grad-scale-dropped",
        "learned scales get LSQ's gradient scale 1/sqrt(N * Qp)",
        (
            Edit(
                "qat/quant/sources.py",
                "return torch.clamp(ste.grad_scale(p, lsq_grad_scale(fq, x, p)).abs(), min=SCALE_EPS)",
                "return torch.clamp(p.abs(), min=SCALE_EPS)",
            ),
        ),
        ("tests/quant/test_quantizer_lsq.py",),
    ),
    Mutant(
        "lsq-plus-offset-grad-scale-dropped",
        "a learned LSQ+ offset gets the same gradient scale as the step",
        (
            Edit(
                "qat/quant/sources.py",
                "zp = ste.grad_scale(fq.zero_point, lsq_grad_scale(fq, x, fq.zero_point))",
                "zp = fq.zero_point",
            ),
        ),
        ("tests/quant/test_quantizer_lsq.py::test_lsq_plus_offset_gradient_has_the_lsq_scale",),
    ),
    Mutant(
        "ste-clip-mask-dropped",
        "the fake quant's gradient w.r.t. x is 0 outside the clipping range",
        (
            Edit(
                "qat/quant/ste.py",
                "    gx = _stopped(clipped, g) if needs[0] else None\n",
                "    gx = g if needs[0] else None\n",
            ),
        ),
        ("tests/quant/test_ste.py",),
    ),
    Mutant(
        "kernel-clip-mask-dropped",
        "the fused CPU kernel's straight-through gradient is 0 where the clip mask is set",
        (
            Edit(
                "qat/quant/kernels.cpp",
                "oi[i] = gi[i] & (static_cast<uint32_t>(mi[i]) - 1u);",
                "oi[i] = gi[i];",
            ),
        ),
        ("tests/quant/test_kernels.py",),
    ),
    Mutant(
        "observer-freeze-ignored",
        "a frozen observer no longer changes its range or scale",
        (
            Edit(
                "qat/quant/quantizer.py",
                "if self.observer is not None and self._obs_on and (",
                "if self.observer is not None and (",
            ),
        ),
        ("tests/quant/test_quantizer.py", "tests/train/test_schedule.py"),
    ),
    Mutant(
        "observer-freeze-one-step-late",
        "observers freeze at schedule.freeze_observers_step, not a step later",
        (
            Edit(
                "qat/train/schedule.py",
                "step < self.freeze_observers_step",
                "step <= self.freeze_observers_step",
            ),
        ),
        ("tests/train/test_schedule.py",),
    ),
    Mutant(
        "bn-fold-batch-statistics",
        "a frozen / eval-mode folded conv uses BN's running statistics, not the batch's",
        (
            Edit(
                "qat/quant/bnfold.py",
                "        return self._conv_forward(x, wq, self._folded_bias(factor))\n",
                "        y = self._conv_forward(x, wq, None) / factor.reshape(1, -1, 1, 1)\n"
                "        bn = self.bn\n"
                "        return nn.functional.batch_norm(\n"
                "            y, None, None, bn.weight, bn.bias, training=True, eps=bn.eps\n"
                "        )\n",
            ),
        ),
        ("tests/quant/test_bnfold.py",),
    ),
    Mutant(
        "prepare-swaps-as-it-goes",
        "a prepare error (here: a group size that does not divide one layer) leaves the model unchanged",
        (
            Edit(
                "qat/rewrite.py",
                "        swaps.append((qname, qmod))\n        report.quantized.append(",
                "        _set_submodule(model, qname, qmod)\n        report.quantized.append(",
            ),
        ),
        ("tests/test_prepare_errors.py", "tests/test_rewrite.py"),
    ),
    Mutant(
        "prepare-checks-attention-after-swapping",
        "a quant.attention error on a model without hook points leaves the model unchanged",
        (
            Edit("qat/rewrite.py", ATTENTION, ""),
            Edit("qat/rewrite.py", SWAPS, SWAPS + ATTENTION),
        ),
        ("tests/test_prepare_errors.py", "tests/test_rewrite.py"),
    ),
    Mutant(
        "exclude-glob-typo-accepted",
        "an exclude glob that matches no layer is an error (a typo would quantize a layer meant to be float)",
        (
            Edit(
                "qat/rewrite.py",
                '(("exclude", cfg.exclude), ("overrides", list(cfg.overrides)))',
                '(("overrides", list(cfg.overrides)),)',
            ),
        ),
        ("tests/test_prepare_errors.py", "tests/test_rewrite.py"),
    ),
    Mutant(
        "latency-in-seconds",
        "qat-eval latency figures are milliseconds",
        (
            Edit(
                "qat/deploy/evaluate.py",
                "times.append((time.perf_counter() - t0) * 1e3)",
                "times.append(time.perf_counter() - t0)",
            ),
        ),
        ("tests/deploy/test_latency.py",),
    ),
    Mutant(
        "latency-times-nothing",
        "qat-eval latency times the forward pass (the mutant starts the clock after it)",
        (
            Edit(
                "qat/deploy/evaluate.py",
                "        t0 = time.perf_counter()\n        predict(x)\n",
                "        predict(x)\n        t0 = time.perf_counter()\n",
            ),
        ),
        ("tests/deploy/test_latency.py",),
    ),
    Mutant(
        "export-logit-tolerance-10x-loose",
        "an export whose logits differ by more than LOGIT_TOL of their range fails verification",
        (
            Edit(
                "qat/deploy/verify.py",
                'if crit != "perplexity" and rel > logit_tol:',
                'if crit != "perplexity" and rel > 10 * logit_tol:',
            ),
        ),
        ("tests/deploy/test_verify_check.py",),
    ),
    Mutant(
        "size-forgets-zero-points",
        "qat.size counts the zero point of every asymmetric weight group (size_bytes, compression ratios)",
        (
            Edit(
                "qat/size.py",
                "        qparams += ZERO_POINT_BYTES * groups\n",
                "        qparams += 0 * groups\n",
            ),
        ),
        ("tests/test_size.py",),
    ),
    Mutant(
        "atomic-write-is-a-direct-write",
        "files are written to a temporary name and renamed into place (readers never see half a file)",
        (
            Edit(
                "qat/io.py",
                "        os.replace(tmp, path)\n",
                "        Path(tmp).unlink()\n        path.write_bytes(data)\n",
            ),
        ),
        ("tests/test_atomic_readers.py", "tests/test_atomic_writes.py"),
    ),
]
