"""Part 2 of ``scripts/bench_deploy.py``: a Llama with SmolLM2-135M's layer shapes through llama.cpp.

A ``LlamaForCausalLM`` (d=576, MLP 1536, 9 query / 3 key-value heads, vocabulary 49152, tied embeddings:
SmolLM2-135M's shapes; ``--layers`` layers, random weights), prepared with the ``gguf_q8_0`` and
``gguf_q4_0`` presets, exported to GGUF (verified) and run by llama.cpp, against float PyTorch and the
fake-quant model, on prompts of 1 and 64 tokens ("batch" in the table: tokens of one sequence).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import qat


def smollm2_shaped(layers: int, vocab: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=vocab, max_position_embeddings=2048, tie_word_embeddings=True,
        rms_norm_eps=1e-5, rope_theta=100000.0,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def logits_of(model: torch.nn.Module) -> Any:
    return lambda ids: model(ids).logits


def engine_logits(engine: Any) -> Any:
    return lambda ids: engine.logits(ids[0].tolist())


def llm_part(args: argparse.Namespace, tmp: Path, interleaved: Callable[..., dict[str, dict]]) -> list[dict]:
    """The rows of part 2; ``interleaved`` is bench_deploy's timing loop."""
    from qat.deploy.llamacpp import LlamaCpp

    layers, vocab = (1, 4096) if args.quick else (args.layers, 49152)
    float_model = smollm2_shaped(layers, vocab)
    g = torch.Generator().manual_seed(1)
    val = [
        (ids[:, :-1], ids[:, 1:]) for ids in (torch.randint(0, vocab, (2, 33), generator=g) for _ in range(2))
    ]
    prepared, files = {}, {}
    for preset in ("gguf_q8_0", "gguf_q4_0"):
        model = qat.prepare(smollm2_shaped(layers, vocab), preset)  # the float model's weights
        report = qat.export(model.eval(), tmp / preset, batches=val, task="lm", targets=["gguf"],
                            forward=lambda m, b: m(b[0]).logits)  # fmt: skip
        print(f"{preset}: {report.summary()}")
        prepared[preset], files[preset] = model, tmp / preset / "model.gguf"
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        engines = {p: LlamaCpp(f, n_ctx=128, threads=threads) for p, f in files.items()}
        for tokens in (1, 64):
            ids = torch.randint(0, vocab, (1, tokens), generator=g)
            models = {
                "float (PyTorch)": logits_of(float_model),
                **{f"fake-quant eval {p}": logits_of(m) for p, m in prepared.items()},
                **{f"llama.cpp {p}": engine_logits(e) for p, e in engines.items()},
            }
            with torch.inference_mode():
                res = interleaved(models, ids, "float (PyTorch)", args.rounds, args.repeats)
            for name, r in res.items():
                rows.append({"model": "llama", "threads": threads, "batch": tokens, "name": name, **r})
    return rows
