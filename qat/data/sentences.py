"""English sentences that exist offline: docstrings and comments of the installed Python standard library.

Docstrings come from ``ast`` (module, class and function docstrings), comments from full-line ``#``
comments (consecutive lines joined into one block). Blocks are cut into paragraphs and sentences, and only
prose is kept: a capital first letter, a final ``.``/``!``/``?``, mostly letters, 5 to 60 words, nothing
that looks like code or a doctest. The split is by module (a file lands wholly in train, validation or
test, as in :mod:`qat.data.pytext`), and a sentence that occurs in several modules is kept once, in the
first of test, validation, train, so no test sentence is seen in training.

Batches are ``(input_ids [B, T] int64, attention_mask [B, T] int64)``, padded to the longest sentence of
the batch and truncated to ``seq_len`` tokens (the MiniLM tokenizer by default).
"""

from __future__ import annotations

import ast
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import torch

from qat.data.common import SplitsDataModule
from qat.data.pytext import split_files, stdlib_py_files

SPLITS = ("train", "validation", "test")
MIN_WORDS, MAX_WORDS = 5, 60
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
# Anything that looks like code, markup or a link: call syntax, operators, brackets, backquotes, dunders.
_CODE_HINTS = re.compile(r">>>|::|->|\w\(|\(\)|[{}\[\]=`$\\@]|__|https?:|www\.")
_SKIP_COMMENTS = re.compile(r"^(!|-\*-|noqa|type:|pragma|fmt:|XXX|TODO|FIXME|Copyright|[-=#*~]+$)", re.I)


def is_prose(sentence: str) -> bool:
    """A natural-language sentence rather than code, a heading or a fragment."""
    words = sentence.split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS:
        return False
    if not sentence[0].isupper() or sentence[-1] not in ".!?":
        return False
    if _CODE_HINTS.search(sentence):
        return False
    visible = [c for c in sentence if not c.isspace()]
    return sum(c.isalpha() for c in visible) >= 0.85 * len(visible)


def split_sentences(block: str) -> list[str]:
    """Paragraphs (blank-line separated) joined into single lines, then cut at sentence ends."""
    out = []
    for para in re.split(r"\n\s*\n", block):
        lines = [line.strip() for line in para.strip().splitlines()]
        if any(line.startswith((">>>", "...", "-", "*", "|", "+")) for line in lines):
            continue  # doctests, bullet lists and tables are not running prose
        text = " ".join(line for line in lines if line)
        out.extend(s.strip() for s in _SENTENCE_END.split(text) if s.strip())
    return [s for s in out if is_prose(s)]


_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _docstrings(node: ast.AST) -> list[str]:
    """Docstrings of the module and every class/function in it, visiting statements only (docstrings
    never hide inside expressions, and skipping those is most of the speed of this pass)."""
    out = []
    if isinstance(node, _DOC_NODES) and (doc := ast.get_docstring(node, clean=True)):
        out.append(doc)
    for field in ("body", "orelse", "finalbody", "handlers", "cases"):
        for child in getattr(node, field, ()):
            if isinstance(child, (ast.stmt, ast.excepthandler, ast.match_case)):
                out.extend(_docstrings(child))
    return out


def _comment_blocks(source: str) -> list[str]:
    """Runs of consecutive full-line ``#`` comments, each run as one text block."""
    blocks: list[list[str]] = []
    previous = -2
    for i, line in enumerate(source.splitlines()):
        stripped = line.strip()
        if not stripped.startswith("#"):
            continue
        text = stripped.lstrip("#").strip()
        if _SKIP_COMMENTS.match(text):
            continue
        if i == previous + 1 and blocks:
            blocks[-1].append(text)
        else:
            blocks.append([text])
        previous = i
    return ["\n".join(b) for b in blocks]


def module_sentences(path: Path) -> list[str]:
    """Prose sentences from one file's docstrings and comments (empty for unreadable/unparsable files)."""
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (UnicodeDecodeError, SyntaxError, ValueError):
        return []
    out: list[str] = []
    for block in [*_docstrings(tree), *_comment_blocks(source)]:
        out.extend(split_sentences(block))
    return out


def sentence_splits(
    root: str | Path | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    max_files: int | None = None,
) -> datasets.DatasetDict:
    """Untokenised ``{"train", "validation", "test"}`` datasets with columns ``text`` and ``module``.

    Deterministic for a given Python install and ``seed``; each sentence occurs once across all splits.
    """
    files = stdlib_py_files(root)
    base = Path(root) if root is not None else files[0].parent
    if max_files is not None:
        random.Random(seed).shuffle(files)
        files = sorted(files[:max_files])
    by_split = split_files(files, val_fraction, test_fraction, seed)
    seen: set[str] = set()
    splits = {}
    for split in ("test", "validation", "train"):
        texts, modules = [], []
        for path in sorted(by_split[split]):
            name = path.relative_to(base).as_posix() if path.is_relative_to(base) else path.name
            for s in module_sentences(path):
                key = " ".join(s.lower().split())
                if key in seen:
                    continue
                seen.add(key)
                texts.append(s)
                modules.append(name)
        if not texts:
            raise ValueError(f"split {split!r} has no sentences; use more files (max_files={max_files})")
        splits[split] = datasets.Dataset.from_dict({"text": texts, "module": modules})
    return datasets.DatasetDict({s: splits[s] for s in SPLITS})


def tokenize_splits(splits: datasets.DatasetDict, tokenizer: Any, seq_len: int) -> datasets.DatasetDict:
    """Add ``input_ids`` / ``attention_mask`` columns (truncated to ``seq_len``, not padded)."""

    def encode(rows: dict[str, list[Any]]) -> dict[str, Any]:
        enc = tokenizer(rows["text"], truncation=True, max_length=seq_len)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    return splits.map(encode, batched=True, batch_size=1000, desc=None)


def pad_collate(rows: list[dict[str, Any]], pad_token_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a batch to its longest sentence: ``(input_ids [B, T], attention_mask [B, T])``."""
    length = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), length), pad_token_id, dtype=torch.int64)
    mask = torch.zeros((len(rows), length), dtype=torch.int64)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.as_tensor(r["input_ids"])
        mask[i, :n] = 1
    return ids, mask


class _Collate:
    """Picklable collate with the tokenizer's pad id (DataLoader workers pickle it)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_collate(rows, self.pad_token_id)


class SentencesDataModule(SplitsDataModule):
    """Stdlib docstring/comment sentences, tokenised; batches ``(input_ids, attention_mask)``.

    ``tokenizer``: a folder with a Hugging Face tokenizer (default: the packaged MiniLM's).
    ``max_train`` / ``max_val`` / ``max_test``: seeded subsamples (the test set also feeds the
    nearest-neighbour retrieval metric, which compares every test sentence with every other).
    """

    def __init__(
        self,
        tokenizer: str | None = None,
        seq_len: int = 64,
        batch_size: int = 32,
        max_train: int | None = None,
        max_val: int | None = 1000,
        max_test: int | None = 2000,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        max_files: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        root: str | None = None,
    ) -> None:
        super().__init__(batch_size, seed, num_workers, val_fraction, test_fraction)
        if seq_len < 4:
            raise ValueError(f"data.seq_len: {seq_len!r} is not valid; allowed: an integer >= 4")
        self.tokenizer_path = tokenizer
        self.seq_len = seq_len
        self.caps = {"train": max_train, "validation": max_val, "test": max_test}
        self.max_files = max_files
        self.root = root
        self.pad_token_id = 0

    def setup(self, stage: str | None = None) -> None:
        """Extract, split, subsample and tokenise once; later calls are no-ops."""
        if self.splits is not None:
            return
        from qat.hf.models import load_tokenizer

        tokenizer = load_tokenizer(self.tokenizer_path)
        self.pad_token_id = int(tokenizer.pad_token_id or 0)
        splits = sentence_splits(self.root, self.val_fraction, self.test_fraction, self.seed, self.max_files)
        for name, cap in self.caps.items():
            if cap is not None and len(splits[name]) > cap:
                splits[name] = splits[name].shuffle(seed=self.seed).select(range(cap))
        self.splits = tokenize_splits(splits, tokenizer, self.seq_len)

    def collate_fn(self) -> Callable[[list[dict[str, Any]]], Any]:
        return _Collate(self.pad_token_id)

    def dataset(self, split: str) -> datasets.Dataset:
        return self.splits[split].select_columns(["input_ids", "attention_mask"])
