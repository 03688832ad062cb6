"""The GGUF target on tiny random Llama / Qwen2 / Mistral models with tokenizers trained on the spot:
the file holds the trained codes and scales in llama.cpp's block layouts (read back bit for bit, and
exactly what llama.cpp's reference quantizer makes of the trained weights), transformers loads it with
the fake-quant model's logits, and the metadata and tokenizer are what llama.cpp reads. llama.cpp itself
runs the files in test_gguf_llama_cpp.py (slow)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers.export_models import quant_cfg
from helpers.extras import require

require("transformers", extra="transformers")
gguf = require("gguf", extra="gguf")
require("accelerate", extra="gguf")

from gguf import GGUFReader  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402
from helpers.llm import byte_bpe, corpus, lm_batches, spm_bpe, tiny_lm  # noqa: E402
from tokenizers import pre_tokenizers  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

import qat  # noqa: E402
from qat.deploy import ExportError, schema  # noqa: E402
from qat.deploy.gguf import encode  # noqa: E402
from qat.hf.models import logits, tiny_model  # noqa: E402

PRESETS = {"gguf_q8_0": ("Q8_0", False), "gguf_q4_0": ("Q4_0", False), "gguf_tq2_0": ("TQ2_0", True)}
FILE = "model.gguf"


@pytest.fixture(scope="module")
def tok():
    return byte_bpe()


def _export(model, cfg, out, tokenizer, **kw):
    q = qat.prepare(model, cfg)
    report = qat.export(q, out, batches=lm_batches(tokenizer), task="lm", forward=logits, targets="gguf",
                        tokenizer=tokenizer, **kw)  # fmt: skip
    return q, report.targets["gguf"], GGUFReader(out / FILE)


def _unpermute(a: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order back to transformers': written row ``h*hd + 2i + j`` is row
    ``h*hd + j*hd/2 + i`` of the model (an index table, independent of the writer's reshapes)."""
    hd = a.shape[0] // heads
    order = [h * hd + j * hd // 2 + i for h in range(heads) for i in range(hd // 2) for j in range(2)]
    out = np.empty_like(a)
    out[order] = a
    return out


def _trained(q, name: str) -> np.ndarray:
    return q.get_submodule(name).quantized_weight().detach().numpy()


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_write_the_trained_codes_that_llama_cpp_would_write(preset, tok, tmp_path):
    qtype, wide = PRESETS[preset]
    q, fig, reader = _export(tiny_lm(vocab_size=len(tok), wide=wide), quant_cfg(preset), tmp_path / "e", tok)
    assert fig["weights_bit_exact"] and fig["requantize_changed"] == {qtype: 0}
    assert fig["tensor_types"] == {qtype: 16, "F32": 5} and fig["tokenizer"] == "gpt2"
    assert fig["transformers_passed"] and fig["transformers_max_abs_logit_diff"] == 0.0
    tensors = {t.name: t for t in reader.tensors}
    heads = {"attn_q": 4, "attn_k": 2}
    for gname, hf in [("token_embd", "model.embed_tokens"), ("output", "lm_head"),
                      ("blk.1.attn_q", "model.layers.1.self_attn.q_proj"),
                      ("blk.0.attn_k", "model.layers.0.self_attn.k_proj"),
                      ("blk.1.ffn_down", "model.layers.1.mlp.down_proj")]:  # fmt: skip
        t = tensors[f"{gname}.weight"]
        assert t.tensor_type.name == qtype
        back = dequantize(t.data, t.tensor_type)
        kind = gname.split(".")[-1]
        if kind in heads:
            back = _unpermute(back, heads[kind])
        np.testing.assert_array_equal(back, _trained(q, hf))
        # llama.cpp's own quantizer, run over the trained weights, writes these very bytes: codes and scales
        np.testing.assert_array_equal(quantize(dequantize(t.data, t.tensor_type), t.tensor_type), t.data)
    for norm in ("output_norm", "blk.0.attn_norm", "blk.1.ffn_norm"):
        assert tensors[f"{norm}.weight"].tensor_type.name == "F32"


def test_q4_0_nibbles_and_tq2_0_crumbs_are_in_llama_cpps_order():
    """Q4_0: byte j holds element j (low nibble) and j + 16 (high), codes + 8, fp16 scale first;
    TQ2_0: byte 32c + j holds elements 128c + 32k + j in bits 2k, codes + 1, fp16 scale last."""
    q4 = (np.arange(64) // 2 % 16 - 8).reshape(2, 32)  # element j + 16 is not element j
    entry = {"format": "int4", "kind": "int", "shape": [2, 32], "granularity": "per_channel", "axis": 0,
             "group_size": None, "symmetric": True, "qmin": -8, "qmax": 7, "zero_point": None,
             "scale_neg": None, "scale": {"tensor": "s"},
             "codes": {"tensor": "c", "count": 64, "packed": False, "container_bits": 8}}  # fmt: skip
    tensors = {"c": torch.tensor(q4, dtype=torch.int8), "s": torch.tensor([0.5, -0.25])}
    t = encode("layer", entry, tensors)
    assert t.data.shape == (2, 18) and t.data[0, :2].view(np.float16)[0] == 0.5
    stored = q4[0] + 8
    assert list(t.data[0, 2:]) == [stored[j] | (stored[j + 16] << 4) for j in range(16)]
    np.testing.assert_array_equal(dequantize(t.data, gguf.GGMLQuantizationType.Q4_0), t.values)
    t3 = (np.arange(512) % 3 - 1).reshape(2, 256)
    entry3 = {**entry, "format": "ternary", "kind": "ternary", "shape": [2, 256], "qmin": -1, "qmax": 1,
              "codes": {**entry["codes"], "count": 512}}  # fmt: skip
    t = encode("layer", entry3, {"c": torch.tensor(t3, dtype=torch.int8), "s": torch.tensor([0.5, 2.0])})
    assert t.data.shape == (2, 66) and t.data[1, 64:].view(np.float16)[0] == 2.0
    s = t3[0] + 1
    assert [int(t.data[0, 32 * c + j]) for c, j in ((0, 0), (1, 5))] == [
        sum(int(s[128 * c + 32 * k + j]) << 2 * k for k in range(4)) for c, j in ((0, 0), (1, 5))
    ]
    np.testing.assert_array_equal(dequantize(t.data, gguf.GGMLQuantizationType.TQ2_0), t.values)


def _row_scales_fp16(model: torch.nn.Module) -> None:
    """Give every row of every weight matrix the abs max ``127 * 2**-k`` (k from 6 to 9): per-channel
    int8 min/max scales become ``2**-k``, exactly representable in fp16."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                top = 127.0 * 2.0 ** -torch.randint(6, 10, (p.shape[0], 1), generator=g).float()
                p.copy_(p / p.abs().amax(1, keepdim=True) * top * 0.99)
                p.scatter_(1, p.abs().argmax(1, keepdim=True), top)


def test_per_channel_int8_is_q8_0_with_the_row_scale_in_every_block(tok, tmp_path):
    model = tiny_lm(vocab_size=len(tok))
    _row_scales_fp16(model)
    cfg = {"weight": {"format": "int8", "granularity": "per_channel", "scale": "minmax"}}
    q, fig, reader = _export(model, cfg, tmp_path / "e", tok)
    assert fig["weights_bit_exact"] and fig["transformers_max_abs_logit_diff"] == 0.0
    # not the format's own rule (one scale per row, not per block): llama.cpp's quantizer would change
    # the weights of blocks whose max is below their row's; the file holds the trained ones
    assert fig["requantize_changed"]["Q8_0"] > 0
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
    np.testing.assert_array_equal(
        dequantize(t.data, t.tensor_type), _trained(q, "model.layers.0.mlp.up_proj")
    )
    scales = t.data.reshape(t.data.shape[0], -1, 34)[..., :2].copy().view(np.float16)[..., 0]
    assert (scales == scales[:, :1]).all()


def test_tied_embeddings_write_no_output_tensor(tok, tmp_path):
    model = tiny_lm(vocab_size=len(tok), tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    _, fig, reader = _export(model, quant_cfg("gguf_q8_0"), tmp_path / "e", tok)
    names = {t.name for t in reader.tensors}
    assert "token_embd.weight" in names and "output.weight" not in names
    assert fig["transformers_passed"] and fig["transformers_max_abs_logit_diff"] == 0.0


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_qwen2_and_mistral(family, tok, tmp_path):
    _, fig, reader = _export(
        tiny_lm(family, vocab_size=len(tok)), quant_cfg("gguf_q4_0"), tmp_path / "e", tok
    )
    arch = "qwen2" if family == "qwen2" else "llama"
    assert fig["architecture"] == arch and reader.fields["general.architecture"].contents() == arch
    assert fig["transformers_passed"] and fig["transformers_max_abs_logit_diff"] == 0.0
    assert ("blk.0.attn_q.bias" in {t.name for t in reader.tensors}) is (family == "qwen2")


def test_hyper_parameters_and_tokenizer_are_what_llama_cpp_reads(tok, tmp_path):
    model = tiny_lm(vocab_size=len(tok) + 8)  # an embedding larger than the vocabulary: padded ids
    _, fig, reader = _export(model, quant_cfg("gguf_q4_0"), tmp_path / "e", tok)
    f = {k: v.contents() for k, v in reader.fields.items()}
    c = model.config
    assert f["general.architecture"] == "llama" and f["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_0
    assert {k.removeprefix("llama."): f[k] for k in f if k.startswith("llama.")} == pytest.approx({
        "context_length": 128, "embedding_length": 64, "block_count": 2, "feed_forward_length": 128,
        "attention.head_count": 4, "attention.head_count_kv": 2, "attention.key_length": 16,
        "attention.value_length": 16, "rope.dimension_count": 16, "rope.freq_base": 10000.0,
        "attention.layer_norm_rms_epsilon": c.rms_norm_eps, "vocab_size": len(tok) + 8,
    })  # fmt: skip
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == len(tok) + 8 and tokens[-1] == f"[PAD{len(tok) + 7}]"
    assert tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] and types[:4] == [3, 3, 3, 1]
    assert types[-1] == gguf.TokenType.UNUSED and len(f["tokenizer.ggml.merges"]) == len(tok) - 256 - 3
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"]) == (0, 2)
    assert f["tokenizer.chat_template"] == tok.chat_template and not f["tokenizer.ggml.add_bos_token"]
    # transformers rebuilds the tokenizer from the file alone, and it tokenizes like the original
    back = AutoTokenizer.from_pretrained(tmp_path / "e", gguf_file=FILE)
    for text in (corpus()[:800], "x = {'ünï': 1_000}  # 😀\n\t<|im_start|>user"):
        assert back(text)["input_ids"] == tok(text)["input_ids"]


def test_sentencepiece_style_tokenizer_is_llama_with_scores(tmp_path):
    sp = spm_bpe()
    _, fig, reader = _export(tiny_lm(vocab_size=len(sp)), quant_cfg("gguf_q8_0"), tmp_path / "e", sp)
    f = {k: v.contents() for k, v in reader.fields.items()}
    assert fig["tokenizer"] == f["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.merges" not in f
    types, scores = f["tokenizer.ggml.token_type"], f["tokenizer.ggml.scores"]
    assert types[:5] == [3, 3, 3, gguf.TokenType.BYTE, gguf.TokenType.BYTE] and types[300] == 1
    assert f["tokenizer.ggml.add_bos_token"] and f["tokenizer.ggml.add_space_prefix"]
    merges = json.loads(sp.backend_tokenizer.to_str())["model"]["merges"]
    made = [sp.convert_tokens_to_ids("".join(m)) for m in merges]  # the token each merge makes, in order
    assert [scores[i] for i in made] == [-float(r) for r in range(len(merges))]  # earlier merges first
    assert scores[sp.convert_tokens_to_ids("e")] == -len(merges)  # not made by a merge: last


def _no_export(out) -> None:
    assert not out.exists(), "a refused GGUF export must write nothing"


@pytest.mark.parametrize("cfg,match", [
    (quant_cfg("w4g32"), r": weight scale .* is not exactly representable in fp16, so the grid is not Q4_0"),
    ({"weight": {"format": "int8", "granularity": "per_group", "group_size": 16, "scale": "minmax"}},
     r"scale changes inside Q8_0's blocks of 32"),
    ({"weight": {"format": "int8", "granularity": "per_channel", "symmetric": False}},
     r"weight format int8 per_channel asymmetric has no GGUF block type; allowed: int8 \(Q8_0\)"),
    ({"weight": {"format": "fp8_e4m3", "granularity": "per_channel"}}, r"fp8_e4m3 .* no GGUF block type"),
])  # fmt: skip
def test_grids_that_are_not_a_block_format_are_refused(cfg, match, tok, tmp_path):
    with pytest.raises(ExportError, match=match):
        _export(tiny_lm(vocab_size=len(tok)), cfg, tmp_path / "e", tok)
    _no_export(tmp_path / "e")


def test_unsupported_models_and_tokenizers_are_refused(tok, tmp_path):
    def export(model, out, tokenizer=tok):
        qat.export(qat.prepare(model, quant_cfg("gguf_q8_0")), tmp_path / out, targets="gguf",
                   tokenizer=tokenizer)  # fmt: skip

    with pytest.raises(ExportError, match=r"architecture 'GPT2LMHeadModel' is not supported; allowed: Llama"):
        export(tiny_model("gpt2"), "a")
    rope = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(ExportError, match=r"rope_parameters.rope_type='linear' .*allowed: 'default'"):
        export(tiny_lm(vocab_size=len(tok), rope_parameters=rope), "b")
    with pytest.raises(ExportError, match=r"tokenizer has token id 319, the model's vocab_size is 128"):
        export(tiny_lm(vocab_size=128), "c")
    odd = byte_bpe()  # a pre-tokenizer llama.cpp has no name for
    odd.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Punctuation(), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    with pytest.raises(
        ExportError, match=r"pre-tokenizer .*Punctuation.* has no llama.cpp name here; allowed: gpt-2"
    ):
        export(tiny_lm(vocab_size=len(tok)), "d", odd)
    for out in ("a", "b", "c", "d"):
        _no_export(tmp_path / out)


def test_without_a_tokenizer_the_file_runs_on_token_ids(tok, tmp_path):
    q = qat.prepare(tiny_lm(vocab_size=len(tok)), quant_cfg("gguf_q8_0"))
    report = qat.export(q, tmp_path / "e", targets=["gguf"], verify=False)
    assert report.targets["gguf"]["tokenizer"] == "no_vocab" and "transformers_passed" not in report.gguf
    assert GGUFReader(tmp_path / "e" / FILE).fields["tokenizer.ggml.model"].contents() == "no_vocab"
    assert (tmp_path / "e" / schema.CONFIG_FILE).is_file()
