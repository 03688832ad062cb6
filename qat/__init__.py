"""qat: quantization-aware training for PyTorch.

Public API (stable): ``QuantSpec``, ``QuantConfig``, ``prepare``, ``unprepare``, ``calibrate``,
``quantizers``, ``register_quant_module``; export and the integer runtime live in ``qat.export``.
"""

from qat.calibrate import calibrate
from qat.config import QuantConfig, QuantConfigError, QuantSpec
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
    "prepare",
    "quantizers",
    "register_quant_module",
    "unprepare",
]
__version__ = "0.1.0"
