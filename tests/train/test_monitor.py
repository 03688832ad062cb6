"""QuantizerMonitor (scales, clip fractions, bit widths in the logs) and the config in the checkpoint."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers.extras import require
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from qat.calibrate import calibrate
from qat.config import QuantSpec
from qat.models.cnn import MLP
from qat.quant.quantizer import FakeQuantizer
from qat.rewrite import prepare
from qat.train.job import build_trainer, run
from qat.train.module import QATModule
from qat.train.monitor import (
    ConfigInCheckpoint,
    ProgressBar,
    QuantizerMonitor,
    bit_widths,
    config_from_checkpoint,
    scale_and_clip,
)


def _learned_int8(scale: float) -> FakeQuantizer:
    fq = FakeQuantizer(QuantSpec(format="int8", scale="lsq"), "activation")
    with torch.no_grad():
        fq.scale.fill_(scale)
    fq.initialized.fill_(1)
    fq.sync_flags()
    return fq


def test_clip_fraction_counts_values_outside_the_grid():
    fq = _learned_int8(0.1)  # grid [-12.8, 12.7]
    x = torch.tensor([0.0, 1.0, 12.7, 20.0, -13.0])
    scale, clip = scale_and_clip(fq, x)
    assert scale == pytest.approx(0.1) and clip == pytest.approx(2 / 5)


def test_clip_fraction_per_group_weights():
    torch.manual_seed(0)
    w = torch.randn(2, 8)
    spec = QuantSpec(format="int4", granularity="per_group", group_size=4, scale="minmax")
    fq = FakeQuantizer(spec, "weight", shape=(2, 8))
    fq(w)  # the observer sets one scale per group of 4 from this weight
    assert scale_and_clip(fq, w)[1] == 0.0  # min-max ranges cover the tensor they came from
    clip = scale_and_clip(fq, 3 * w)[1]
    assert 0.0 < clip <= 1.0


def test_no_clip_fraction_where_it_means_nothing():
    dyn = FakeQuantizer(QuantSpec(format="int8", granularity="per_token", dynamic=True), "activation")
    assert scale_and_clip(dyn, torch.randn(4, 8))[1] is None
    tern = FakeQuantizer(QuantSpec(format="ternary", granularity="per_channel"), "weight", shape=(4, 8))
    assert scale_and_clip(tern, torch.randn(4, 8))[1] is None
    assert scale_and_clip(_learned_int8(0.1).enable_fake_quant(False), torch.ones(3)) is None
    uninit = FakeQuantizer(QuantSpec(format="int8", scale="lsq"), "activation")
    assert scale_and_clip(uninit, torch.ones(3)) is None  # its scale is not initialised yet


def _tiny_prepared() -> tuple[nn.Module, DataLoader]:
    torch.manual_seed(0)
    model = MLP(in_features=16, num_classes=4, hidden=(8,))
    cfg = {
        "weight": {"format": "int4", "granularity": "per_channel", "scale": "lsq"},
        "activation": {"format": "int8", "symmetric": False, "scale": "minmax"},
        "overrides": {"head": {"weight": {"format": "int8"}}},
    }
    prepare(model, cfg)
    data = DataLoader(TensorDataset(torch.randn(64, 16), torch.randint(0, 4, (64,))), batch_size=8)
    calibrate(model, data, 2)
    return model, data


def test_bit_widths_per_layer_and_weighted_mean():
    model, _ = _tiny_prepared()
    bits = bit_widths(model)
    assert bits["quant/fc1/w_bits"] == 4 and bits["quant/head/w_bits"] == 8
    assert bits["quant/fc1/a_bits"] == 8
    # fc1 has 16*8 weights at 4 bit, head 8*4 at 8 bit.
    assert bits["quant/avg_w_bits"] == pytest.approx((128 * 4 + 32 * 8) / 160)


def test_monitor_logs_at_its_interval_in_a_real_fit(tmp_path):
    model, data = _tiny_prepared()
    monitor = QuantizerMonitor(every_n_steps=2)
    trainer = L.Trainer(
        max_steps=5,
        logger=L.pytorch.loggers.CSVLogger(tmp_path, name="", version="qat"),
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(QATModule(model, task="classification", num_classes=4), train_dataloaders=data)
    rows = list(csv.DictReader((tmp_path / "qat" / "metrics.csv").open()))
    steps = [int(r["step"]) for r in rows if r.get("quant/w_clip_mean")]
    assert steps == [0, 2, 4]  # every 2 steps, and the last one
    logged = {k for r in rows for k, v in r.items() if v}
    for key in ("quant/fc1/w_scale", "quant/fc1/w_clip", "quant/head/a_scale", "quant/head/a_clip"):
        assert key in logged  # the user's layer names, not model.fc1
    assert "quant/fc1/w_bits" in logged and "quant/a_clip_mean" in logged
    assert 0.0 <= monitor.last["quant/a_clip_mean"] <= 1.0
    assert not any(m._forward_pre_hooks for m in model.modules())  # hooks only live for the logged batch


def test_monitor_rejects_a_bad_interval():
    with pytest.raises(ValueError, match="callbacks.quant_monitor.every_n_steps: 0 is not valid; allowed"):
        QuantizerMonitor(every_n_steps=0)


def test_job_logs_quantizer_state_and_checkpoints_carry_the_config(make_cfg):
    cfg = make_cfg("debug=fast", "export.enabled=false", "callbacks.quant_monitor.every_n_steps=2")
    run(cfg)
    out = Path(cfg.paths.output_dir)
    header = (out / "logs" / "qat" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"quant/conv2/w_clip", "quant/conv2/a_clip", "quant/avg_w_bits"} <= set(header)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for phase in ("float", "qat"):
        carried = config_from_checkpoint(out / "checkpoints" / phase / "last.ckpt")
        assert carried == resolved


@pytest.mark.parametrize(("choice", "monitors"), [("default", 1), ("none", 0)])
def test_callbacks_group_adds_the_monitor(make_cfg, choice, monitors):
    cfg = make_cfg(f"callbacks={choice}", "logger=none")
    trainer = build_trainer(cfg, "qat", Path(cfg.paths.output_dir), [])
    kinds = [type(c) for c in trainer.callbacks]
    assert kinds.count(QuantizerMonitor) == monitors
    assert ConfigInCheckpoint in kinds and ProgressBar in kinds  # always there (rich is installed here)


def test_weight_stats_measure_the_tensor_the_quantizer_sees():
    """SmoothQuant layers quantize W * s (GPT-2's Conv1D its [out, in] transpose): min/max scales of that
    tensor clip nothing, and the stats must say so rather than judge the raw weight against them."""
    from qat.train.monitor import weight_stats

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    cfg = {
        "weight": {"format": "int8", "granularity": "per_channel", "scale": "minmax"},
        "activation": {"format": "int8", "scale": "minmax", "symmetric": False},
        "smooth": 0.8,
    }
    q = prepare(model, cfg)
    x = torch.randn(32, 8)
    x[:, 2] *= 50.0
    calibrate(q, [(x,)])
    stats = weight_stats(q)
    assert stats["quant/0/w_clip"] == 0.0 and stats["quant/2/w_clip"] == 0.0
    require("transformers", extra="transformers")
    from qat.hf.models import tiny_model

    gpt = tiny_model("gpt2")
    prepare(gpt, {"weight": cfg["weight"], "exclude": ["lm_head", "transformer.w*"]})
    stats = weight_stats(gpt)  # c_attn is [in=32, out=96]: per-channel scales are per output feature
    assert stats["quant/transformer.h.0.attn.c_attn/w_clip"] == 0.0
