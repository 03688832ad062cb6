"""Rank consistency check (DDP and FSDP): every rank must end training with bit-identical weights and
quantizer state.

Learned scales are initialised from data and observers see per-rank batches, so a bug anywhere (a buffer
that DDP does not broadcast, a rank-local init) makes ranks drift apart silently. This callback hashes the
full state dict on each rank at the end of training, compares the digests on rank 0, writes them to
``<run>/ddp_consistency.json`` and raises if any tensor differs. Under FSDP a sharded parameter is hashed
whole (gathered from its shards: one copy, so the check is about its shape and placement) and every
replicated buffer (observer statistics, observed scales, flags) is hashed as each rank holds it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import lightning as L
import torch


def state_digests(module: torch.nn.Module) -> dict[str, str]:
    """sha256 of every tensor's bytes in the state dict (a sharded tensor gathered: every rank calls this)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for k, v in module.state_dict().items():
        if isinstance(v, DTensor):
            v = v.full_tensor()
        if isinstance(v, torch.Tensor):
            out[k] = hashlib.sha256(v.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
    return out


class DDPConsistencyError(RuntimeError):
    """Ranks ended with different weights or quantizer state."""


class DDPConsistencyCheck(L.Callback):
    def __init__(self, out_file: str | Path) -> None:
        self.out_file = Path(out_file)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size < 2:
            return
        digests = state_digests(pl_module)
        gathered: list[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(gathered, digests)
        if not trainer.is_global_zero:
            return
        mismatched = sorted(k for k in gathered[0] if any(g.get(k) != gathered[0][k] for g in gathered[1:]))
        from qat.io import write_json_atomic

        write_json_atomic(
            self.out_file,
            {"world_size": trainer.world_size, "tensors": len(digests), "mismatched": mismatched,
             "digests": {str(r): g for r, g in enumerate(gathered)}},
        )  # fmt: skip
        if mismatched:
            raise DDPConsistencyError(
                f"ranks disagree on {len(mismatched)} tensors after training, e.g. {mismatched[:5]}"
            )
