"""Offline text for pretrained causal LMs: the installed Python's standard library code and its English
documentation, tokenized with the model's tokenizer into windows, split into train/validation/test by
document.

Documents (``sources``): ``code``, every stdlib ``.py`` file of :func:`qat.data.pytext.stdlib_py_files`;
``docs``, the topics of the Python documentation that ship with the interpreter (``pydoc_data.topics``,
what ``help("if")`` prints: English prose about the language). Each document goes whole into one split
(seeded, :func:`qat.data.pytext.split_files`), so no test text was seen in training. A split is its
documents tokenized (through ``datasets``), each followed by the tokenizer's EOS token, joined and cut into
``seq_len + 1`` windows; ``max_windows`` keeps that many windows per split, evenly spaced over the split so
code and prose both stay in it. Batches: ``(inputs [B, T], targets [B, T])`` like every LM datamodule.
"""

from __future__ import annotations

import random
import sysconfig
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from qat.data.common import SplitsDataModule, lm_collate
from qat.data.pytext import read_utf8, split_files, stdlib_py_files

SPLITS = ("train", "validation", "test")


def _code(root: str | None) -> list[tuple[str, str]]:
    base = Path(root or sysconfig.get_paths()["stdlib"])
    out = []
    for path in stdlib_py_files(root):
        data = read_utf8(path)
        if data is not None and path.parent.name != "pydoc_data":  # pydoc_data holds the docs source
            out.append((path.relative_to(base).as_posix(), data.decode("utf-8")))
    return out


def _docs(root: str | None) -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    return [(f"pydoc:{name}", topics[name]) for name in sorted(topics)]


SOURCES: dict[str, Callable[[str | None], list[tuple[str, str]]]] = {"code": _code, "docs": _docs}


def documents(sources: list[str], root: str | None = None) -> list[tuple[str, str]]:
    """``(name, text)`` of every document of ``sources`` (names of :data:`SOURCES`), in a fixed order."""
    for s in sources:
        if s not in SOURCES:
            raise ValueError(f"data.sources: {s!r} is not valid; allowed: {', '.join(SOURCES)}")
    return [doc for s in sources for doc in SOURCES[s](root)]


def windows(ids: np.ndarray, seq_len: int, limit: int | None) -> np.ndarray:
    """Non-overlapping ``seq_len + 1`` windows of ``ids`` (``[N, seq_len + 1]``), at most ``limit`` of them,
    evenly spaced."""
    n = len(ids) // (seq_len + 1)
    out = ids[: n * (seq_len + 1)].reshape(n, seq_len + 1)
    if limit is not None and n > limit:
        out = out[np.linspace(0, n - 1, limit).round().astype(int)]
    return out


class LMTextDataModule(SplitsDataModule):
    """Stdlib code and documentation as token windows of ``tokenizer`` (a name or path that
    :func:`qat.hf.models.causal_tokenizer` takes: ``smollm2``, ``tiny_llama``, a GGUF file, a folder).

    ``max_docs``: a seeded sample of that many documents (None: all); ``max_windows``: windows kept per
    split, ``{train: n, validation: n, test: n}`` (a missing or null entry: all). ``teacher_cache`` /
    ``teacher_topk``: the distillation's cache of teacher logits (:mod:`qat.train.lm_distill`).
    After ``setup``: ``tokenizer`` (the object, saved into the run directory by the job), ``vocab_size``,
    ``split_docs`` (the document names of each split).
    """

    def __init__(
        self,
        tokenizer: str = "smollm2",
        sources: list[str] | None = None,
        seq_len: int = 128,
        batch_size: int = 8,
        max_docs: int | None = None,
        max_windows: Mapping[str, int | None] | None = None,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        seed: int = 0,
        num_workers: int = 0,
        root: str | None = None,
        teacher_cache: str | None = None,
        teacher_topk: int = 64,
    ) -> None:
        super().__init__(batch_size, seed, num_workers, val_fraction, test_fraction)
        self.tokenizer_name, self.seq_len, self.root = str(tokenizer), int(seq_len), root
        self.sources = list(sources or SOURCES)
        self.max_docs = max_docs
        self.max_windows = {k: v for k, v in dict(max_windows or {}).items()}
        for key in self.max_windows:
            if key not in SPLITS:
                raise ValueError(f"data.max_windows.{key}: unknown split; allowed: {', '.join(SPLITS)}")
        self.teacher_cache, self.teacher_topk = teacher_cache, int(teacher_topk)
        self.tokenizer: Any = None
        self.vocab_size: int | None = None
        self.split_docs: dict[str, list[str]] = {}

    def setup(self, stage: str | None = None) -> None:
        """Read, split, tokenize and window the documents once; later calls are no-ops."""
        if self.splits is not None:
            return
        from qat.hf.models import causal_tokenizer

        self.tokenizer = tok = causal_tokenizer(self.tokenizer_name)
        self.vocab_size = len(tok)
        docs = documents(self.sources, self.root)
        if self.max_docs is not None:
            docs = sorted(random.Random(self.seed).sample(docs, min(self.max_docs, len(docs))))
        by_name = dict(docs)
        parts = split_files(list(by_name), self.val_fraction, self.test_fraction, self.seed)  # type: ignore[arg-type]
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        features = datasets.Features({"input_ids": datasets.List(datasets.Value("int64"))})
        splits = {}
        for split in SPLITS:
            names = sorted(parts[split])
            self.split_docs[split] = names
            raw = datasets.Dataset.from_dict({"text": [by_name[n] for n in names]})

            def encode(rows: dict[str, list[str]]) -> dict[str, list[list[int]]]:
                return {
                    "input_ids": [i + eos for i in tok(rows["text"], add_special_tokens=False)["input_ids"]]
                }

            enc = raw.map(encode, batched=True, remove_columns=["text"])
            ids = np.fromiter((t for row in enc["input_ids"] for t in row), dtype=np.int64)
            w = windows(ids, self.seq_len, self.max_windows.get(split))
            if len(w) == 0:
                raise ValueError(f"data.seq_len: {self.seq_len} is longer than split {split!r} ({len(ids)} "
                                 "tokens); allowed: a smaller seq_len, or more max_docs")  # fmt: skip
            splits[split] = datasets.Dataset.from_dict({"input_ids": w}, features=features).with_format(
                "torch"
            )
        self.splits = datasets.DatasetDict(splits)

    def collate_fn(self) -> Callable[[list[dict[str, Any]]], Any]:
        return lm_collate
