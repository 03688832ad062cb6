"""Export -> load -> compare for the byte-level GPT: perplexities agree to 4 significant digits."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers.export_models import quant_cfg, quantize, tiny_gpt
from helpers.oracle_check import assert_matches_oracle

import qat
from qat.deploy.runtime import IntLinear, RuntimeActQuant
from qat.quant.quantizer import FakeQuantizer

CONFIGS = {
    "w8a8": quant_cfg("w8a8"),
    "w4a4": quant_cfg("w4a4"),
    "w2a2": quant_cfg("w2a2"),
    "w4g32a8dyn": quant_cfg("w4g32a8dyn"),
    "w2g32a8dyn": quant_cfg("w2g32a8dyn"),
    "bitnet": quant_cfg("bitnet"),
    "fp8_e4m3_dyn": quant_cfg("fp8_e4m3_dyn"),
    # static int8 everywhere, including the attention matmul operands (q/k/v hook points)
    "w8a8_attention": {**quant_cfg("w8a8"), "attention": {"format": "int8"}},
    "w4a8_dyn_attention": {**quant_cfg("w4g32a8dyn"), "attention": {"format": "int8", "dynamic": True}},
}


FAST = {"w8a8", "w4a4", "w2a2", "w4g32a8dyn", "w8a8_attention"}
PARAMS = [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in CONFIGS]


@pytest.mark.parametrize("name", PARAMS)
def test_export_reload_perplexity_agrees(name, pytext, gpt_float, tmp_path):
    model = quantize(gpt_float, copy.deepcopy(CONFIGS[name]), pytext, qat_steps=3)
    report = qat.export(model, tmp_path / "e", batches=pytext.val, task="lm")
    v = report.verification
    assert v["passed"]
    a, b = v["perplexity_reference"], v["perplexity_exported"]
    assert f"{a:.4g}" == f"{b:.4g}" or abs(a - b) <= 5e-5 * a
    assert v["max_abs_logit_diff"] == 0.0  # free-running, bit for bit
    assert report.budget_ok
    runtime = qat.load_quantized(tmp_path / "e", tiny_gpt())
    if name == "w8a8":
        linears = [m for m in runtime.modules() if isinstance(m, IntLinear)]
        assert len(linears) == 9 and all(m.uses_int_mm for m in linears)
    if "attention" in name:
        hooks = [runtime.blocks[0].attn.q_quant, runtime.blocks[1].attn.v_quant]
        assert all(isinstance(h, RuntimeActQuant) for h in hooks)
    x = pytext.val[0][0]
    with torch.no_grad():
        assert torch.equal(runtime(x), model(x))  # a fresh skeleton: eval-mode fake quant, bit for bit
    # Both share their integer GEMM code: the independent reference checks it (helpers.oracle).
    assert_matches_oracle(tmp_path / "e", tiny_gpt, [x], runtime=runtime, fake_quant=model)
    exact = qat.load_quantized(tmp_path / "e", tiny_gpt(), int_matmul=False)
    with torch.enable_grad():  # the float fake-quant forward = the dequantisation path, bit for bit
        assert torch.equal(exact(x), model(x).detach())


def test_tied_embeddings_are_stored_once(pytext, tmp_path):
    torch.manual_seed(0)
    model = qat.prepare(tiny_gpt(tie_weights=True), quant_cfg("w8a8"))
    qat.calibrate(model, pytext.cal)
    model.eval()
    report = qat.export(model, tmp_path / "e", batches=pytext.val[:2], task="lm")
    cfg = report.layers
    assert {r["name"] for r in cfg} >= {"tok_emb", "lm_head"}
    qc = json.loads((tmp_path / "e" / "quant_config.json").read_text())
    emb, head = qc["layers"]["tok_emb"]["weight"], qc["layers"]["lm_head"]["weight"]
    assert (
        emb["codes"]["tensor"] == head["codes"]["tensor"] == "tok_emb.weight.codes"
    )  # one copy of the codes
    skeleton = tiny_gpt(tie_weights=True)
    runtime = qat.load_quantized(tmp_path / "e", skeleton)
    with torch.no_grad():
        x = pytext.val[0][0]
        assert float((runtime(x) - model(x)).abs().max()) < 1e-3
    assert_matches_oracle(tmp_path / "e", lambda: tiny_gpt(tie_weights=True), [x], runtime=runtime)


def test_standalone_attention_quantizers_are_exported(pytext, gpt_float, tmp_path):
    cfg = {"weight": {"format": "int8", "granularity": "per_channel"}, "attention": {"format": "int4"}}
    model = quantize(gpt_float, cfg, pytext, qat_steps=0)
    assert isinstance(model.blocks[0].attn.k_quant, FakeQuantizer)
    qat.export(model, tmp_path / "e", batches=pytext.val[:2], task="lm")
    layers = json.loads((tmp_path / "e" / "quant_config.json").read_text())["layers"]
    k = layers["blocks.0.attn.k_quant"]
    assert k["op"] == "activation" and k["input"]["format"] == "int4" and k["input"]["scale"] is not None
    assert_matches_oracle(tmp_path / "e", tiny_gpt, [pytext.val[0][0]], fake_quant=model)
