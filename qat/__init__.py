"""qat: quantization-aware training for PyTorch.

Public API (stable): ``QuantSpec``, ``QuantConfig``, ``prepare``, ``unprepare``, ``calibrate``,
``quantizers``, ``register_quant_module``, ``export`` (``qat.export(model, out_dir)``) and
``load_quantized``; the rest of export and the integer runtime live in ``qat.deploy``.
"""

from qat.calibrate import calibrate
from qat.config import QuantConfig, QuantConfigError, QuantSpec
from qat.deploy import export, load_quantized
from qat.quant.modules import QUANT_MODULES, register_quant_module
from qat.quant.quantizer import FakeQuantizer
from qat.rewrite import AlreadyPreparedError, PrepareReport, prepare, quantizers, unprepare

__all__ = [
    "QUANT_MODULES",
    "AlreadyPreparedError",
    "FakeQuantizer",
    "PrepareReport",
    "QuantConfig",
    "QuantConfigError",
    "QuantSpec",
    "calibrate",
    "export",
    "load_quantized",
    "prepare",
    "quantizers",
    "register_quant_module",
    "unprepare",
]
__version__ = "0.1.0"
