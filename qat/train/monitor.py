"""Tracking helpers for the training job: quantizer state in the logs, the config in the checkpoint.

* :class:`QuantizerMonitor` logs what tells a QAT run is healthy, every ``every_n_steps`` optimizer steps:
  per-layer mean scale and the fraction of values that fall outside the integer grid (clipped) for
  weights and inputs, and once per fit the bit widths. Scales that run away or a clip fraction that
  climbs are the usual first signs of a diverging low-bit run.
* :class:`ConfigInCheckpoint` stores the resolved run config in every Lightning checkpoint, so a
  checkpoint copied away from its run directory still says how to rebuild its model.
* :class:`ProgressBar`: Lightning's Rich bar without the logger version (which shows as "loat" for the
  float phase) so the bar holds only the losses and the validation metric.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar
from torch import nn

from qat.quant.modules import effective_weight
from qat.quant.quantizer import FakeQuantizer
from qat.quant.ste import FP8_MAX

CONFIG_KEY = "qat_config"


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Layers carrying quantizers (``weight_quant`` / ``input_quant``), by qualified name.

    Names are those of the user's model (``conv1``, not ``model.conv1``), as in quant config globs.
    """
    inner = getattr(model, "model", None)
    model = inner if isinstance(inner, nn.Module) else model
    out = []
    for name, m in model.named_modules():
        if isinstance(getattr(m, "weight_quant", None), FakeQuantizer) or isinstance(
            getattr(m, "input_quant", None), FakeQuantizer
        ):
            out.append((name, m))
    return out


@torch.no_grad()
def scale_and_clip(fq: FakeQuantizer, x: torch.Tensor) -> tuple[float, float | None] | None:
    """(mean |scale|, fraction of ``x`` outside the representable range) as ``fq`` quantizes ``x`` now.

    None while the quantizer is inactive or its learned scale is not initialised yet. The clip fraction is
    None for binary/ternary formats (they have no range to clip against) and for dynamic scales (which
    cover each tensor's range by construction).
    """
    if not fq.fake_quant_on or (fq.learned and not fq.is_initialized):
        return None
    x = x.detach().float()
    s, z = fq.qparams(x)
    scale = float(s.abs().float().mean())
    if fq.spec.dynamic or fq.spec.kind not in ("int", "fp8"):
        return scale, None
    xv = fq.view(x)  # per-group quantizers reshape the tensor so that the scales broadcast
    if fq.spec.kind == "int":
        v = xv / s + z
        clipped = (v < fq.qmin - 0.5) | (v > fq.qmax + 0.5)
    else:
        clipped = (xv / s).abs() > FP8_MAX[fq.spec.format]
    return scale, float(clipped.float().mean())


def weight_stats(model: nn.Module) -> dict[str, float]:
    """Per-layer weight scale / clip fraction (``quant/<layer>/w_scale``, ``.../w_clip``) and their mean."""
    stats: dict[str, float] = {}
    clips = []
    for name, m in _layers(model):
        fq = getattr(m, "weight_quant", None)
        if not isinstance(fq, FakeQuantizer):
            continue
        sc = scale_and_clip(fq, effective_weight(m))
        if sc is None:
            continue
        stats[f"quant/{name}/w_scale"] = sc[0]
        if sc[1] is not None:
            stats[f"quant/{name}/w_clip"] = sc[1]
            clips.append(sc[1])
    if clips:
        stats["quant/w_clip_mean"] = sum(clips) / len(clips)
    return stats


def bit_widths(model: nn.Module) -> dict[str, float]:
    """Per-layer weight / input bits and the mean bits per weight of the quantized layers (float = 32)."""
    stats: dict[str, float] = {}
    bits_sum = count = 0.0
    for name, m in _layers(model):
        wq, iq = getattr(m, "weight_quant", None), getattr(m, "input_quant", None)
        w_bits = wq.spec.bits if isinstance(wq, FakeQuantizer) else 32.0
        stats[f"quant/{name}/w_bits"] = w_bits
        stats[f"quant/{name}/a_bits"] = iq.spec.bits if isinstance(iq, FakeQuantizer) else 32.0
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor):
            bits_sum += w_bits * w.numel()
            count += w.numel()
    if count:
        stats["quant/avg_w_bits"] = bits_sum / count
    return stats


class QuantizerMonitor(L.Callback):
    """Logs quantizer state to every configured logger at a modest interval (QAT phase; no-op in float).

    ``every_n_steps``: optimizer steps between two logs (the first and the last step are always logged).
    ``activations``: also measure the inputs' clip fraction, from forward hooks placed only for the batch
    being logged (no cost on other steps; a compiled model runs them eagerly, between its graphs).
    ``per_layer``: False keeps only the means and bit widths.
    The latest values are kept in ``self.last`` (handy in notebooks and tests).
    """

    def __init__(self, every_n_steps: int = 50, activations: bool = True, per_layer: bool = True) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(
                f"callbacks.quant_monitor.every_n_steps: {every_n_steps!r} is not valid; "
                "allowed: an integer >= 1"
            )
        self.every_n_steps = every_n_steps
        self.activations = activations
        self.per_layer = per_layer
        self.last: dict[str, float] = {}
        self._hooks: list[Any] = []
        self._act: dict[str, tuple[float, float | None]] = {}
        self._pending: int | None = None  # the step being measured by the current batch
        self._logged_step = -1
        self._total = math.inf

    def _log(self, trainer: L.Trainer, stats: dict[str, float], step: int) -> None:
        if not self.per_layer:
            stats = {k: v for k, v in stats.items() if k.count("/") == 1 or k.endswith("_bits")}
        self.last.update(stats)
        for logger in trainer.loggers:
            logger.log_metrics(stats, step=step)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._total = float(trainer.estimated_stepping_batches)
        bits = bit_widths(pl_module)
        if bits and trainer.is_global_zero:
            self._log(trainer, bits, trainer.global_step)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        due = step % self.every_n_steps == 0 or step >= self._total - 1
        if not trainer.is_global_zero or step == self._logged_step or not due or not _layers(pl_module):
            return
        self._pending = step
        if self.activations:
            for name, m in _layers(pl_module):
                iq = getattr(m, "input_quant", None)
                if isinstance(iq, FakeQuantizer):
                    self._hooks.append(iq.register_forward_pre_hook(self._make_hook(name)))

    def _make_hook(self, name: str):
        @torch.compiler.disable  # it reads the measurement on the host
        def hook(fq: FakeQuantizer, inputs: tuple[Any, ...]) -> None:
            if name not in self._act and inputs and isinstance(inputs[0], torch.Tensor):
                sc = scale_and_clip(fq, inputs[0])
                if sc is not None:
                    self._act[name] = sc

        return hook

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._remove_hooks()
        if self._pending is None:
            return
        step, self._pending = self._pending, None
        stats = weight_stats(pl_module)
        clips = []
        for name, (scale, clip) in self._act.items():
            stats[f"quant/{name}/a_scale"] = scale
            if clip is not None:
                stats[f"quant/{name}/a_clip"] = clip
                clips.append(clip)
        if clips:
            stats["quant/a_clip_mean"] = sum(clips) / len(clips)
        self._act.clear()
        if stats:
            self._logged_step = step
            self._log(trainer, stats, step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._remove_hooks()
        self._pending = None


class ConfigInCheckpoint(L.Callback):
    """Puts the resolved run config into every checkpoint as ``checkpoint["qat_config"]``."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[CONFIG_KEY] = self.config


def config_from_checkpoint(path: str | Path) -> dict[str, Any] | None:
    """The resolved config a checkpoint (a file, or a sharded directory) carries, or None for a checkpoint
    saved without it."""
    from qat.train.resume import read_checkpoint

    ckpt = read_checkpoint(path)
    cfg = ckpt.get(CONFIG_KEY)
    return cfg if isinstance(cfg, dict) else None


class ProgressBar(RichProgressBar):
    """Rich progress bar showing the losses and validation metric only (no logger version)."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items
