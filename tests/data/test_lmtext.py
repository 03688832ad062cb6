"""The offline causal-LM text: stdlib code and documentation, split by document, tokenized into windows."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.extras import require

require("transformers", extra="transformers")

from qat.data.lmtext import LMTextDataModule, documents, windows  # noqa: E402


@pytest.fixture(scope="module")
def dm():
    dm = LMTextDataModule("tiny_llama", seq_len=16, batch_size=4, max_docs=60, val_fraction=0.1,
                          test_fraction=0.1, max_windows={"test": 10})  # fmt: skip
    dm.setup()
    return dm


def test_documents_are_code_and_english_docs_in_a_fixed_order():
    docs = documents(["code", "docs"])
    names = [n for n, _ in docs]
    assert names == [n for n, _ in documents(["code", "docs"])] and len(set(names)) == len(names)
    assert any(n.endswith("json/decoder.py") for n in names) and "pydoc:if" in names
    assert not any("pydoc_data" in n for n in names)  # the docs' source file is not code
    with pytest.raises(ValueError, match=r"data.sources: 'wiki' is not valid; allowed: code, docs"):
        documents(["wiki"])


def test_splits_are_disjoint_by_document_and_windows_are_next_token_pairs(dm):
    parts = [set(dm.split_docs[s]) for s in ("train", "validation", "test")]
    assert sum(map(len, parts)) == 60 and not (
        parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2]
    )
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (4, 16) and (x[:, 1:] == y[:, :-1]).all()
    assert len(dm.splits["test"]) == 10 and dm.vocab_size == 320 == len(dm.tokenizer)
    text = dm.tokenizer.decode(dm.splits["validation"][0]["input_ids"])
    assert len(text) > 16  # real text: tokens of several bytes


def test_windows_keep_evenly_spaced_ones_under_a_limit():
    ids = np.arange(50)
    assert windows(ids, 4, None).tolist()[:2] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert windows(ids, 4, 3)[:, 0].tolist() == [0, 20, 45]  # windows 0, round(4.5) = 4, 9


def test_unknown_split_in_max_windows_is_one_line():
    with pytest.raises(
        ValueError, match=r"data.max_windows.val: unknown split; allowed: train, validation, test"
    ):
        LMTextDataModule("tiny_llama", max_windows={"val": 3})
