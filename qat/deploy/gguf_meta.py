"""The GGUF target's metadata: a Hugging Face causal LM's config as llama.cpp's hyper-parameter keys, and
its tokenizer as ``tokenizer.ggml.*`` (what :mod:`qat.deploy.gguf` writes beside the weights).

Architectures (:data:`ARCHS`): ``LlamaForCausalLM`` (Llama, SmolLM, TinyLlama) and ``MistralForCausalLM``
as llama.cpp's ``llama`` (whose rotary embedding pairs neighbouring features, so q/k rows are permuted),
``Qwen2ForCausalLM`` as ``qwen2`` (q/k/v biases, rotary embedding on split halves: no permutation). Configs
must be plain: the default rotary embedding, SiLU, no sliding window shorter than the context, no MLP bias
(and for ``llama`` no attention bias, which transformers' GGUF loader would drop).

Tokenizers (fast tokenizers: their ``tokenizer.json``), :data:`TOKENIZER_MODELS`:

* byte-level BPE -> ``gpt2``: tokens, token types, merges; the pre-tokenizer is recognised from its
  ``tokenizer.json`` description (:data:`PRE_TOKENIZERS`: GPT-2's, SmolLM's, Llama 3's, Qwen2's);
* SentencePiece-style BPE (byte fallback, ``▁`` for spaces: Llama 2, Mistral v0.1, TinyLlama) -> ``llama``:
  tokens, token types and scores that order the merges as the BPE ranks do (llama.cpp merges the pair of
  highest score first).

Token types follow ``convert_hf_to_gguf.py``: special added tokens CONTROL, other added tokens
USER_DEFINED, ids the tokenizer lacks (an embedding larger than the vocabulary) ``[PAD<i>]`` UNUSED. Special
token ids and the chat template come from ``gguf.SpecialVocab`` over the saved tokenizer; whether BOS / EOS
are added is asked of the tokenizer itself. Without a tokenizer the file says ``no_vocab`` (token ids only).
"""

from __future__ import annotations

import dataclasses
import json
import re
import tempfile
from pathlib import Path
from typing import Any

from qat.deploy.exporter import ExportError


@dataclasses.dataclass(frozen=True)
class Arch:
    """A Hugging Face architecture as llama.cpp runs it: ``name`` (``general.architecture``) and whether
    the q/k projection rows are permuted (llama.cpp's ``llama`` rotates neighbouring feature pairs where
    transformers rotates the two halves of each head)."""

    name: str
    permute_qk: bool
    attention_bias: bool = False


ARCHS = {
    "LlamaForCausalLM": Arch("llama", permute_qk=True),
    "MistralForCausalLM": Arch("llama", permute_qk=True),
    "Qwen2ForCausalLM": Arch("qwen2", permute_qk=False, attention_bias=True),
}


def arch_of(model: Any) -> Arch:
    """The :class:`Arch` of a Hugging Face model (its class name; a prepared model keeps it), config
    checked; a one-line :class:`ExportError` for anything else."""
    name = type(model).__name__
    if name not in ARCHS:
        raise ExportError(f"target gguf: architecture {name!r} is not supported; allowed: {', '.join(ARCHS)}")
    arch, c = ARCHS[name], model.config
    rope = rope_parameters(c)
    checks = {
        "rope_parameters.rope_type": (rope.get("rope_type", "default"), ("default",)),
        "hidden_act": (c.hidden_act, ("silu",)),
        "mlp_bias": (bool(getattr(c, "mlp_bias", False)), (False,)),
        "attention_bias": (bool(getattr(c, "attention_bias", arch.attention_bias)), (arch.attention_bias,)),
    }
    window = getattr(c, "sliding_window", None) if getattr(c, "use_sliding_window", True) else None
    if window is not None and window < c.max_position_embeddings:
        checks["sliding_window"] = (window, (None,))
    for key, (value, allowed) in checks.items():
        if value not in allowed:
            raise ExportError(f"target gguf: {name} config {key}={value!r} has no {arch.name} form in "
                              f"llama.cpp; allowed: {', '.join(map(repr, allowed))}")  # fmt: skip
    return arch


def rope_parameters(config: Any) -> dict[str, Any]:
    """The rotary embedding parameters (transformers 5's ``rope_parameters``, or the older flat fields)."""
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope.setdefault("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    return rope


def head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def add_hparams(writer: Any, config: Any, name: str) -> None:
    """The hyper-parameter keys llama.cpp reads for a llama-like model (``general.name`` = ``name``)."""
    heads = int(config.num_attention_heads)
    writer.add_name(name)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or heads))
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    writer.add_rope_dimension_count(head_dim(config))
    writer.add_rope_freq_base(float(rope_parameters(config)["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))


# ------------------------------------------------------------------------------------------------ tokenizer
def _steps(pre: dict[str, Any] | None) -> tuple[tuple[Any, ...], ...]:
    """A ``tokenizer.json`` pre-tokenizer as comparable steps (a Sequence flattened)."""
    if pre is None:
        return ()
    if pre["type"] == "Sequence":
        return tuple(s for p in pre["pretokenizers"] for s in _steps(p))
    if pre["type"] == "ByteLevel":
        return (("ByteLevel", bool(pre.get("add_prefix_space")), bool(pre.get("use_regex", True))),)
    if pre["type"] == "Split":
        return (("Split", pre["pattern"].get("Regex", pre["pattern"].get("String")), pre.get("behavior")),)
    if pre["type"] == "Digits":
        return (("Digits", bool(pre.get("individual_digits"))),)
    return ((pre["type"],),)


_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
           r"\s*[\r\n]+|\s+(?!\S)|\s+")  # fmt: skip
# tokenizer.ggml.pre (llama.cpp's name of a pre-tokenizer) -> the pre-tokenizer steps it implements.
PRE_TOKENIZERS = {
    "gpt-2": (("ByteLevel", False, True),),
    "smollm": (("Digits", True), ("ByteLevel", False, True)),
    "llama-bpe": (("Split", _LLAMA3, "Isolated"), ("ByteLevel", False, False)),
    "qwen2": (("Split", _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}"), "Isolated"), ("ByteLevel", False, False)),
}
# tokenizer.ggml.model -> what its tokenizer.json looks like (BPE, byte-level decoder or byte fallback).
TOKENIZER_MODELS = {"gpt2": "byte-level BPE", "llama": "SentencePiece-style BPE with byte fallback"}
_BYTE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _kind(tj: dict[str, Any]) -> str:
    model, decoder = tj["model"], tj.get("decoder") or {}
    if model["type"] == "BPE" and not model.get("byte_fallback") and decoder.get("type") == "ByteLevel":
        return "gpt2"
    if model["type"] == "BPE" and model.get("byte_fallback"):
        return "llama"
    allowed = ", ".join(f"{v} ({k})" for k, v in TOKENIZER_MODELS.items())
    raise ExportError(f"target gguf: a {model['type']} tokenizer has no GGUF form here; allowed: {allowed}")


def _merge_ranks(tj: dict[str, Any]) -> dict[str, int]:
    """Each token made by a merge -> the rank of its first merge (``tokenizer.json`` merges are "a b"
    strings or [a, b] pairs)."""
    ranks: dict[str, int] = {}
    for i, m in enumerate(tj["model"].get("merges") or []):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        ranks.setdefault(a + b, i)
    return ranks


def _adds(tokenizer: Any, token_id: int | None) -> tuple[bool, bool]:
    """Whether encoding text adds ``token_id`` at the start and at the end (asked of the tokenizer)."""
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == token_id, bool(ids) and ids[-1] == token_id


def add_tokenizer(writer: Any, tokenizer: Any, config: Any) -> str:
    """Write ``tokenizer`` (a fast Hugging Face tokenizer) as ``tokenizer.ggml.*`` for a model of
    ``config`` (its vocabulary size: the embedding's rows); returns the tokenizer model written."""
    import gguf

    if tokenizer is None:
        writer.add_tokenizer_model("no_vocab")
        return "no_vocab"
    if not getattr(tokenizer, "is_fast", False):
        raise ExportError(f"target gguf: tokenizer {type(tokenizer).__name__} is not a fast tokenizer; "
                          "allowed: a fast tokenizer (with tokenizer.json)")  # fmt: skip
    n_vocab = int(config.vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        config.to_json_file(Path(tmp) / "config.json")  # bos/eos ids of the model config, as the converter
        tj = json.loads((Path(tmp) / "tokenizer.json").read_text(encoding="utf-8"))
        kind = _kind(tj)
        special = gguf.SpecialVocab(tmp, load_merges=kind == "gpt2", n_vocab=n_vocab)
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise ExportError(f"target gguf: the tokenizer has token id {max(vocab.values())}, the model's "
                          f"vocab_size is {n_vocab}; allowed: at most {n_vocab} tokens")  # fmt: skip
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    ranks = _merge_ranks(tj) if kind == "llama" else {}
    T = gguf.TokenType
    tokens, types, scores = [], [], []
    for i in range(n_vocab):
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
        elif i in added:
            tokens.append(tok)
            types.append(T.CONTROL if added[i].special else T.USER_DEFINED)
        else:
            tokens.append(tok)
            byte = kind == "llama" and _BYTE.fullmatch(tok)
            types.append(T.BYTE if byte else T.UNKNOWN if tok == tokenizer.unk_token else T.NORMAL)
        scores.append(-float(ranks.get(tokens[-1], len(ranks))) if kind == "llama" else 0.0)
    writer.add_tokenizer_model(kind)
    if kind == "gpt2":
        steps = _steps(tj.get("pre_tokenizer"))
        pre = next((name for name, want in PRE_TOKENIZERS.items() if steps == want), None)
        if pre is None:
            raise ExportError(f"target gguf: pre-tokenizer {steps} has no llama.cpp name here; allowed: "
                              f"{', '.join(PRE_TOKENIZERS)} (GPT-2, SmolLM, Llama 3, Qwen2)")  # fmt: skip
        writer.add_tokenizer_pre(pre)
    else:
        writer.add_token_scores(scores)
        first = tokenizer.convert_ids_to_tokens(tokenizer("a", add_special_tokens=False)["input_ids"])
        writer.add_add_space_prefix(bool(first) and first[0].startswith("\u2581"))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special.add_special_token.clear()  # asked of the tokenizer below instead of parsed from its files
    special.add_to_gguf(writer, quiet=True)
    writer.add_add_bos_token(_adds(tokenizer, tokenizer.bos_token_id)[0])
    writer.add_add_eos_token(_adds(tokenizer, tokenizer.eos_token_id)[1])
    return kind
