"""The before/after table over every target an export holds (``qat.deploy.evaluate.compare``, behind
``qat-eval`` and the end of ``qat-train``): each target is run by its own engine and scored with the same
metric on the same batches, so an exact target shows the fake-quant model's metric."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.export_models import quant_cfg
from helpers.extras import require

require("transformers", extra="transformers")
require("gguf", extra="gguf")
require("compressed_tensors", extra="compressed-tensors")

from helpers.llm import byte_bpe, lm_batches, tiny_lm  # noqa: E402

import qat  # noqa: E402
from qat.deploy.evaluate import compare, format_table  # noqa: E402


def test_every_target_is_timed_in_its_engine_and_scores_the_fake_quant_metric(tmp_path, capsys):
    tok = byte_bpe()
    float_model = tiny_lm(vocab_size=len(tok))
    cfg = quant_cfg("gguf_q8_0") | {"activation": None, "exclude": ["lm_head", "*embed_tokens"]}
    model = qat.prepare(copy.deepcopy(float_model), cfg).eval()  # int8 blocks of 32: Q8_0 and W8A16 alike
    batches = lm_batches(tok)
    targets = ["gguf", "compressed-tensors"]
    qat.export(model, tmp_path / "e", batches=batches, task="lm", targets=targets, tokenizer=tok)

    rows = compare(float_model, model, tmp_path / "e", batches, "lm", batch_sizes=(1, 2), warmup=0, repeats=1)
    by_name = {r.name: r for r in rows}
    engines = ["integer (export)", "compressed-tensors (transformers)"]
    try:
        import llama_cpp  # noqa: F401

        engines.append("gguf (llama.cpp)")  # run only where the `llama` extra is built
    except ImportError:
        assert "gguf" in capsys.readouterr().out  # the note says which file was not timed
    assert sorted(by_name) == sorted(["float", "fake-quant", *engines])
    fake = by_name["fake-quant"].metric
    assert by_name["integer (export)"].metric == fake
    assert by_name["compressed-tensors (transformers)"].metric == pytest.approx(fake, rel=1e-6)
    if "gguf (llama.cpp)" in by_name:  # llama.cpp quantizes activations: close, not equal
        assert by_name["gguf (llama.cpp)"].metric == pytest.approx(fake, rel=2e-2)
    assert by_name["float"].metric != fake
    for r in rows:
        assert set(r.latency_ms) == {1, 2} and min(r.latency_ms.values()) > 0
    assert by_name["compressed-tensors (transformers)"].file_bytes > 0
    assert "compressed-tensors (transformers)" in format_table(rows, "lm")


@pytest.mark.parametrize("task", ["lm", "causal_lm"])
def test_language_model_tasks_are_scored_by_perplexity(task):
    """The table scores a run by its task's metric: uniform logits over 4 tokens give perplexity 4."""
    from qat.deploy.evaluate import primary_metric

    batches = [(torch.zeros(2, 3, dtype=torch.long), torch.tensor([[0, 1, 2], [3, 0, 1]]))]
    assert primary_metric(lambda x: torch.zeros(2, 3, 4), batches, task) == pytest.approx(4.0)
