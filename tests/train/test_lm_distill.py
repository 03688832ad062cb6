"""Task causal_lm on a tiny random Llama (model=tiny_llama, data=lmtext): the distillation losses, the
teacher cache, and the whole path of the SmolLM2 recipes (prepare -> distill steps -> GGUF export from the
run directory alone -> loaded back), full QAT and QAT-LoRA; PTQ Q4_0 gives llama.cpp's own codes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.extras import require

require("transformers", extra="transformers")
gguf = require("gguf", extra="gguf")
require("accelerate", extra="gguf")

from qat.train.lm_distill import CausalLMModule, TeacherCache, topk_distillation_loss  # noqa: E402

TINY = ("model=tiny_llama", "logger=none", "data.max_docs=40", "data.seq_len=32", "data.batch_size=4",
        "data.max_windows={train: 16, validation: 4, test: 8}", "trainer.limit_train_batches=4",
        "export.max_batches=1")  # fmt: skip


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 320, (2, 9), generator=torch.Generator().manual_seed(seed))


def test_topk_loss_is_the_full_kl_plus_the_teacher_entropy_when_k_is_the_vocabulary():
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    from qat.train.distill import distillation_loss

    v, i = t.topk(11, dim=-1)
    q = torch.softmax(t / 2, -1)
    entropy = -(q * q.log()).sum(-1).mean() * 4
    assert float(topk_distillation_loss(s, v, i, 2.0)) == pytest.approx(
        float(distillation_loss(s, t, "kl", 2.0) + entropy), rel=1e-5
    )


def test_teacher_cache_writes_once_then_reads_the_same_logits(tmp_path):
    from qat.hf.models import causal_lm

    teacher = causal_lm("tiny_llama")
    cache = TeacherCache(tmp_path, k=8)
    v1, i1 = cache.topk(_ids(), teacher)
    assert len(list(tmp_path.iterdir())) == 1
    teacher.model.embed_tokens.weight.data.zero_()  # a stale teacher: the cache still answers
    v2, i2 = cache.topk(_ids(), teacher)
    assert torch.equal(i1, i2) and torch.allclose(v1, v2, atol=1e-2)  # stored as fp16
    cache.topk(_ids(1), teacher)
    assert len(list(tmp_path.iterdir())) == 2


def test_module_mixes_data_loss_and_distillation():
    from qat.hf.models import causal_lm

    student, teacher = causal_lm("tiny_llama"), causal_lm("tiny_llama")
    with torch.no_grad():
        student.model.norm.weight.mul_(1.5)
    x = _ids()
    batch = (x[:, :-1], x[:, 1:])
    pure = CausalLMModule(student, teacher=teacher, distill={"weight": 1.0})
    half = CausalLMModule(student, teacher=teacher, distill={"weight": 0.5})
    data = CausalLMModule(student, teacher=teacher, distill={"weight": 0.0})
    kd, parts = pure.train_loss(batch)
    ce, _ = data.train_loss(batch)
    mixed, _ = half.train_loss(batch)
    assert float(kd) > 0 and float(parts["distill"]) == float(kd)
    assert float(mixed) == pytest.approx(0.5 * float(ce) + 0.5 * float(kd), rel=1e-5)


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory):
    from helpers.configs import compose_cfg

    from qat.train.job import run

    out = tmp_path_factory.mktemp("q4")
    cfg = compose_cfg(["recipe=smollm2_q4_0", *TINY, "optim.optimizer.lr=1e-3"], out)
    return out, run(cfg)


def test_qat_q4_0_run_trains_distills_and_records_format_and_mode(qat_run):
    out, metrics = qat_run
    assert metrics["mode"] == "qat" and metrics["quant"] == "gguf_q4_0" and metrics["lora_rank"] == 0
    assert metrics["primary_metric"] == "ppl" and metrics["baseline"]["ppl"] > 1
    assert metrics["export"]["verification"] and (out / "export" / "model.gguf").is_file()
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert not (out / "checkpoints" / "float").exists()  # the pretrained model is the baseline


def test_qat_export_target_gguf_needs_only_the_run_directory(qat_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qat.cli.export import main

    out, _ = qat_run
    main([f"run_dir={out}", "target=gguf", f"out={tmp_path / 'exp'}", "max_batches=1"])
    path = tmp_path / "exp" / "model.gguf"
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.model"].contents() == "gpt2"
    tok = AutoTokenizer.from_pretrained(tmp_path / "exp", gguf_file="model.gguf")
    assert (
        tok("def f(x):\n")["input_ids"]
        == AutoTokenizer.from_pretrained(out / "tokenizer")("def f(x):\n")["input_ids"]
    )
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "exp", gguf_file="model.gguf").eval()
    assert loaded(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 320)


def _q4_blocks(path: Path) -> dict[str, np.ndarray]:
    return {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors if t.tensor_type.name == "Q4_0"}


def test_ptq_q4_0_codes_are_llama_cpp_own_quantization_of_the_float_model(make_cfg):
    from gguf.quants import quantize

    from qat.deploy.gguf import permute
    from qat.hf.models import causal_lm
    from qat.train.job import run

    cfg = make_cfg("recipe=smollm2_q4_0", "mode=ptq", *TINY)
    run(cfg)
    blocks = _q4_blocks(Path(cfg.paths.output_dir) / "export" / "model.gguf")
    float_model = causal_lm("tiny_llama")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    assert len(blocks) == 14  # 7 linears in each of the 2 decoder layers
    for key, w in float_model.state_dict().items():
        gname = names.get_name(key, try_suffixes=(".weight",))
        if gname not in blocks:
            continue
        want = quantize(w.float().numpy(), gguf.GGMLQuantizationType.Q4_0)
        kind = gname.split(".")[-2]
        if kind in ("attn_q", "attn_k"):
            want = permute(want, 4 if kind == "attn_q" else 2)
        assert np.array_equal(blocks[gname], want), gname


def test_qat_lora_trains_adapters_only_and_exports_them_merged(make_cfg):
    from qat.hf.models import causal_lm
    from qat.train.job import run

    cfg = make_cfg("recipe=smollm2_q4_0", *TINY, "lora.rank=4", "optim.optimizer.lr=1e-2")
    metrics = run(cfg)
    assert metrics["lora_rank"] == 4 and metrics["export"]["verification"]
    out = Path(cfg.paths.output_dir)
    state = torch.load(out / "checkpoints" / "qat" / "last.ckpt", weights_only=True)["state_dict"]
    adapters = [k for k in state if k.endswith(".weight.0.B")]
    assert len(adapters) == 14 and any(state[k].abs().sum() > 0 for k in adapters)
    float_sd = causal_lm("tiny_llama").state_dict()
    key = "model.layers.0.mlp.down_proj"
    assert torch.equal(state[f"model.{key}.parametrizations.weight.original"], float_sd[f"{key}.weight"])
    # the exported codes are the merged weights' (llama.cpp's Q4_0 of W + BA), not the frozen base's
    written = _q4_blocks(out / "export" / "model.gguf")["blk.0.ffn_down.weight"]
    p = f"model.{key}.parametrizations.weight"
    merged = state[f"{p}.original"] + state[f"{p}.0.B"] @ state[f"{p}.0.A"] * (16.0 / 4)
    q4 = gguf.GGMLQuantizationType.Q4_0
    assert np.array_equal(written, gguf.quants.quantize(merged.numpy(), q4))
    assert not np.array_equal(written, gguf.quants.quantize(float_sd[f"{key}.weight"].numpy(), q4))
    assert json.loads((out / "metrics.json").read_text())["mode"] == "qat"
    from qat.runs import load_run

    reopened = load_run(out).model.get_submodule(key)  # what qat-export starts from: adapters merged
    assert type(reopened).__name__ == "QuantLinear" and torch.equal(reopened.weight.detach(), merged)


def test_w4a8_run_exports_compressed_tensors_that_transformers_runs(tmp_path):
    """recipe=smollm2_w4a8 on the tiny Llama: the run writes compressed-tensors W4A8 next to the native
    export, verified in transformers by the export itself; loaded back, it gives logits of the right shape."""
    from helpers.configs import compose_cfg
    from transformers import AutoModelForCausalLM

    from qat.train.job import run

    out = tmp_path / "w4a8"
    metrics = run(compose_cfg(["recipe=smollm2_w4a8", *TINY, "calibration.batches=1"], out))
    ct_dir = out / "export" / "compressed-tensors"
    block = json.loads((ct_dir / "config.json").read_text())["quantization_config"]
    (group,) = block["config_groups"].values()
    assert block["format"] == "pack-quantized" and group["weights"]["num_bits"] == 4
    assert group["input_activations"]["strategy"] == "token" and metrics["quant"] == "w4g32a8dyn"
    loaded = AutoModelForCausalLM.from_pretrained(ct_dir).eval()
    assert loaded(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 320)
