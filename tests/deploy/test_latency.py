"""``qat-eval``'s latency figures (``qat.deploy.evaluate``) against models whose forward sleeps a known time.

The bounds are loose on purpose, so that a busy machine cannot make them flaky: a figure must be at least
the sleep (a clock that misses the forward pass, or seconds reported as milliseconds, fail that) and under
three times it.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from qat.deploy.evaluate import evaluate_rows, format_table, latency_ms

SLEEP_MS = 20.0  # per sample of the batch


class Sleepy(nn.Module):
    """Sleeps ``SLEEP_MS`` per sample, then predicts class 0; counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        time.sleep(SLEEP_MS * x.shape[0] / 1e3)
        return torch.zeros(x.shape[0], 3)


def test_latency_is_the_forward_time_in_ms_per_batch_size() -> None:
    model = Sleepy()
    batches = [(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))]
    models = {"sleepy": (model, 123, None)}
    (row,) = evaluate_rows(models, batches, "classification", batch_sizes=(1, 3), warmup=1, repeats=5)
    assert row.name == "sleepy" and row.metric == 1.0 and row.size_bytes == 123
    for bs in (1, 3):
        assert SLEEP_MS * bs <= row.latency_ms[bs] < 3 * SLEEP_MS * bs, (bs, row.latency_ms)
    assert model.calls == 1 + 2 * (1 + 5)  # the metric pass, then warm-up + timed calls per batch size
    assert row.to_dict()["latency_ms"] == {"1": row.latency_ms[1], "3": row.latency_ms[3]}
    table = format_table([row], "classification")
    assert "ms@bs1" in table and f"{row.latency_ms[3]:10.3f}" in table


def test_latency_is_the_median_so_one_slow_call_does_not_move_it() -> None:
    delays = iter([0.0, 0.3, 0.02, 0.02, 0.02, 0.02])  # one warm-up call, then five timed ones

    def predict(x: torch.Tensor) -> torch.Tensor:
        time.sleep(next(delays))
        return x

    assert 20.0 <= latency_ms(predict, torch.zeros(1), warmup=1, repeats=5) < 60.0
