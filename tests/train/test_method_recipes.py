"""Method recipes: each builds its method's quantizers and round-trips through a state dict (fast, no
Trainer); PTQ recipes and QAT recipes run as PTQ (``mode=ptq``) end to end with tiny limits; full QAT runs of
every recipe (and the pytext ones) are marked slow (tests/train/test_job.py also runs every recipe)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from qat.calibrate import calibrate
from qat.conf import CONFIG_DIR
from qat.quant.bnfold import QuantConvBn2d
from qat.rewrite import prepare, quantizers
from qat.runs import load_run
from qat.train.job import quant_config, run, validate

REPO = Path(__file__).resolve().parents[2]
FAST = (
    "debug=fast",
    "logger=none",
    "export.enabled=false",
    "baseline.max_epochs=0",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "calibration.batches=1",
    "data.batch_size=16",
)


def _codes(model: nn.Module, layer: str) -> set[int]:
    mod = model.get_submodule(layer)
    return set(mod.weight_quant.quantize(mod.weight)[0].unique().tolist())


def _binary(m: nn.Module) -> None:
    assert m.conv2.weight_quant.spec.format == "binary" and _codes(m, "conv2") == {-1, 1}
    assert m.conv1.weight_quant.spec.format == "int8" and m.fc.weight_quant.spec.format == "int8"


def _ternary(m: nn.Module) -> None:
    assert m.conv2.weight_quant.spec.scale == "twn" and _codes(m, "conv2") == {-1, 0, 1}
    assert m.conv1.weight_quant.spec.format == "int8"


def _ttq(m: nn.Module) -> None:
    q = m.conv3.weight_quant
    assert q.spec.scale == "ttq" and isinstance(q.scale_neg, nn.Parameter) and q.is_initialized


def _fp8(fmt: str) -> Callable[[nn.Module], None]:
    def check(m: nn.Module) -> None:
        assert {q.spec.format for _, q in quantizers(m)} == {fmt}

    return check


def _pact(m: nn.Module) -> None:
    assert (m.conv2.input_quant.spec.format, m.conv2.input_quant.spec.scale) == ("uint4", "pact")
    assert m.conv1.input_quant.spec.format == "uint8" and m.conv2.input_quant.learned


def _lsqplus(m: nn.Module) -> None:
    q = m.conv2.input_quant
    assert q.spec.format == "int4" and isinstance(q.zero_point, nn.Parameter)


def _bnfold(m: nn.Module) -> None:
    assert isinstance(m.conv2, QuantConvBn2d) and isinstance(m.bn2, nn.Identity)


def _anneal(m: nn.Module) -> None:  # early in [[0, 8], [60, 4], [120, 2]]: still at 8 bit
    assert m.conv2.weight_quant.bits == 8 and m.conv2.weight_quant.target_bits == 2


def _mixed(m: nn.Module) -> None:
    cfg = OmegaConf.load(Path(CONFIG_DIR) / "quant" / "mixed_digits_w3.yaml")
    for layer, ov in cfg.overrides.items():
        assert m.get_submodule(layer).weight_quant.spec.format == ov.weight.format


def _distill(m: nn.Module) -> None:
    assert m.conv2.weight_quant.spec.format == "int2"


QAT_RECIPES: dict[str, Callable[[nn.Module], None]] = {
    "digits_binary": _binary,
    "digits_ternary": _ternary,
    "digits_ttq": _ttq,
    "digits_fp8": _fp8("fp8_e4m3"),
    "digits_fp8_e5m2": _fp8("fp8_e5m2"),
    "digits_pact": _pact,
    "digits_lsqplus": _lsqplus,
    "digits_bnfold": _bnfold,
    "digits_anneal": _anneal,
    "digits_mixed": _mixed,
    "digits_distill": _distill,
}
PTQ_RECIPES = ["digits_ptq_w8a8", "digits_ptq_w4a4"]
PYTEXT_RECIPES = ["pytext_bitnet", "pytext_ternary", "pytext_fp8", "pytext_distill", "pytext_ptq_w4g32a8dyn"]


def _build(cfg) -> nn.Module:
    """The recipe's model, prepared, calibrated and trained for one step, without a Trainer (fast)."""
    torch.manual_seed(0)
    model = prepare(instantiate(cfg.model), quant_config(cfg))
    batches = [(torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))) for _ in range(2)]
    calibrate(model, batches)
    schedule = instantiate(cfg.schedule)
    schedule.apply(model, step=0)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    F.cross_entropy(model(batches[0][0]), batches[0][1]).backward()
    opt.step()
    return model


@pytest.mark.parametrize("recipe", list(QAT_RECIPES))
def test_qat_recipe_builds_its_method_and_round_trips(make_cfg, recipe: str) -> None:
    cfg = make_cfg(f"recipe={recipe}")
    model = _build(cfg)
    QAT_RECIPES[recipe](model)
    fresh = prepare(instantiate(cfg.model), quant_config(cfg))
    fresh.load_state_dict(model.state_dict())
    x = torch.rand(4, 1, 8, 8)
    y = model.eval()(x)
    assert torch.isfinite(y).all() and torch.equal(fresh.eval()(x), y)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(QAT_RECIPES))
def test_qat_recipe_runs_end_to_end_and_reloads(make_cfg, recipe: str) -> None:
    cfg = make_cfg(f"recipe={recipe}", *FAST)
    metrics = run(cfg)
    assert metrics["mode"] == "qat" and math.isfinite(metrics["quantized"]["acc"])
    restored = load_run(cfg.paths.output_dir)
    QAT_RECIPES[recipe](restored.model)
    assert torch.isfinite(restored.model(torch.rand(2, 1, 8, 8))).all()


@pytest.mark.parametrize("recipe", PTQ_RECIPES)
def test_ptq_recipe_calibrates_without_training(make_cfg, recipe: str) -> None:
    cfg = make_cfg(f"recipe={recipe}", *FAST)
    metrics = run(cfg)
    assert metrics["mode"] == "ptq" and math.isfinite(metrics["quantized"]["acc"])
    assert not (Path(cfg.paths.output_dir) / "checkpoints" / "qat").exists()


def _leaves(node: Any, path: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        return {k: v for key, child in node.items() for k, v in _leaves(child, f"{path}.{key}").items()}
    return {path.lstrip("."): node}


@pytest.mark.parametrize("recipe", [*QAT_RECIPES, *PYTEXT_RECIPES])
def test_every_method_recipe_is_a_ptq_run_with_one_override(make_cfg, recipe: str) -> None:
    """``mode=ptq`` changes nothing else in the recipe, and the PTQ end state (what the job applies: the
    schedule at its last step) quantizes every layer at the recipe's final widths."""
    as_recipe = make_cfg(f"recipe={recipe}", sub="run")
    cfg = make_cfg(f"recipe={recipe}", "mode=ptq", sub="run")
    validate(cfg)
    before, after = (_leaves(OmegaConf.to_container(c, resolve=True)) for c in (as_recipe, cfg))
    assert before.keys() == after.keys()
    changed = {k: (before[k], v) for k, v in after.items() if before[k] != v}
    assert changed == ({} if before["mode"] == "ptq" else {"mode": ("qat", "ptq")})
    model = prepare(instantiate(cfg.model), quant_config(cfg))
    instantiate(cfg.schedule).apply(model, step=10**9)
    qs = [q for _, q in quantizers(model)]
    assert qs and all(q.fake_quant_on for q in qs)
    assert all(q.bits == q.target_bits for q in qs)  # annealing ends at the configured widths


@pytest.mark.parametrize("recipe", ["digits_bnfold", "digits_anneal"])
def test_qat_recipe_as_ptq_runs(make_cfg, recipe: str) -> None:
    metrics = run(make_cfg(f"recipe={recipe}", "mode=ptq", *FAST))
    assert metrics["mode"] == "ptq" and math.isfinite(metrics["quantized"]["acc"])
    if recipe == "digits_anneal":  # PTQ takes the schedule's end state: the configured 2-bit widths
        assert metrics["size_bytes"]["quantized"] < metrics["size_bytes"]["baseline"] / 8


@pytest.mark.slow
@pytest.mark.parametrize("recipe", PYTEXT_RECIPES)
def test_pytext_recipe_runs(make_cfg, recipe: str) -> None:
    metrics = run(make_cfg(f"recipe={recipe}", *FAST, "data.max_files=20"))
    assert metrics["primary_metric"] == "ppl" and math.isfinite(metrics["quantized"]["ppl"])


def test_readme_method_table_names_every_method_recipe() -> None:
    """The README's methods table is the user's index: every method recipe must appear in it."""
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("## Quantization methods") :].split("\n## ")[0]
    recipes = sorted(p.stem for p in (Path(CONFIG_DIR) / "recipe").glob("*.yaml"))
    methods = [r for r in recipes if r.startswith(("digits_", "pytext_"))]
    assert len(methods) > 20, f"method recipes not found in {CONFIG_DIR}"
    missing = [r for r in methods if f"`{r}`" not in table and f"recipe={r}`" not in table]
    assert not missing, f"recipes missing from the README methods table: {missing}"
