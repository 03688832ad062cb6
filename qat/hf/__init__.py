"""Hugging Face model builders (an optional extra: ``pip install 'qatkit[transformers]'``): the pretrained
MiniLM and tiny random models, in :mod:`qat.hf.models`.

Quantizing a ``transformers`` model needs nothing from here: ``qat.prepare`` / ``calibrate`` / ``export`` /
``load_quantized`` handle GPT-2's ``Conv1D``, the attention hooks and tied weights themselves.
"""

try:
    import transformers  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without the extra installed
    raise ImportError(
        "qat.hf needs the optional dependency 'transformers': pip install 'qatkit[transformers]'"
    ) from e
