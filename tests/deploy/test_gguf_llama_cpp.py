"""llama.cpp itself (llama-cpp-python, the ``llama`` extra) runs the GGUF exports: logits as the fake-quant
model computes them with the presets' activation rule (llama.cpp's run-time Q8_0 / Q8_K quantization),
its tokenizer as the Hugging Face one, greedy generation from a chat prompt, and the ``qat-eval`` engine.
Slow: the extra builds from source.

Measured here (tiny random models, 12 prompts of 23 tokens, llama.cpp with :mod:`qat.deploy.llamacpp`'s
settings), per position, max |logit difference| / logit range against the fake-quant model:

* with the presets' activation rule: 1e-7 to 2.6e-7 at every position up to the first activation that
  lies within float32 noise of a rounding boundary and gets the neighbouring code (llama.cpp sums in
  another order); from there on, up to 6e-3. Such a flip happened in 1 of 12 prompts for Q8_0 and Q4_0,
  5 of 12 for TQ2_0 (wider model, more activations); 97% of all positions agree within :data:`TOL`.
* with float activations: 2e-3 to 1e-2 at every position (no position within :data:`TOL`).

llama.cpp's x86 Q8_0 kernel multiplies by ``127 / amax`` and rounds half to even where the reference rule
multiplies by ``1 / d`` and rounds half away from zero: the same codes except on exact ties, which a random
model with unit norm weights and Q4_0 embeddings produces in numbers (``tiny_lm`` draws its norm weights).
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from helpers.export_models import quant_cfg
from helpers.extras import require

pytestmark = pytest.mark.slow

require("transformers", extra="transformers")
require("gguf", extra="gguf")
require("llama_cpp", extra="llama")

from helpers.llm import byte_bpe, corpus, lm_batches, spm_bpe, tiny_lm  # noqa: E402
from torch import nn  # noqa: E402

import qat  # noqa: E402
from qat.deploy.gguf import float_activations  # noqa: E402
from qat.deploy.llamacpp import LlamaCpp, run  # noqa: E402
from qat.hf.models import logits  # noqa: E402

TOL = 1e-5  # max |logit difference| / logit range at one position
AGREE = 0.75  # the share of positions that must agree within TOL (measured 0.97; float activations: 0)
PRESETS = {"gguf_q8_0": False, "gguf_q4_0": False, "gguf_tq2_0": True}  # -> wide (TQ2_0: blocks of 256)


def _reference(q: nn.Module, ids: list[int], float_acts: bool = False) -> np.ndarray:
    """The fake-quant model's logits ``[T, vocab]`` (``float_acts``: activation quantizers off)."""
    with torch.no_grad(), float_activations(q) if float_acts else contextlib.nullcontext():
        return q(torch.tensor([ids])).logits[0].numpy()


def _agreeing(got: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per position: whether max |logit difference| is within TOL of the logit range."""
    return np.abs(got - ref).max(-1) <= TOL * (ref.max() - ref.min())


@pytest.fixture(scope="module")
def tok():
    return byte_bpe()


@pytest.mark.parametrize("preset", PRESETS)
def test_llama_cpp_logits_are_the_fake_quant_models(preset, tok, tmp_path):
    q = qat.prepare(tiny_lm(vocab_size=len(tok), wide=PRESETS[preset]), quant_cfg(preset))
    qat.export(q, tmp_path, batches=lm_batches(tok), task="lm", forward=logits, targets="gguf", tokenizer=tok)
    engine = LlamaCpp(tmp_path / "model.gguf")
    text = corpus()
    prompts = [tok(text[k * 700 : k * 700 + 400])["input_ids"][:23] for k in range(6)]
    emulated, floats = [], []
    for ids in prompts:
        got = engine.logits(ids)
        emulated.append(_agreeing(got, _reference(q, ids)))
        floats.append(_agreeing(got, _reference(q, ids, float_acts=True)))
    share, share_float = float(np.mean(emulated)), float(np.mean(floats))
    print(f"{preset}: {share:.0%} of positions within {TOL:g} ({share_float:.0%} with float activations)")
    assert share >= AGREE and share_float == 0.0
    assert all(e[0] for e in emulated)  # the first position of every prompt: nothing to flip before it


@pytest.mark.parametrize("make", [byte_bpe, spm_bpe])
def test_llama_cpp_tokenizes_and_chats_with_the_written_tokenizer(make, tmp_path):
    t = make()
    q = qat.prepare(tiny_lm(vocab_size=len(t)), quant_cfg("gguf_q8_0"))
    qat.export(q, tmp_path, targets="gguf", tokenizer=t, verify=False)
    engine = LlamaCpp(tmp_path / "model.gguf")
    for text in (corpus()[:1500], "x = {'ünï': 1_000}  # 😀\n\tdef f():\n        return  None"):
        assert engine.tokenize(text) == t(text)["input_ids"]
        assert engine.detokenize(engine.tokenize(text)) == text
    prompt = "def main():\n    "
    if t.chat_template:
        prompt = t.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                       tokenize=False)  # fmt: skip
    ids = engine.generate(prompt, 6)
    want = t(prompt)["input_ids"]
    assert ids[: len(want)] == want and len(ids) == len(want) + 6
    for n in range(len(want), len(ids)):  # greedy: each new token is the fake-quant model's arg max
        ref = _reference(q, ids[:n])[-1]
        assert ids[n] == int(ref.argmax()) or ref.max() - ref[ids[n]] < 1e-4


def test_qat_eval_engine_runs_batches_of_token_ids(tok, tmp_path):
    q = qat.prepare(tiny_lm(vocab_size=len(tok)), quant_cfg("gguf_q8_0"))
    qat.export(q, tmp_path, targets="gguf", verify=False)  # no tokenizer: token ids only (no_vocab)
    predict = run(tmp_path / "model.gguf", tiny_lm(vocab_size=len(tok)), threads=1)
    x = lm_batches(tok, n=3)[0][0]
    out = predict(x).numpy()
    assert out.shape == (3, x.shape[1], len(tok))
    agree = [_agreeing(row, _reference(q, ids)) for row, ids in zip(out, x.tolist(), strict=True)]
    assert np.mean(agree) >= AGREE


@pytest.mark.parametrize("preset", ["gguf_q8_0", "gguf_q4_0"])
def test_extra_buffer_types_decode_one_token_like_the_plain_kernels(preset, tok, tmp_path):
    """``extra_bufts=True`` (repacked weights, AMX kernels): one token at a time, the logits of the plain
    kernels (multi-token batches crash on this build: docs/deploy.md)."""
    q = qat.prepare(tiny_lm(vocab_size=len(tok)), quant_cfg(preset))
    qat.export(q, tmp_path, batches=lm_batches(tok), task="lm", forward=logits, targets="gguf", tokenizer=tok)
    plain, extra = LlamaCpp(tmp_path / "model.gguf"), LlamaCpp(tmp_path / "model.gguf", extra_bufts=True)
    for ids in ([tok.bos_token_id or 0], tok(corpus()[:200])["input_ids"][:1]):
        ref = plain.logits(ids)
        assert _agreeing(extra.logits(ids), ref).all()
