"""Reference models: small enough to train on CPU, with stable layer names for quantization configs."""

from qat.models.cnn import MLP, DigitsCNN
from qat.models.gpt import Block, CausalSelfAttention, MLPBlock, TinyGPT
from qat.models.text import TextClassifier

__all__ = ["MLP", "Block", "CausalSelfAttention", "DigitsCNN", "MLPBlock", "TextClassifier", "TinyGPT"]
