#!/usr/bin/env python
"""SmolLM2 (or any causal LM run) in its deploy engines: the table of docs/llm.md.

For the float model of the runs and for each ``qat-train`` run given (``recipe=smollm2_*``, QAT or PTQ,
full or LoRA): perplexity on the held-out test split of the runs' data (``data=lmtext``: documents no run
trained on) of each deploy file of its export: a GGUF file **in llama.cpp** (``llama-cpp-python``,
:class:`qat.deploy.llamacpp.LlamaCpp`) and in transformers loading the same file (float activations); a
compressed-tensors directory in transformers (which quantizes the inputs by its own rule). Then the file's
size, its increase over float in its engine and the recovery of each QAT row against its PTQ counterpart
(same format and file; for Q4_0 without one, naive Q4_0). Two rows need no run: ``float`` (the float
model written as an F32 GGUF) and ``naive Q4_0`` (that file with every decoder linear quantized by
``gguf.quants.quantize``, llama.cpp's own reference quantizer, which is what ``mode=ptq`` of
``smollm2_q4_0`` exports, code for code: ``tests/train/test_lm_distill.py``). Then tokens/s of the float and
naive Q4_0 files in llama.cpp (one 128-token prompt, and one token), and with ``--memory`` the peak RSS of
a few training steps of full QAT Q4_0, QAT-LoRA and a float fine-tune (each in its own process).

    python scripts/bench_llm.py outputs/smollm2_q4_0/<time> ... --json /work/bench/llm.json
    python scripts/bench_llm.py --memory --steps 3          # peak RSS only
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from qat.runs import config_file, latest_checkpoint

NAIVE = "naive Q4_0 (llama.cpp)"


def float_gguf(model: Any, tokenizer: Any, path: Path, quantize_linears: bool = False) -> Path:
    """``model`` as a GGUF file: every tensor F32, or (``quantize_linears``) the decoder linears in Q4_0 by
    llama.cpp's reference quantizer."""
    import gguf
    from gguf.quants import dequantize, quantize

    from qat.deploy.gguf import Tensor, gguf_tensors, write_file
    from qat.deploy.gguf_meta import arch_of

    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    tied = model.config.tie_word_embeddings
    cfg = {"layers": {}, "aliases": {"lm_head.weight": "model.embed_tokens.weight"} if tied else {},
           "float_tensors": {k: {} for k in sd if not (tied and k == "lm_head.weight")}}  # fmt: skip
    arch = arch_of(model)
    items = gguf_tensors(cfg, sd, model, arch)
    if quantize_linears:
        q4 = gguf.GGMLQuantizationType.Q4_0
        for i, t in enumerate(items):
            if t.name.startswith("blk.") and t.values.ndim == 2:
                data = quantize(t.values, q4)
                items[i] = Tensor(t.name, data, "Q4_0", dequantize(data, q4).reshape(t.values.shape))
    write_file(path, model, arch, items, tokenizer)
    return path


def llama_cpp_ppl(path: Path, batches: list[Any], threads: int) -> float:
    from qat.deploy.llamacpp import LlamaCpp

    engine = LlamaCpp(path, n_ctx=int(batches[0][0].shape[1]), threads=threads)
    nll = n = 0.0
    for x, y in batches:
        for row, tgt in zip(x, y, strict=True):
            logits = torch.from_numpy(engine.logits(row.tolist()))
            nll += float(F.cross_entropy(logits.float(), tgt, reduction="sum"))
            n += tgt.numel()
    return math.exp(nll / n)


@torch.inference_mode()
def transformers_ppl(model: Any, batches: list[Any]) -> float:
    nll = n = 0.0
    for x, y in batches:
        logits = model(x).logits.float()
        nll += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
        n += y.numel()
    return math.exp(nll / n)


def gguf_ppl(path: Path, batches: list[Any], threads: int) -> dict[str, float]:
    """A GGUF file's perplexity in llama.cpp and in transformers loading it (float activations)."""
    from qat.hf.models import causal_lm

    return {"llama_cpp_ppl": llama_cpp_ppl(path, batches, threads),
            "transformers_ppl": transformers_ppl(causal_lm(str(path)), batches)}  # fmt: skip


def compressed_tensors_ppl(path: Path, batches: list[Any], threads: int) -> dict[str, float]:
    """A compressed-tensors directory's perplexity in transformers (its own input quantization rule)."""
    from qat.deploy.compressed_tensors import load

    return {"transformers_ppl": transformers_ppl(load(path), batches)}


# The deploy files a run's export may hold (qat.deploy.registry.TARGETS) -> (perplexities of the file, the
# engine whose perplexity the increase and the recovery of its row are taken in).
ENGINES = {
    "gguf": (gguf_ppl, "llama_cpp_ppl"),
    "compressed-tensors": (compressed_tensors_ppl, "transformers_ppl"),
}


def tokens_per_s(path: Path, threads: int, tokens: int, repeats: int) -> float:
    from qat.deploy.llamacpp import LlamaCpp

    engine = LlamaCpp(path, n_ctx=max(tokens, 8), threads=threads)
    ids = list(range(100, 100 + tokens))
    engine.logits(ids)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        engine.logits(ids)
        times.append(time.perf_counter() - t0)
    return tokens / float(np.median(times))


def run_facts(run: Path) -> dict[str, Any]:
    """What a row says of its run: format, mode, LoRA rank and the optimizer steps trained (from the last
    checkpoint: a run stopped early by SIGTERM and exported with qat-export has no metrics.json)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(config_file(run))
    ckpt = latest_checkpoint(run)
    steps = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)["global_step"] if ckpt else 0
    return {"run": str(run), "quant": cfg.quant.get("name"), "mode": cfg.mode,
            "lora_rank": int((cfg.get("lora") or {}).get("rank", 0)), "train_steps": int(steps),
            "tokens_per_step": int(cfg.data.batch_size) * int(cfg.data.seq_len)}  # fmt: skip


def label(metrics: dict[str, Any], target: str) -> str:
    lora = f" LoRA r{metrics['lora_rank']}" if metrics.get("lora_rank") else ""
    return f"{metrics['quant']} {metrics['mode']}{lora} ({target})"


def size(path: Path) -> int:
    return (
        sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        if path.is_dir()
        else path.stat().st_size
    )


def add_recovery(rows: list[dict[str, Any]]) -> None:
    """Each row's increase over float in its engine and, for a QAT row, its recovery: against its PTQ
    counterpart (same format and file), or naive Q4_0 for a Q4_0 file without one."""
    by_key = {(r.get("quant"), r.get("mode"), r["target"]): r for r in rows if not r.get("lora_rank")}
    for r in rows:
        key = r["engine"]
        base = rows[0][key]  # float, in the same engine
        r["ppl"] = r[key]
        r["increase_pct"] = 100 * (r[key] / base - 1)
        ptq = by_key.get((r.get("quant"), "ptq", r["target"]))
        if ptq is None and r.get("quant") == "gguf_q4_0" and r["target"] == "gguf":
            ptq = next(p for p in rows if p["name"] == NAIVE)
        if r.get("mode") == "qat" and ptq is not None and ptq[key] > base:
            r["recovery_pct"] = 100 * (ptq[key] - r[key]) / (ptq[key] - base)
            r["recovery_against"] = ptq["name"]


def table(runs: list[Path], threads: int, max_batches: int, repeats: int) -> list[dict[str, Any]]:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from qat.deploy.registry import TARGETS
    from qat.runs import export_dir

    cfg = OmegaConf.load(config_file(runs[0]))  # the runs' data and float model
    dm = instantiate(cfg.data)
    dm.setup("test")
    batches = list(itertools.islice(dm.test_dataloader(), max_batches))
    tokenizer, model = dm.tokenizer, instantiate(cfg.model)
    tmp = Path(tempfile.mkdtemp())
    naive = float_gguf(model, tokenizer, tmp / "q4_0.gguf", quantize_linears=True)
    files = [
        ("float", "gguf", float_gguf(model, tokenizer, tmp / "float.gguf"), {}),
        (NAIVE, "gguf", naive, {}),
    ]
    for run in runs:
        facts = run_facts(run)
        found = [t for t in ENGINES if (export_dir(run) / TARGETS[t].file).exists()]
        if not found:
            raise SystemExit(f"{run}: no GGUF or compressed-tensors export under {export_dir(run)}")
        files += [(label(facts, t), t, export_dir(run) / TARGETS[t].file, facts) for t in found]
    rows = []
    for name, target, path, facts in files:
        measure, engine = ENGINES[target]
        row = {"name": name, "target": target, "engine": engine, **measure(path, batches, threads),
               "file_bytes": size(path), **facts}  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
    add_recovery(rows)
    speed = {n: {f"{t}_tokens": tokens_per_s(files[i][2], threads, t, repeats) for t in (128, 1)}
             for i, n in enumerate(("float", NAIVE))}  # fmt: skip
    rows.append({"name": "tokens_per_s", "threads": threads, **speed})
    return rows


def memory_child(kind: str, steps: int, seq_len: int, batch: int, bf16: bool) -> None:
    """A few training steps of ``kind`` (float | qat | lora) on SmolLM2 (``bf16``: under bf16 autocast),
    then the peak RSS and the time per step as JSON."""
    import copy

    import qat
    from qat.hf.models import causal_lm
    from qat.quant.lora import LoRAConfig, add_lora
    from qat.train.lm_distill import CausalLMModule

    model = causal_lm("smollm2")
    teacher = copy.deepcopy(model)
    if kind != "float":
        q4 = qat.QuantConfig.from_dict("gguf_q4_0")  # the recipe smollm2_q4_0's layers
        model = qat.prepare(model, dataclasses.replace(q4, include=["model.layers.*"]))
    if kind == "lora":
        add_lora(model, LoRAConfig(rank=16, targets=["model.layers.*"]))
    module = CausalLMModule(model, teacher=teacher, distill={"weight": 1.0}).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    g = torch.Generator().manual_seed(0)
    t0 = time.time()
    for _ in range(steps):
        x = torch.randint(0, 49152, (batch, seq_len + 1), generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = module.train_loss((x[:, :-1], x[:, 1:]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"kind": kind, "bf16": bf16, "peak_rss_gib": round(rss, 3),
                      "s_per_step": round((time.time() - t0) / steps, 2)}))  # fmt: skip


def memory(steps: int, seq_len: int, batch: int, bf16: bool) -> list[dict[str, Any]]:
    rows = []
    for kind in ("float", "qat", "lora"):
        out = subprocess.run([sys.executable, __file__, "--memory-child", kind, "--steps", str(steps),
                              "--seq-len", str(seq_len), "--batch", str(batch), *(["--bf16"] * bf16)],
                             check=True, capture_output=True, text=True).stdout  # fmt: skip
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    for r in rows:
        r["vs_float"] = r["peak_rss_gib"] / rows[0]["peak_rss_gib"]
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", type=Path, help="qat-train run directories (data=lmtext, GGUF exports)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-batches", type=int, default=0, help="test batches (0: the whole test split)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--memory", action="store_true", help="also the peak RSS of full QAT, LoRA, float")
    p.add_argument("--memory-child", choices=("float", "qat", "lora"), help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--bf16", action="store_true", help="--memory: the steps under bf16 autocast")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child, args.steps, args.seq_len, args.batch, args.bf16)
        return
    result: dict[str, Any] = {}
    if args.runs:
        result["table"] = table(args.runs, args.threads, args.max_batches or None, args.repeats)
    if args.memory:
        result["memory"] = memory(args.steps, args.seq_len, args.batch, args.bf16)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
