"""Calibration: run a few batches through a prepared model with observers on and nothing else changing.

The model stays in eval mode (BatchNorm statistics and dropout untouched) while the quantizers are put in
training mode, which is what lets activation observers record ranges and learned scales initialise.
Used before QAT (so learned scales start from data, before the optimizer and DDP see them) and as PTQ.

Layers with SmoothQuant factors that are not fitted yet (``quant.smooth``) get them first, from a float
pass over the same batches (every quantizer off), so the observers then see the smoothed activations.

On several ranks (torch.distributed initialised, every rank passing the same batches) the batches are
split: rank ``r`` of ``W`` runs batches ``r, r + W, ...`` and the statistics are reduced, so the result on
every rank equals one process calibrating on all of them: observers exactly (:class:`RankFold`), SmoothQuant
factors exactly (a max over ranks), learned scales exactly (they initialise from the first batch, which
rank 0 runs, and take rank 0's value: :func:`qat.quant.sources.from_rank_zero`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from itertools import islice
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from qat.quant.observers import Observer, RankFold
from qat.quant.quantizer import FakeQuantizer
from qat.quant.smooth import Smoother
from qat.quant.sources import Observed


def batch_inputs(batch: Any) -> Any:
    """A batch's model inputs: the first element of an ``(inputs, targets)`` pair, else the batch itself."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def example_inputs(dm: Any) -> Any:
    """The inputs of a datamodule's first calibration batch (``quant.fold_bn`` pairs convs with BatchNorms
    on them), drawn without moving the run's random stream."""
    dm.setup("fit")
    with torch.random.fork_rng(devices=[]):  # a loader draws a seed
        return batch_inputs(next(iter(dm.calibration_dataloader())))


def _default_forward(model: nn.Module, batch: Any) -> Any:
    return model(batch_inputs(batch))


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int | None = None,
    forward: Callable[[nn.Module, Any], Any] = _default_forward,
    across_ranks: bool = True,
) -> int:
    """Feed up to ``num_batches`` batches; returns how many were used (on all ranks together). Restores
    every module's mode. ``across_ranks=False``: each rank calibrates on its own batches, no reduction."""
    ranks = RankFold.current() if across_ranks else None
    pending = [m for m in model.modules() if isinstance(getattr(m, "smooth", None), Smoother)]
    pending = [m for m in pending if not bool(m.smooth.calibrated)]
    batches = islice(batches, num_batches)
    if ranks is not None:  # this rank's share, and how many steps every rank runs
        every = list(enumerate(batches))
        batches = [b for i, b in every if i % ranks.world == ranks.rank]
        steps, total = -(-len(every) // ranks.world), len(every)
    if pending:  # two passes over the batches: keep them (a few calibration batches) rather than re-iterate
        batches = list(batches)
        fit_smoothing(model, pending, batches, forward, across_ranks=ranks is not None)
    device = _device(model)
    n = 0
    with restored(model), _folding(model, ranks):  # a frozen observer stays frozen afterwards
        model.eval()
        for m in model.modules():
            if isinstance(m, FakeQuantizer):
                m.train()
                m.enable_observer(True)
        for batch in batches:
            forward(model, _to_device(batch, device))
            n += 1
        if ranks is not None and total:
            ranks.valid = False  # stand-in steps: the collectives of ranks that still have a batch
            stand_in = batches[0] if batches else every[0][1]
            for _ in range(steps - n):
                forward(model, _to_device(stand_in, device))
    return n if ranks is None else total


@contextmanager
def _folding(model: nn.Module, ranks: RankFold | None) -> Iterator[None]:
    """Observers fold across ranks inside; after, every observer holds the all-batch range and every
    observed scale is recomputed from it."""
    if ranks is None:
        yield
        return
    observers = [m for m in model.modules() if isinstance(m, Observer)]
    for o in observers:
        o.ranks = ranks
    try:
        yield
    finally:
        for o in observers:
            o.ranks = None
    folded = set(ranks.finish())
    for m in model.modules():
        if isinstance(m, FakeQuantizer) and isinstance(m.source, Observed) and m.observer in folded:
            m.source.rescale(m, m.qmin, m.qmax)  # the scale from the observer's (now final) range


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@contextmanager
def restored(model: nn.Module) -> Iterator[None]:
    """Puts every module's training mode and every quantizer's enable flags back as they were."""
    modes = {m: m.training for m in model.modules()}
    flags = {m: (m.fake_quant_on, m.observer_on) for m in modes if isinstance(m, FakeQuantizer)}
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.train(mode)
        for m, (fq_on, obs_on) in flags.items():
            m.enable_fake_quant(fq_on)
            m.enable_observer(obs_on)


@torch.no_grad()
def fit_smoothing(
    model: nn.Module,
    layers: list[nn.Module],
    batches: list[Any],
    forward: Callable[[nn.Module, Any], Any] = _default_forward,
    across_ranks: bool = False,
) -> None:
    """Fit the SmoothQuant factors of ``layers`` from the per-channel max |input| of a float forward pass
    (fake quantization and observers off everywhere, then restored). ``across_ranks``: each rank passes
    its share of the batches, and the maxima are reduced over ranks."""
    if across_ranks:
        batches_seen = torch.tensor([len(batches)])
        dist.all_reduce(batches_seen)
    if not (batches_seen.item() if across_ranks else batches):
        raise ValueError("calibrate: SmoothQuant (quant.smooth) needs at least one calibration batch")
    device = _device(model)
    absmax: dict[nn.Module, torch.Tensor] = {}

    def record(layer: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach()
        a = x.abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
        absmax[layer] = a if layer not in absmax else torch.maximum(absmax[layer], a)

    hooks = [m.register_forward_pre_hook(record) for m in layers]
    try:
        with restored(model):
            model.eval()
            for m in model.modules():
                if isinstance(m, FakeQuantizer):
                    m.enable_fake_quant(False)
                    m.enable_observer(False)
            for batch in batches:
                forward(model, _to_device(batch, device))
    finally:
        for h in hooks:
            h.remove()
    if across_ranks:
        for layer in layers:
            a = absmax.get(layer, torch.zeros(layer.smooth.scale.numel(), device=layer.smooth.scale.device))
            dist.all_reduce(a, op=dist.ReduceOp.MAX)  # |x| >= 0: a rank without batches adds zeros
            absmax[layer] = a
    for layer in layers:
        if layer not in absmax:
            raise ValueError(f"calibrate: no calibration batch reached {type(layer).__name__} {layer}")
        layer.smooth.fit(absmax[layer], layer.float_weight())


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch
