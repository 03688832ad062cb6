"""The optional-extras guard (tests/helpers/extras.py): a missing extra skips a test, unless
``QAT_EXPECT_EXTRAS`` says the environment has it (CI: ``all``), and then the test fails naming the extra."""

from __future__ import annotations

import pytest
from helpers.extras import require

MISSING = "qat_no_such_module_for_the_guard_test"


@pytest.mark.parametrize("expect", [None, "", "transformers, loggers", "onnx", "all", "sweeps,onnx"])
def test_a_missing_extra_skips_unless_it_is_expected(monkeypatch, expect):
    if expect is None:
        monkeypatch.delenv("QAT_EXPECT_EXTRAS", raising=False)
    else:
        monkeypatch.setenv("QAT_EXPECT_EXTRAS", expect)
    expected = expect is not None and ("all" in expect or "onnx" in expect)
    with pytest.raises(pytest.fail.Exception if expected else pytest.skip.Exception) as raised:
        require(MISSING, extra="onnx")
    message = "the `onnx` extra is missing: pip install -e '.[onnx]'" if expected else "the `onnx` extra"
    assert message in str(raised.value)


def test_a_present_module_is_returned_and_unknown_extras_are_refused(monkeypatch):
    monkeypatch.setenv("QAT_EXPECT_EXTRAS", "all")
    assert require("json", extra="onnx").dumps([1]) == "[1]"
    with pytest.raises(ValueError, match="unknown extra 'onx'"):
        require("json", extra="onx")


@pytest.mark.parametrize("expect,fails", [("all", False), ("llama", True), ("all,llama", True)])
def test_llama_is_expected_only_when_named(monkeypatch, expect, fails):
    # llama-cpp-python builds from source for minutes: setup.sh (and so "all") leaves it out.
    monkeypatch.setenv("QAT_EXPECT_EXTRAS", expect)
    with pytest.raises(pytest.fail.Exception if fails else pytest.skip.Exception):
        require(MISSING, extra="llama")
