"""Tests of optional extras (``pip install -e '.[onnx]'`` etc.): skip when the extra is not installed, but
fail when the environment says it should be.

``QAT_EXPECT_EXTRAS`` names the extras this environment must have: ``all``, or a comma list such as
``onnx,loggers``. CI (``.ci/run``) sets ``all``, since ``scripts/setup.sh`` installs every extra; a plain
``pytest`` after ``pip install -e .`` leaves it unset, and those tests skip with the extra's name.

    onnx = require("onnx", extra="onnx")             # at module level, or inside a test
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

EXTRAS = ("onnx", "transformers", "gguf", "compressed-tensors", "loggers", "sweeps", "llama")
NOT_IN_ALL = ("llama",)  # built from source in minutes: scripts/setup.sh leaves it out, so "all" does too
ENV = "QAT_EXPECT_EXTRAS"


def expected(extra: str) -> bool:
    """Whether ``QAT_EXPECT_EXTRAS`` says this environment has ``extra`` installed (``all``: every extra
    that ``scripts/setup.sh`` installs)."""
    names = {n.strip() for n in os.environ.get(ENV, "").split(",") if n.strip()}
    return extra in names or ("all" in names and extra not in NOT_IN_ALL)


def require(module: str, *, extra: str) -> ModuleType:
    """Import ``module`` (part of the optional ``extra``) and return it. If it cannot be imported: fail when
    ``QAT_EXPECT_EXTRAS`` expects the extra, skip otherwise (also at module level, like
    ``pytest.importorskip``)."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; pyproject.toml defines {', '.join(EXTRAS)}")
    try:
        return importlib.import_module(module)
    except ImportError as e:
        error = e  # failed or skipped below, outside this handler (no "during handling" chain in the report)
    if expected(extra):
        pytest.fail(
            f"the `{extra}` extra is missing: pip install -e '.[{extra}]' "
            f"(importing {module} failed: {error}; {ENV}={os.environ[ENV]})",
            pytrace=False,
        )
    pytest.skip(f"needs {module} (the `{extra}` extra: pip install -e '.[{extra}]')", allow_module_level=True)
