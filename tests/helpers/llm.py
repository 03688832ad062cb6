"""Tiny causal language models and their tokenizers, built offline for the GGUF tests.

Tokenizers are trained in a few milliseconds on a few KB of the running Python's standard library:
:func:`byte_bpe` is GPT-2-style byte-level BPE with ChatML special tokens and a chat template,
:func:`spm_bpe` is Llama-2-style (SentencePiece BPE: ``▁`` for spaces, byte fallback, ``<s>`` added in
front). :func:`tiny_lm` builds a random Llama, Qwen2 or Mistral causal LM whose vocabulary matches.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from qat.data.pytext import concat_files, stdlib_py_files

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
            "mistral": (MistralConfig, MistralForCausalLM)}  # fmt: skip


@functools.cache
def corpus(n_bytes: int = 40_000) -> str:
    text, _ = concat_files(stdlib_py_files()[:20], n_bytes)
    return text.decode("utf-8")


def byte_bpe(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """GPT-2-style byte-level BPE; ``<|endoftext|>`` (BOS, pad), ``<|im_start|>``, ``<|im_end|>`` (EOS)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator([corpus()], trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[0], eos_token=specials[2],
                                 pad_token=specials[0])  # fmt: skip
    hf.chat_template = CHATML
    return hf


def spm_bpe(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """Llama-2-style BPE: ``<unk>``, ``<s>``, ``</s>``, the 256 byte tokens ``<0x00>``..``<0xFF>``, then the
    trained pieces (``▁`` for spaces, one prepended); ``<s>`` is added in front of every text."""
    norm = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.normalizer = norm
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 259, show_progress=False)
    trainer_tok.train_from_iterator(corpus().splitlines(), trainer)
    trained = trainer_tok.get_vocab()
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))])}
    for t, _ in sorted(trained.items(), key=lambda kv: kv[1]):
        vocab.setdefault(t, len(vocab))
    tok = Tokenizer(
        models.BPE(
            vocab=vocab, merges=_merges(trainer_tok), unk_token="<unk>", byte_fallback=True, fuse_unk=True
        )
    )
    tok.normalizer = norm
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])  # fmt: skip
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _merges(tok: Tokenizer) -> list[tuple[str, str]]:
    merges = json.loads(tok.to_str())["model"]["merges"]
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]


def tiny_lm(family: str = "llama", vocab_size: int = 320, wide: bool = False, seed: int = 0,
            **overrides: Any) -> Any:  # fmt: skip
    """A random toy causal LM: hidden 64, 2 layers, intermediate 128, 4 heads (2 KV heads), norm weights
    around 1; ``wide``: hidden 256, intermediate 512, head_dim 64, for TQ2_0's blocks of 256 inputs."""
    sizes = dict(hidden_size=64, intermediate_size=128, head_dim=16)
    if wide:
        sizes = dict(hidden_size=256, intermediate_size=512, head_dim=64)
    config_cls, model_cls = FAMILIES[family]
    fixed = dict(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128
    )
    cfg = config_cls(vocab_size=vocab_size, bos_token_id=0, eos_token_id=2, **fixed, **{**sizes, **overrides})
    torch.manual_seed(seed)
    model = model_cls._from_config(cfg, attn_implementation="sdpa").eval()
    with torch.no_grad():  # norm weights as a trained model's: unit norms of grid-aligned embeddings
        for name, p in model.named_parameters():  # put activations exactly on rounding ties
            if "norm" in name:
                p.normal_(1.0, 0.2)
    return model


def lm_batches(tokenizer: Any, n: int = 4, length: int = 24) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One ``(inputs, targets)`` batch of ``n`` stdlib snippets, ``length`` tokens each."""
    text = corpus()
    ids = torch.tensor([tokenizer(text[i * 500 : i * 500 + 600])["input_ids"][:length] for i in range(n)])
    return [(ids[:, :-1], ids[:, 1:])]
