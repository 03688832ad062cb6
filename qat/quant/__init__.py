"""Quantization layers, bottom up: ``ste`` (functions) -> ``quantizer`` (state) -> ``modules`` (layers)."""
