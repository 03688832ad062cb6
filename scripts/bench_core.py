"""Core benchmark (issue 2): float vs PTQ vs QAT on digits and on the pytext GPT.

digits: the main job per quant config (float baseline, then QAT), test accuracy before/after.
pytext: a float GPT is pre-trained once; from it, for the same number of further steps, we compare
float fine-tuning, PTQ (calibration only) and QAT, at W4 group-32 + int8 dynamic per-token activations
and W2 group-32 + int8. The figure of merit is test perplexity relative to the float fine-tune.

    python scripts/bench_core.py --out bench_core.json            # full (pre-trained model cached)
    python scripts/bench_core.py --pretrain-steps 100 --steps 50  # quick look
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import lightning as L
import torch

import qat
from qat.data.pytext import PyTextDataModule
from qat.models.gpt import TinyGPT
from qat.train.module import QATModule

PYTEXT_SCHEMES = {
    "w4g32a8dyn": "qat/conf/quant/w4g32a8dyn.yaml",
    "w2g32a8dyn": "qat/conf/quant/w2g32a8dyn.yaml",
}
REPO = Path(__file__).resolve().parents[1]


def _trainer(steps: int) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, gradient_clip_val=1.0, deterministic=True,
    )  # fmt: skip


def _fit(
    model: torch.nn.Module, dm: PyTextDataModule, steps: int, lr: float, scale_lr_mult: float = 1.0
) -> float:
    module = QATModule(model, task="lm", optimizer=lambda params: torch.optim.AdamW(params, lr=lr),
                       scheduler="cosine", warmup_steps=min(50, steps // 10),
                       scale_lr_mult=scale_lr_mult)  # fmt: skip
    t = time.time()
    _trainer(steps).fit(module, datamodule=dm)
    return time.time() - t


def _test_ppl(model: torch.nn.Module, dm: PyTextDataModule) -> float:
    module = QATModule(model, task="lm")
    res = _trainer(1).test(module, datamodule=dm, verbose=False)
    return float(res[0]["test/ppl"])


def _quant_cfg(name: str) -> dict:
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(REPO / PYTEXT_SCHEMES[name]))
    cfg.pop("name")
    # Same choice as the pytext recipes: embeddings and lm_head at int8 per channel.
    cfg["overrides"] = {
        "*_emb": {"weight": {"format": "int8", "granularity": "per_channel"}},
        "lm_head": {"weight": {"format": "int8", "granularity": "per_channel"}},
    }
    return cfg


def bench_pytext(args: argparse.Namespace) -> dict:
    L.seed_everything(0)
    dm = PyTextDataModule(seq_len=args.seq_len, batch_size=32, max_bytes=args.max_bytes)
    dm.setup("fit")
    base = TinyGPT(seq_len=args.seq_len, d_model=args.d_model, n_layers=args.n_layers, n_heads=4)
    # The pre-trained model is cached per setting: later runs (other schemes, other QAT steps) reuse it.
    key = f"gpt_s{args.seq_len}_d{args.d_model}_l{args.n_layers}_b{args.max_bytes}_p{args.pretrain_steps}"
    cache = Path(args.workdir) / f"{key}.pt"
    if cache.is_file():
        base.load_state_dict(torch.load(cache, weights_only=True))
        t_pre = 0.0
    else:
        t_pre = _fit(base, dm, args.pretrain_steps, args.lr)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(base.state_dict(), cache)
    out: dict = {"pretrain_steps": args.pretrain_steps, "steps": args.steps, "pretrain_s": round(t_pre, 1),
                 "pretrained_ppl": _test_ppl(base, dm)}  # fmt: skip

    ft = copy.deepcopy(base)
    out["float_finetune_s"] = round(_fit(ft, dm, args.steps, args.lr * args.ft_lr_mult), 1)
    out["float_finetune_ppl"] = ref = _test_ppl(ft, dm)
    for name in args.schemes:
        ptq = qat.prepare(copy.deepcopy(base), _quant_cfg(name))
        qat.calibrate(ptq, dm.calibration_dataloader(), num_batches=16)
        ptq_ppl = _test_ppl(ptq, dm)
        q = qat.prepare(copy.deepcopy(base), _quant_cfg(name))
        qat.calibrate(q, dm.calibration_dataloader(), num_batches=16)
        qat_lr_mult = args.ft_lr_mult if args.qat_lr_mult is None else args.qat_lr_mult
        t = _fit(q, dm, args.steps, args.lr * qat_lr_mult, args.scale_lr_mult)
        qat_ppl = _test_ppl(q, dm)
        out[name] = {
            "ptq_ppl": ptq_ppl, "qat_ppl": qat_ppl, "qat_s": round(t, 1),
            "ptq_vs_float_ft_pct": round(100 * (ptq_ppl / ref - 1), 2),
            "qat_vs_float_ft_pct": round(100 * (qat_ppl / ref - 1), 2),
        }  # fmt: skip
        print(name, out[name], flush=True)
    return out


def bench_digits(args: argparse.Namespace) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from qat.cli.train import CONFIG_DIR
    from qat.train.job import run

    res = {}
    for quant in ("w8a8", "w4a4", "w2a2"):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("train", overrides=[f"quant={quant}", "logger=none", "export.enabled=false",
                                              f"paths.output_dir={args.workdir}/digits_{quant}"])  # fmt: skip
        with open_dict(cfg):
            cfg.paths.output_dir = f"{args.workdir}/digits_{quant}"
        m = run(cfg)
        res[quant] = {"float_acc": m["baseline"]["acc"], "qat_acc": m["quantized"]["acc"],
                      "size_float": m["size_bytes"]["baseline"], "size_q": m["size_bytes"]["quantized"],
                      "wall_s": m["wall_time_s"]}  # fmt: skip
        print(quant, res[quant], flush=True)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_core.json")
    p.add_argument("--workdir", default="/tmp/bench_core")
    p.add_argument("--only", choices=["digits", "pytext"], default=None)
    p.add_argument("--pretrain-steps", type=int, default=1500)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--max-bytes", type=int, default=2_000_000)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ft-lr-mult", type=float, default=0.25)
    p.add_argument("--scale-lr-mult", type=float, default=0.1, help="quantizer lr multiplier")
    p.add_argument("--qat-lr-mult", type=float, default=None, help="QAT lr / --lr (default: as ft)")
    p.add_argument("--schemes", nargs="+", default=list(PYTEXT_SCHEMES), choices=list(PYTEXT_SCHEMES))
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (1 is fastest on a shared CPU)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    result = {"torch": torch.__version__, "args": vars(args)}
    if args.only in (None, "digits"):
        result["digits"] = bench_digits(args)
    if args.only in (None, "pytext"):
        result["pytext"] = bench_pytext(args)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
