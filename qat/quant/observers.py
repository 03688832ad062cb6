"""Range observers: running min/max statistics kept in buffers (saved in checkpoints, broadcast by DDP).

An observer sees a 2-D ``rows`` view of a tensor (one row per scale, see ``Granularity.rows``) and keeps
``min_val`` / ``max_val`` per row. Non-finite values are ignored (treated as 0) so one inf/NaN batch
cannot poison the range. No host syncs: the "first observation" test is a ``torch.where`` on a buffer.

Data-parallel calibration (:func:`qat.calibrate.calibrate` on several ranks) sets a :class:`RankFold` on
each observer: every accumulating observer then folds all ranks' batch ranges of a step in global batch
order, so the result equals one process seeing every batch, exactly, for all four observers (min/max is
order-free; EMA, percentile and MSE fold their per-batch ranges in the single process's order).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from qat.quant import kernels


def finite(rows: torch.Tensor) -> torch.Tensor:
    """Replace inf/NaN by 0 so they neither widen nor poison a range."""
    if torch.compiler.is_compiling():  # inductor vectorizes isfinite, not nan_to_num (an isnan per value)
        return torch.where(torch.isfinite(rows), rows, 0.0)
    return torch.nan_to_num(rows, nan=0.0, posinf=0.0, neginf=0.0)  # one pass, no mask tensor


def finite_range(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (min, max) of the 2-D ``rows``, inf/NaN counted as 0 (:func:`finite`); in one pass of
    :func:`qat.quant.kernels.finite_range` where it applies."""
    fused = kernels.finite_range(rows)
    if fused is not None:
        return fused
    rows = finite(rows)
    return rows.amin(dim=1), rows.amax(dim=1)


Range = tuple[torch.Tensor, torch.Tensor]


class RankFold:
    """One data-parallel calibration: rank ``r`` of ``world`` runs global batches ``r, r + world, ...``;
    at each step every observer gathers all ranks' batch ranges (``valid``: this rank has a real batch this
    step, not a stand-in that keeps the collectives aligned) and folds them in global order. The forward
    pass of rank ``r`` uses the range up to its own batch, as one process would have; :meth:`finish` then
    gives every rank the range after all batches."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world
        self.valid = True
        self.state: dict[Observer, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def current(cls) -> RankFold | None:
        """One for this process's rank when torch.distributed runs with more than one rank, else None."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return cls(dist.get_rank(), dist.get_world_size())
        return None

    def fold(self, obs: Observer, new: Range) -> Range:
        n = new[0].numel()
        flag = torch.full((1,), float(self.valid), device=new[0].device)
        mine = torch.cat([new[0].reshape(-1), new[1].reshape(-1), flag])
        every = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(every, mine)
        lo, hi, first = self.state.get(obs) or (obs.min_val, obs.max_val, obs.initialized == 0)
        own = lo, hi
        for r, g in enumerate(every):
            ok = g[-1] > 0
            f_lo, f_hi = obs.fold((lo, hi), (g[:n].view_as(lo), g[n : 2 * n].view_as(lo)), first)
            lo, hi, first = torch.where(ok, f_lo, lo), torch.where(ok, f_hi, hi), first & ~ok
            if r == self.rank:
                own = lo, hi
        self.state[obs] = lo, hi, first
        return own

    @torch.no_grad()
    def finish(self) -> list[Observer]:
        """Every observer this calibration folded gets the range after all batches; returns them."""
        for obs, (lo, hi, first) in self.state.items():
            obs.min_val.copy_(lo)
            obs.max_val.copy_(hi)
            obs.initialized.copy_((~first).to(obs.initialized.dtype))
        return list(self.state)


class Observer(nn.Module):
    """Base: ``update(rows)`` folds one batch into ``min_val`` / ``max_val`` of shape ``stat_shape``.

    ``accumulate``: combine with earlier batches (activations). Weights pass ``False``: their range is the
    current weight's range, recomputed while the observer is enabled.
    """

    ranks: RankFold | None = None  # set during a data-parallel calibration

    def __init__(self, stat_shape: tuple[int, ...], accumulate: bool = True) -> None:
        super().__init__()
        self.stat_shape = tuple(stat_shape)
        self.accumulate = accumulate
        self.register_buffer("min_val", torch.zeros(self.stat_shape))
        self.register_buffer("max_val", torch.zeros(self.stat_shape))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.uint8))

    def batch_range(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This batch's per-row (min, max); subclasses change how the range is estimated."""
        return finite_range(rows)

    def combine(
        self, old: tuple[torch.Tensor, torch.Tensor], new: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.minimum(old[0], new[0]), torch.maximum(old[1], new[1])

    def fold(self, old: Range, new: Range, first: torch.Tensor) -> Range:
        """The range after one more batch: ``new`` itself on the first one, else :meth:`combine`."""
        c_lo, c_hi = self.combine(old, new)
        return torch.where(first, new[0], c_lo), torch.where(first, new[1], c_hi)

    @torch.no_grad()
    def update(self, rows: torch.Tensor) -> None:
        lo, hi = self.batch_range(rows.detach().float())
        new = lo.reshape(self.stat_shape), hi.reshape(self.stat_shape)
        if self.ranks is not None and self.accumulate:  # a weight's range is the same on every rank
            new = self.ranks.fold(self, new)
        elif self.accumulate:
            new = self.fold((self.min_val, self.max_val), new, self.initialized == 0)
        self.min_val.copy_(new[0])
        self.max_val.copy_(new[1])
        self.initialized.fill_(1)

    def extra_repr(self) -> str:
        return f"stat_shape={self.stat_shape}, accumulate={self.accumulate}"


class MinMaxObserver(Observer):
    """Running minimum and maximum over every batch seen."""


class EMAObserver(Observer):
    """Exponential moving average of per-batch min/max: robust to the odd outlier batch."""

    def __init__(self, stat_shape: tuple[int, ...], accumulate: bool = True, decay: float = 0.9) -> None:
        super().__init__(stat_shape, accumulate)
        self.decay = float(decay)

    def combine(self, old, new):  # type: ignore[override]
        d = self.decay
        return d * old[0] + (1 - d) * new[0], d * old[1] + (1 - d) * new[1]


# torch.quantile refuses inputs above 2**24 elements per call; larger rows are strided down first.
_QUANTILE_MAX = 1 << 24


class PercentileObserver(EMAObserver):
    """Range from the ``p``-th and ``(100-p)``-th percentiles per row, averaged over batches (EMA)."""

    def __init__(
        self,
        stat_shape: tuple[int, ...],
        accumulate: bool = True,
        decay: float = 0.9,
        percentile: float = 99.99,
    ) -> None:
        super().__init__(stat_shape, accumulate, decay)
        self.percentile = float(percentile)

    def batch_range(self, rows):  # type: ignore[override]
        rows = finite(rows)
        stride = max(1, rows.numel() // _QUANTILE_MAX + (rows.numel() % _QUANTILE_MAX > 0))
        sample = rows[:, ::stride]
        q = torch.tensor([1 - self.percentile / 100, self.percentile / 100], device=rows.device)
        lo, hi = torch.quantile(sample, q, dim=1)
        return lo, hi


class MSEObserver(EMAObserver):
    """Clipping range that minimises the quantization MSE of each row (grid search over shrink factors).

    Needs the integer grid, so the quantizer passes ``qmin``/``qmax`` and symmetry.
    """

    def __init__(
        self,
        stat_shape: tuple[int, ...],
        qmin: int,
        qmax: int,
        symmetric: bool,
        accumulate: bool = True,
        decay: float = 0.9,
        num_candidates: int = 40,
    ) -> None:
        super().__init__(stat_shape, accumulate, decay)
        self.qmin, self.qmax, self.symmetric = qmin, qmax, symmetric
        self.num_candidates = num_candidates

    def batch_range(self, rows):  # type: ignore[override]
        from qat.quant.qparams import qparams_from_range  # local: qparams imports nothing from here

        rows = finite(rows)
        lo, hi = rows.amin(dim=1), rows.amax(dim=1)
        alphas = torch.linspace(0.2, 1.0, self.num_candidates, device=rows.device)
        c_lo, c_hi = alphas[:, None] * lo[None, :], alphas[:, None] * hi[None, :]  # (K, R)
        s, z = qparams_from_range(c_lo, c_hi, self.qmin, self.qmax, self.symmetric)
        s, z = s[..., None], z[..., None]
        q = torch.clamp(torch.round(rows[None] / s) + z, self.qmin, self.qmax)
        err = ((q - z) * s - rows[None]).pow(2).mean(dim=2)  # (K, R)
        best = err.argmin(dim=0)
        idx = torch.arange(rows.shape[0], device=rows.device)
        return c_lo[best, idx], c_hi[best, idx]


def make_observer(
    kind: str,
    stat_shape: tuple[int, ...],
    *,
    accumulate: bool,
    qmin: int,
    qmax: int,
    symmetric: bool,
    ema_decay: float,
    percentile: float,
) -> Observer:
    """Build the observer for a ``QuantSpec.scale`` value (the mapping is data, not an if-chain)."""
    builders = {
        "minmax": lambda: MinMaxObserver(stat_shape, accumulate),
        "ema": lambda: EMAObserver(stat_shape, accumulate, ema_decay),
        "percentile": lambda: PercentileObserver(stat_shape, accumulate, ema_decay, percentile),
        "mse": lambda: MSEObserver(stat_shape, qmin, qmax, symmetric, accumulate, ema_decay),
    }
    if kind not in builders:
        raise ValueError(f"scale: {kind!r} has no observer; allowed: {', '.join(builders)}")
    return builders[kind]()
