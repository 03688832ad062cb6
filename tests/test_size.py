"""One size definition: ``qat.size`` counts exactly the tensor bytes the exporter stores, for every format,
and metrics.json, the export report, qat-eval and qat-report show that one number."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from helpers.extras import require
from omegaconf import OmegaConf
from safetensors.torch import load_file, save
from torch import nn

import qat
from qat.conf import CONFIG_DIR
from qat.models import DigitsCNN, TinyGPT
from qat.models.cnn import MLP
from qat.size import float_size_bytes, quantized_size_bytes, safetensors_payload_bytes

QUANT_DIR = Path(CONFIG_DIR) / "quant"
QUANTS = sorted(p.stem for p in QUANT_DIR.glob("*.yaml") if p.stem != "fp32")


class OneLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def _quant(name: str, **extra) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(QUANT_DIR / f"{name}.yaml"), resolve=True)
    assert isinstance(cfg, dict)
    cfg.pop("name", None)
    return {**cfg, **extra}


def _batches(model: nn.Module, n: int = 3) -> list:
    torch.manual_seed(0)
    if isinstance(model, TinyGPT):
        return [(torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))) for _ in range(n)]
    width = model.fc1.in_features if isinstance(model, MLP) else 64
    shape = {DigitsCNN: (8, 1, 8, 8), OneLinear: (8, 16)}.get(type(model), (8, width))
    return [(torch.randn(shape), torch.randint(0, 10, (8,))) for _ in range(n)]


def _prepared(model: nn.Module, cfg: dict) -> nn.Module:
    qat.prepare(model, cfg)
    batches = _batches(model)
    qat.calibrate(model, batches)
    model.train()
    for x, _ in batches:  # a training forward initialises learned scales that calibration left alone
        model(x)
    return model.eval()


def _export(model: nn.Module, out: Path) -> qat.deploy.ExportReport:
    return qat.export(model, out, verify=False)


def test_hand_counted_bytes_of_one_int4_linear(tmp_path):
    """Linear 16->8, int4 per-channel weights, int8 asymmetric per-tensor input, float bias."""
    weight = {"format": "int4", "granularity": "per_channel", "scale": "minmax"}
    act = {"format": "int8", "granularity": "per_tensor", "symmetric": False, "scale": "minmax"}
    model = _prepared(OneLinear(), {"weight": weight, "activation": act})
    codes = 16 * 8 * 4 // 8  # 128 int4 codes, two per byte
    weight_scales = 8 * 4  # one float32 scale per output channel
    input_qparams = 4 + 1  # float32 scale + uint8/int8 zero point
    bias = 8 * 4
    assert quantized_size_bytes(model) == codes + weight_scales + input_qparams + bias == 133
    assert float_size_bytes(model) == float_size_bytes(OneLinear()) == (16 * 8 + 8) * 4 == 544

    report = _export(model, tmp_path / "export")
    assert report.exported_bytes == 133 and report.float_bytes == 544
    assert report.breakdown == {"codes": 64, "scales_zero_points": 37, "float_kept": 32}
    weights = tmp_path / "export" / "model.safetensors"
    stored = load_file(weights)
    assert sum(t.numel() * t.element_size() for t in stored.values()) == 133
    assert safetensors_payload_bytes(weights) == 133
    assert report.file_bytes == weights.stat().st_size > 133  # the file adds its JSON header


def _model_for(quant: str) -> nn.Module:
    """DigitsCNN, or an MLP for group-wise weights (a group of 32 does not divide conv1's 1x3x3 inputs),
    as wide as the group (llama.cpp's ternary blocks hold 256 values)."""
    weight = _quant(quant).get("weight") or {}
    width = max(64, weight.get("group_size") or 0)
    groups = weight.get("granularity") == "per_group"
    return MLP(in_features=width, num_classes=10, hidden=(width,)) if groups else DigitsCNN()


@pytest.mark.parametrize("quant", QUANTS)
def test_size_is_the_export_payload_for_every_quant_config(quant, tmp_path):
    torch.manual_seed(0)
    float_model = _model_for(quant)
    model = _prepared(copy.deepcopy(float_model), _quant(quant))
    report = _export(model, tmp_path / "export")
    assert quantized_size_bytes(model) == report.exported_bytes
    assert safetensors_payload_bytes(tmp_path / "export" / "model.safetensors") == report.exported_bytes
    assert float_size_bytes(float_model) == float_size_bytes(model) == report.float_bytes


@pytest.mark.parametrize(
    "extra",
    [{"fold_bn": True}, {"smooth": 0.5}],
    ids=["conv-bn folded", "smoothquant"],
)
def test_size_is_the_export_payload_for_folded_and_smoothed_models(extra, tmp_path):
    float_model = DigitsCNN() if "fold_bn" in extra else MLP(in_features=64, num_classes=10, hidden=(64,))
    model = _prepared(copy.deepcopy(float_model), _quant("w8a8", **extra))
    report = _export(model, tmp_path / "export")
    assert quantized_size_bytes(model) == report.exported_bytes
    assert float_size_bytes(float_model) == float_size_bytes(model) == report.float_bytes


def test_tied_weights_and_attention_quantizers_count_once(tmp_path):
    float_model = TinyGPT(vocab_size=64, seq_len=16, d_model=32, n_layers=1, n_heads=2, tie_weights=True)
    attention = {"format": "int8", "granularity": "per_tensor", "scale": "minmax"}
    model = _prepared(copy.deepcopy(float_model), _quant("w8a8", attention=attention))
    report = _export(model, tmp_path / "export")
    assert quantized_size_bytes(model) == report.exported_bytes
    # The float model stores its tied embedding once, as a safetensors file of it would.
    blob = save({k: v for k, v in float_model.state_dict().items() if k != "lm_head.weight"})
    assert float_size_bytes(float_model) == len(blob) - 8 - int.from_bytes(blob[:8], "little")
    assert float_size_bytes(float_model) == report.float_bytes


@pytest.mark.parametrize(
    "overrides",
    [
        [],  # the default recipe: DigitsCNN W4A4, 8-bit first and last layers
        [
            "~recipe",
            "~model",
            "+model._target_=qat.models.cnn.MLP",
            "+model.in_features=64",
            "+model.num_classes=10",
            "+model.hidden=[16]",
            "quant=w4a4",
        ],
    ],
    ids=["digits W4A4", "tiny MLP"],
)
def test_metrics_export_eval_and_report_show_one_size(overrides, make_cfg, capsys):
    from qat.cli import eval as eval_cli
    from qat.report import collect
    from qat.train.job import run

    cfg = make_cfg(
        *overrides, "debug=fast", "logger=none", "callbacks=none", "export.max_batches=2", "export.repeats=2"
    )
    metrics = run(cfg)
    # The end of qat-train prints the before/after table of every target written, with latencies.
    printed = capsys.readouterr().out
    table = {r["name"]: r for r in metrics["export"]["table"]}
    assert list(table) == ["float", "fake-quant", "integer (export)"] and "integer (export)" in printed
    assert all(
        set(r["latency_ms"]) == {"1", "64"} and min(r["latency_ms"].values()) > 0 for r in table.values()
    )
    assert table["fake-quant"]["metric"] == table["integer (export)"]["metric"]  # bit-exact export
    out = Path(cfg.paths.output_dir)
    export = json.loads((out / "export" / "export_report.json").read_text())
    eval_cli.main([f"run_dir={out}", "repeats=1", "warmup=0", "batch_sizes=[1]", "max_batches=1"])
    rows = {r["name"]: r for r in json.loads((out / "eval.json").read_text())["rows"]}
    (record,) = collect([out])

    size = metrics["size_bytes"]["quantized"]
    assert size == export["exported_bytes"] == rows["integer (export)"]["size_bytes"] == record.size_bytes
    assert metrics["export"]["bytes"] == size
    float_size = metrics["size_bytes"]["baseline"]
    assert float_size == export["float_bytes"] == rows["float"]["size_bytes"] == record.float_bytes
    assert table["float"]["size_bytes"] == float_size and table["integer (export)"]["size_bytes"] == size
    assert rows["integer (export)"]["size_bytes"] < rows["float"]["size_bytes"]
    assert rows["integer (export)"]["file_bytes"] == export["file_bytes"] > size
    if not overrides:
        assert (size, float_size) == (9420, 58816)  # the figures README.md and docs/methods.md quote


def test_gpt2_conv1d_and_tied_head_sizes_are_the_export_payload(tmp_path):
    """GPT-2 stores Conv1D weights transposed ([in, out]); per-channel scales follow the output features."""
    require("transformers", extra="transformers")
    from qat.hf.models import example_inputs, logits, tiny_model

    float_model = tiny_model("gpt2")
    model = qat.prepare(copy.deepcopy(float_model), _quant("w8a8"))
    x = example_inputs("gpt2")
    qat.calibrate(model, [(x, x)], forward=logits)
    report = qat.export(model.eval(), tmp_path / "export", verify=False)
    assert quantized_size_bytes(model) == report.exported_bytes
    assert float_size_bytes(float_model) == float_size_bytes(model) == report.float_bytes
