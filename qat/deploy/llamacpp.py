"""The llama.cpp engine: a ``model.gguf`` run by ``llama-cpp-python`` (the optional ``llama`` extra, built
from source), for ``qat-eval``'s before/after table and the GGUF tests.

Settings chosen so that llama.cpp's numbers can be compared with the fake-quant model's:

* ``use_extra_bufts = False`` (model parameters): no extra CPU buffer types, i.e. no weight repacking and
  no AMX kernels; Q4_0 with multi-token batches crashes in ``ggml_backend_amx_mul_mat`` on some builds
  (ggml-org/llama.cpp#20824). The plain CPU kernels quantize activations to Q8_0 blocks of 32 (Q8_K blocks
  of 256 for TQ2_0), what the ``gguf_*`` presets' activation rule trains with.
* the KV cache in f32 (``type_k = type_v = GGML_TYPE_F32``) and flash attention off
  (``flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED``; its default, auto, turns it on on CPU, and its
  kernel adds about 2e-4 of the logit range where the plain path stays within float32 rounding);
* logits at every position of the batch, one sequence at a time, the cache cleared before each.

``Llama``, llama-cpp-python's high-level class, does not take model parameters, so this is built on the
classes it is made of (``llama_cpp._internals``: ``LlamaModel``, ``LlamaContext``, ``LlamaBatch``).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

MAX_CTX = 2048  # the default context: the f32 KV cache is allocated for all of it


@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
def _quiet(level: int, text: bytes, user_data: Any) -> None:
    """llama.cpp's log callback: its load and timing messages are dropped."""


class LlamaCpp:
    """A GGUF model in llama.cpp: ``logits(ids)`` ``[T, vocab]`` for one sequence of token ids,
    ``tokenize`` / ``detokenize`` with the file's own tokenizer, greedy ``generate``. ``n_ctx``: the longest
    sequence (None: the model's context, at most :data:`MAX_CTX`); ``threads``: llama.cpp's threads (None:
    its default)."""

    def __init__(
        self,
        path: str | Path,
        n_ctx: int | None = None,
        threads: int | None = None,
        extra_bufts: bool = False,
    ) -> None:
        import llama_cpp
        from llama_cpp import _internals

        llama_cpp.llama_log_set(_quiet, None)
        mp = llama_cpp.llama_model_default_params()
        mp.use_extra_bufts = extra_bufts
        self.model = _internals.LlamaModel(path_model=str(path), params=mp, verbose=False)
        n_ctx = n_ctx or min(self.model.n_ctx_train(), MAX_CTX)
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = n_ctx
        cp.type_k = cp.type_v = llama_cpp.GGML_TYPE_F32
        cp.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        if threads:
            cp.n_threads = cp.n_threads_batch = threads
        self.ctx = _internals.LlamaContext(model=self.model, params=cp, verbose=False)
        self.batch = _internals.LlamaBatch(n_tokens=n_ctx, embd=0, n_seq_max=1, verbose=False)
        self.n_ctx, self.n_vocab = n_ctx, self.model.n_vocab()

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """The logits ``[len(ids), vocab]`` (float32) of one sequence, from an empty cache."""
        if not 0 < len(ids) <= self.n_ctx:
            raise ValueError(f"ids: {len(ids)} tokens; allowed: 1 to n_ctx={self.n_ctx}")
        self.ctx.kv_cache_clear()
        self.batch.set_batch(list(ids), n_past=0, logits_all=True)
        self.ctx.decode(self.batch)
        return np.ctypeslib.as_array(self.ctx.get_logits(), shape=(len(ids), self.n_vocab)).copy()

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return self.model.tokenize(text.encode("utf-8"), add_bos=add_special, special=True)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.model.detokenize(list(ids)).decode("utf-8", errors="replace")

    def generate(self, prompt: str, n: int) -> list[int]:
        """``n`` more tokens after ``prompt``, greedily (the prompt's ids first)."""
        ids = self.tokenize(prompt)
        for _ in range(n):
            ids.append(int(self.logits(ids)[-1].argmax()))
        return ids


def run(path: Path, skeleton: nn.Module, threads: int | None) -> Callable[[Any], Any] | None:
    """The GGUF target's engine for ``qat-eval``: token ids ``[B, T]`` -> logits ``[B, T, vocab]``, one
    sequence at a time; None when ``llama_cpp`` is not installed."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return None
    engine = LlamaCpp(path, threads=threads)

    def predict(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.stack([engine.logits(row.tolist()) for row in x]))

    return predict
