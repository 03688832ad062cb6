"""Deploy trained QAT models: export to integer weights and run them in an integer runtime.

``qat.export`` (this package's :func:`export`) and ``qat.load_quantized`` are the public entry points.

``export(model, out_dir, batches=..., task=...)`` writes ``model.safetensors`` (integer / packed codes,
scales, zero points, float-kept tensors), ``quant_config.json`` (versioned schema, see
:mod:`qat.deploy.schema`) and ``export_report.json``, atomically, after checking that the reloaded model
matches the fake-quant one. ``load_quantized(out_dir, skeleton)`` rebuilds the inference model from those
two files alone. Inside: ``codec`` (format <-> tensors), ``storage`` (files, digests), ``registry`` (targets,
ops, layer types), ``exporter``, ``loader``, ``runtime``, ``qdq`` + ``onnx`` (the ONNX target), ``schema``.
"""

from qat.deploy.codec import ExportFormatError
from qat.deploy.exporter import ExportError, ExportReport, export
from qat.deploy.loader import load_quantized
from qat.deploy.schema import SCHEMA_VERSION
from qat.deploy.verify import VerificationError

__all__ = [
    "SCHEMA_VERSION",
    "ExportError",
    "ExportFormatError",
    "ExportReport",
    "VerificationError",
    "export",
    "load_quantized",
]
