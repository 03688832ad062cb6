"""Reopen a finished (or interrupted) run directory: its resolved config, model and data.

``qat-export``, ``qat-eval`` and ``qat-report`` need nothing but the run directory: the config comes
from ``config.yaml`` (resolved, written by the job) and the weights with all quantizer state from the
newest checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from qat.rewrite import prepare
from qat.train.job import example_inputs, quant_config


class RunDirError(FileNotFoundError):
    """The directory is not a qat run (or misses the file that is needed)."""


@dataclass
class Run:
    path: Path
    cfg: DictConfig
    model: nn.Module
    datamodule: Any
    task: str
    checkpoint: Path | None


def find_checkpoint(run_dir: Path) -> Path | None:
    """The QAT checkpoint if there is one, else the float one (a float-only run)."""
    for phase in ("qat", "float"):
        p = run_dir / "checkpoints" / phase / "last.ckpt"
        if p.exists():
            return p
    return None


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None) -> Run:
    """Rebuild the run's model (prepared when the run quantized) with its trained weights loaded."""
    path = Path(run_dir)
    cfg_file = path / "config.yaml"
    if not cfg_file.exists():
        raise RunDirError(f"run_dir: {str(path)!r} has no config.yaml; pass a directory qat-train wrote")
    cfg = OmegaConf.load(cfg_file)
    assert isinstance(cfg, DictConfig)
    cfg.paths.output_dir = str(path)  # the run may have moved since
    model: nn.Module = instantiate(cfg.model)
    dm = instantiate(cfg.data)
    ckpt = Path(checkpoint) if checkpoint else find_checkpoint(path)
    qcfg = quant_config(cfg)
    if qcfg is not None and (ckpt is None or ckpt.parent.name != "float"):
        # quant.fold_bn pairs convs with BatchNorms on a batch, as the job did
        prepare(model, qcfg, example_inputs=example_inputs(dm) if qcfg.fold_bn else None)
    if ckpt is not None:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        model.load_state_dict({k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")})
    model.eval()
    return Run(path, cfg, model, dm, str(cfg.task), ckpt)
