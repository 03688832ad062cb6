"""The export's pass / fail criteria (``qat.deploy.verify.check``) on hand-made figures: each criterion
fails on its own, exactly past its tolerance, and the closer of two references decides when there are two."""

from __future__ import annotations

from qat.deploy.verify import LOGIT_TOL, PPL_REL_TOL, check

AGREE = {"max_rel_logit_diff": 0.0, "max_abs_logit_diff": 0.0, "top1_agreement": 1.0}


def test_classification_needs_close_logits_and_full_top1_agreement() -> None:
    figures = dict(AGREE)
    assert check(figures, "classification") == [] and figures["passed"] is True
    at_tol = {**AGREE, "max_rel_logit_diff": LOGIT_TOL}
    assert check(at_tol, "classification") == []
    past = {**AGREE, "max_rel_logit_diff": 2 * LOGIT_TOL, "max_abs_logit_diff": 0.5}
    assert check(past, "classification") == [
        f"max |logit difference| 0.5 is {2 * LOGIT_TOL:.3g} of the logit range (allowed {LOGIT_TOL:g})"
    ]
    assert past["passed"] is False
    one_flip = {**AGREE, "top1_agreement": 0.99}
    assert check(one_flip, "classification") == ["top-1 agreement 99.00% (required 100%)"]


def test_the_closer_reference_decides_when_there_are_two() -> None:
    figures = {**AGREE, "max_rel_logit_diff": 1.0, "top1_agreement": 0.5}  # against the eval-mode model
    figures.update({f"{k}_best": v for k, v in AGREE.items()})  # against the per-sample closer reference
    assert check(figures, "classification") == []
    figures["max_rel_logit_diff_best"] = 2 * LOGIT_TOL
    assert len(check(figures, "classification")) == 1


def test_language_models_need_perplexities_equal_to_4_digits() -> None:
    ppl = {"perplexity_reference": 10.0}
    # The logit criterion does not apply to language models.
    assert check({**AGREE, "max_rel_logit_diff": 1.0, **ppl, "perplexity_exported": 10.0}, "lm") == []
    within = 10.0 * (1 + PPL_REL_TOL / 2)
    assert check({**AGREE, **ppl, "perplexity_exported": within}, "lm") == []
    fails = check({**AGREE, **ppl, "perplexity_exported": 10.0 * (1 + 2 * PPL_REL_TOL)}, "lm")
    assert len(fails) == 1 and "does not agree to 4 significant digits" in fails[0]
    assert check(dict(AGREE), "lm") == ["task=lm needs (inputs, targets) batches to compare perplexities"]
