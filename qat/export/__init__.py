"""Export trained QAT models to integer weights and run them in an integer runtime.

``export(model, out_dir, batches=..., task=...)`` writes ``model.safetensors`` (integer / packed codes,
scales, zero points, float-kept tensors), ``quant_config.json`` (versioned schema, see
:mod:`qat.export.schema`) and ``export_report.json``, atomically, after checking that the reloaded model
matches the fake-quant one. ``load_quantized(out_dir, skeleton)`` rebuilds the inference model from those
two files alone.
"""

import sys as _sys
import types as _types

from qat.export.exporter import ExportError, ExportReport, export
from qat.export.loader import load_quantized
from qat.export.schema import SCHEMA_VERSION, ExportFormatError
from qat.export.verify import VerificationError

__all__ = [
    "SCHEMA_VERSION",
    "ExportError",
    "ExportFormatError",
    "ExportReport",
    "VerificationError",
    "export",
    "load_quantized",
]


class _CallableModule(_types.ModuleType):
    """Lets ``qat.export(model, out_dir)`` call :func:`export`; ``qat.export.<name>`` stays the package."""

    def __call__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return export(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
