"""The real Hydra config of ``qat-train``, composed in-process (no subprocess, no Hydra run directory)."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from qat.cli._app import hydra_argv
from qat.cli.train import CONFIG_DIR

# One layer per scale source (weights / inputs), on top of w8a8 (LSQ weights, EMA inputs, asymmetric):
# conv1 minmax / minmax, conv2 mse / percentile, conv3 lsq / pact, fc ema / lsq+ (asymmetric LSQ). The
# distributed tests (DDP, FSDP) check every source's state is identical across ranks.
ALL_SCALE_SOURCES = [
    "quant=w8a8",
    "++quant.overrides.conv1.weight.scale=minmax",
    "++quant.overrides.conv1.activation.scale=minmax",
    "+quant.overrides.conv2={weight:{scale:mse},activation:{scale:percentile,percentile:99.0}}",
    "+quant.overrides.conv3={activation:{format:uint8,scale:pact,symmetric:true}}",
    "++quant.overrides.fc.weight.scale=ema",
    "++quant.overrides.fc.activation.scale=lsq",
]


def compose_cfg(overrides: list[str], output_dir: Path) -> DictConfig:
    """The config ``qat-train <overrides>`` would run (the command line as the CLI passes it to Hydra),
    with paths.output_dir pointing at ``output_dir``."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[*hydra_argv(overrides), f"paths.output_dir={output_dir}"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg
