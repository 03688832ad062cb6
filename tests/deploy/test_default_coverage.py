"""The default run (no ``-m slow``) exports at least one format of every family: packed sub-byte ints,
binary, ternary, FP8 and dynamic activations (tests/deploy/test_export_digits.py), so moving the last one
of a family to the slow set fails here instead of silently shrinking what CI checks."""

from __future__ import annotations

from typing import Any

from test_export_digits import FAST, _cfg

from qat.config import QuantConfig, format_bits, format_kind

FAMILIES = {"int sub-byte (packed)", "binary", "ternary", "fp8", "dynamic activations"}


def _families(cfg: dict[str, Any]) -> set[str]:
    """The format families a quant config exports (its base specs and each override's)."""
    q = QuantConfig.from_dict(cfg)
    specs = [("weight", q.weight), ("activation", q.activation)]
    specs += [
        (side, q.spec_for(side, ov, glob))
        for glob, ov in q.overrides.items()
        for side in ov
        if side != "smooth"
    ]
    found = set()
    for side, spec in specs:
        if spec is None:
            continue
        kind = format_kind(spec.format)
        if side == "weight" and kind == "int" and format_bits(spec.format) < 8:
            found.add("int sub-byte (packed)")
        elif kind in ("binary", "ternary", "fp8"):
            found.add(kind)
        if side == "activation" and spec.dynamic:
            found.add("dynamic activations")
    return found


def test_the_default_export_tests_cover_every_format_family():
    covered = set().union(*(_families(_cfg(name)) for name in FAST))
    assert covered >= FAMILIES, f"no default export test for: {sorted(FAMILIES - covered)}"
