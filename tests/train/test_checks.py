"""`data=hf` end to end, and the data step before training (qat.train.checks): model sizes from the data,
and one-line errors for files, splits, columns, text length and a model that does not fit the data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra.utils import instantiate
from lightning import seed_everything

from qat.runs import load_run
from qat.train.checks import validate_data
from qat.train.job import JobConfigError, run

FAST = ("debug=fast", "export.enabled=false", "logger=none")


@pytest.fixture
def table(tmp_path: Path) -> Path:
    """60 rows, three numeric columns, three classes that depend on them; no validation or test file."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 3))
    frame = pd.DataFrame(x, columns=["a", "b", "c"]).assign(label=np.digitize(x[:, 0], [-0.4, 0.4]))
    frame.to_csv(tmp_path / "table.csv", index=False)
    return tmp_path / "table.csv"


@pytest.fixture
def text(tmp_path: Path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text("\n".join(f"line {i} of a small text file" for i in range(200)))
    return path


def _hf(tmp_path: Path, files: Path) -> tuple[str, ...]:
    """data=hf on ``files``, with datasets' cache inside the test's directory."""
    return ("data=hf", f"data.data_files={files}", f"data.load_kwargs={{cache_dir:'{tmp_path / 'cache'}'}}")


def _fails_before_training(cfg, needle: str) -> str:
    """Run ``cfg``: it must raise a one-line JobConfigError containing ``needle`` before any training."""
    with pytest.raises(JobConfigError) as info:
        run(cfg)
    message = str(info.value)
    assert needle in message and "\n" not in message
    out = Path(cfg.paths.output_dir)
    assert not (out / "checkpoints").exists() and not (out / "baseline.json").exists()
    return message


@pytest.mark.parametrize("recipe", ["generic_w8a8", "generic_w4a8"])
def test_generic_recipe_trains_an_mlp_sized_by_a_csv(make_cfg, tmp_path, table, recipe):
    """Finding: a CSV needed ~recipe, ~model, +model._target_, +in_features, +num_classes and a test file."""
    cfg = make_cfg(f"recipe={recipe}", "model=mlp", *_hf(tmp_path, table), *FAST)
    metrics = run(cfg)
    assert "acc" in metrics["quantized"]
    assert metrics["size_bytes"]["quantized"] < metrics["size_bytes"]["baseline"]
    assert metrics["config"]["model"]["in_features"] == 3 and metrics["config"]["model"]["num_classes"] == 3
    # config.yaml holds the sizes taken from the data, so the run directory rebuilds the same model.
    restored = load_run(cfg.paths.output_dir)
    assert restored.model.fc1.in_features == 3 and restored.model.head.out_features == 3


@pytest.mark.parametrize("overrides", [("recipe=generic_w4a8",), ("recipe=generic_w8a8", "model=mlp")])
def test_generic_recipe_on_built_in_data(make_cfg, overrides):
    metrics = run(make_cfg(*overrides, *FAST))  # digits; the MLP takes 1x8x8 = 64 inputs
    assert "acc" in metrics["quantized"] and metrics["quant"] == overrides[0][-4:]


def test_text_classification_with_the_packaged_tokenizer_end_to_end(make_cfg, tmp_path):
    words = {"pos": ["good", "great", "fine", "nice"], "neg": ["bad", "awful", "poor", "sad"]}
    rows = [(f"a {words[y][i % 4]} day, number {i}", y) for i, y in enumerate(["pos", "neg"] * 40)]
    pd.DataFrame(rows, columns=["text", "label"]).to_csv(tmp_path / "text.csv", index=False)
    cfg = make_cfg(
        "recipe=generic_w4a8",
        "model=text_classifier",
        *_hf(tmp_path, tmp_path / "text.csv"),
        "data.tokenizer=minilm",
        "data.seq_len=12",
        "model.d_model=16",
        "model.hidden=16",
        "debug=fast",
        "logger=none",
    )
    metrics = run(cfg)
    assert (
        metrics["config"]["model"]["vocab_size"] == 30522 and metrics["config"]["model"]["num_classes"] == 2
    )
    assert metrics["export"]["verification"]["top1_agreement"] == 1.0  # exported and reloaded


def test_image_model_on_a_table_fails_before_training(make_cfg, tmp_path, table):
    """Finding: the default recipe's CNN failed deep inside conv2d."""
    message = _fails_before_training(make_cfg(*_hf(tmp_path, table), *FAST), "")
    assert message == (
        "model DigitsCNN cannot take the data's input (feature vectors, float32 [48, 3]): Expected 3D "
        "(unbatched) or 4D (batched) input to conv2d, but got input of size: [48, 3]; use model=mlp and a "
        "recipe that names no layers, e.g. recipe=generic_w4a8"
    )


def test_lm_on_text_with_the_default_model_fails_before_training(make_cfg, tmp_path, text):
    """Finding: 'Input type (long int) and bias type (float) should be the same', from inside conv2d."""
    cfg = make_cfg("task=lm", "data.path=text", "data.seq_len=32", *_hf(tmp_path, text), *FAST)
    message = _fails_before_training(cfg, "model DigitsCNN cannot take the data's input (token ids, int64 [")
    assert message.endswith(
        "; use model=tiny_gpt and a recipe that names no layers, e.g. recipe=generic_w4a8"
    )


def test_a_missing_named_split_fails_before_training(make_cfg, tmp_path, table):
    """Finding: `no 'test' split` came after the float baseline had trained."""
    cfg = make_cfg("recipe=generic_w8a8", "model=mlp", *_hf(tmp_path, table), "data.test_split=test", *FAST)
    _fails_before_training(cfg, "data.test_split: 'test' is not a split of the data; available: train")


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["data.data_files=nope.csv"], "data.data_files: Unable to find '"),
        (
            ["data.label_column=kind"],
            "data.label_column: column 'kind' not found in split 'train'; available",
        ),
        (["data.input_columns=[a,z]"], "data.input_columns: column 'z' not found in split 'train'"),
        (["model.num_classes=5"], "model MLP gives 5 classes, the data has 3: set model.num_classes=null"),
        (["model=text_classifier"], "model.vocab_size: null (taken from the data), but data "),
    ],
)
def test_data_errors_are_one_line_before_training(make_cfg, tmp_path, table, overrides, needle):
    """Findings: MissingMandatoryValue, a 39-line FileNotFoundError, errors after training."""
    cfg = make_cfg("recipe=generic_w8a8", "model=mlp", *_hf(tmp_path, table), *overrides, *FAST)
    _fails_before_training(cfg, needle)


def test_missing_data_files_fails_in_one_line(make_cfg):
    """Finding: MissingMandatoryValue, from Hydra's instantiate."""
    cfg = make_cfg("recipe=generic_w8a8", "model=mlp", "data=hf", *FAST)
    _fails_before_training(cfg, "data.data_files: not set; add it to the command line, e.g. data.data_files=")


def test_text_shorter_than_one_window_fails_before_training(make_cfg, tmp_path):
    """Finding: a 39-line traceback for a text file shorter than one window."""
    (tmp_path / "short.txt").write_text("a short file\n" * 5)
    cfg = make_cfg("recipe=generic_w8a8", "task=lm", "model=tiny_gpt", "data.path=text", *FAST,
                   *_hf(tmp_path, tmp_path / "short.txt"))  # fmt: skip
    _fails_before_training(
        cfg, "data.seq_len: 128 needs at least 129 bytes of text per split, split 'train' has"
    )


def test_the_data_step_leaves_the_random_stream_of_the_run_as_it_was(make_cfg):
    """Loading the data and running a batch before the model is built must not change its initial weights."""
    cfg = make_cfg(*FAST)
    seed_everything(0)
    expected = instantiate(cfg.model).state_dict()
    seed_everything(0)
    _, model = validate_data(cfg)
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    assert model.training  # the check ran the batch in eval mode and restored the mode
