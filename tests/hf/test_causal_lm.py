"""Causal LMs by name, GGUF file or folder (qat.hf.models.causal_lm) and their tokenizers."""

from __future__ import annotations

import pytest
import torch
from helpers.extras import require

require("transformers", extra="transformers")

from qat.hf.models import causal_lm, causal_tokenizer  # noqa: E402


def test_tiny_llama_has_its_tokenizer_vocabulary_and_a_fresh_model_each_time():
    a, b, tok = causal_lm("tiny_llama"), causal_lm("tiny_llama"), causal_tokenizer("tiny_llama")
    assert a is not b and a.config.vocab_size == len(tok) == 320 and not a.training
    ids = torch.tensor([tok("import os\n")["input_ids"]])
    assert torch.equal(a(ids).logits, b(ids).logits)  # seeded


def test_a_saved_folder_loads_back(tmp_path):
    causal_lm("tiny_llama").save_pretrained(tmp_path)
    causal_tokenizer("tiny_llama").save_pretrained(tmp_path)
    m = causal_lm(str(tmp_path), gradient_checkpointing=True)
    assert m.is_gradient_checkpointing and len(causal_tokenizer(str(tmp_path))) == 320


def test_a_path_that_is_no_model_is_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model.path: .* neither a .gguf file nor a model folder"):
        causal_lm(str(tmp_path))
