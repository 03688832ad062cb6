"""Interrupted runs continue exactly where they stopped.

Three pieces make a resumed run equal an uninterrupted one:

* :func:`phase_checkpoints`: ``<run>/checkpoints/<phase>/last.ckpt`` is rewritten (atomically, by Lightning)
  at the end of every epoch and, optionally, every N optimizer steps, so a kill loses little work;
* :class:`ExactResume` puts the random-number generators and the position in the epoch into the
  checkpoint, and makes the training data order a pure function of ``(seed, epoch)``: Lightning restores
  the model, optimizer, LR schedule, loop counters and callbacks, but by itself it replays a stopped epoch
  from its first batch (its data loaders are not resumable) and a fresh ``RandomSampler`` generator
  repeats epoch 0's order;
* :func:`resume_checkpoint` finds the checkpoint a job continues from (``resume=true``: the newest of its
  run directory, :func:`qat.runs.latest_checkpoint`).

A checkpoint is a file, or under ``trainer=fsdp`` a directory of shards (one file per rank, restored by
the strategy on the same or another number of ranks); :func:`read_checkpoint` reads either in one process.

The QAT schedule needs nothing here: its flags live in quantizer buffers (saved with the model) and are a
function of ``global_step`` (restored by Lightning), so a frozen observer stays frozen after a resume.
"""

from __future__ import annotations

import logging
import random
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler

from qat.runs import CHECKPOINT_NAME, latest_checkpoint
from qat.train.checks import JobConfigError

log = logging.getLogger(__name__)
# ExactResume makes mid-epoch resumes exact and resumed runs rewrite their own checkpoint directory, so
# Lightning's generic warnings about both do not apply to runs built by the job.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")


def resume_checkpoint(cfg: DictConfig) -> str | None:
    """The checkpoint a run continues from: ``ckpt_path``, or with ``resume=true`` the newest one in
    ``paths.output_dir`` (None: nothing to resume, the run starts from scratch, so one command serves both
    the first start and every restart of a pre-empted job)."""
    if cfg.ckpt_path:
        if not Path(cfg.ckpt_path).exists():
            raise JobConfigError(
                f"ckpt_path: {str(cfg.ckpt_path)!r} does not exist; allowed: a checkpoint file "
                "<run>/checkpoints/{float,qat}/last.ckpt, or null (use resume=true to pick the newest)"
            )
        return str(cfg.ckpt_path)
    if not cfg.get("resume", False):
        return None
    found = latest_checkpoint(cfg.paths.output_dir)
    if found is None:
        log.warning(
            "resume=true: no checkpoint under %s/checkpoints, starting from scratch "
            "(to continue a run, pass hydra.run.dir=<that run's directory>)",
            cfg.paths.output_dir,
        )
        return None
    log.info("resume=true: continuing from %s", found)
    return str(found)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint as one dict on the CPU (``state_dict``, ``optimizer_states``, callbacks, ...),
    from a file or from a sharded directory (its shards gathered into full tensors)."""
    path = Path(path)
    if not path.is_dir():
        return torch.load(path, map_location="cpu", weights_only=True)
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    ckpt = _load_distributed_checkpoint(path)
    n = sum(k.startswith("optimizer_") for k in ckpt)
    ckpt["optimizer_states"] = [ckpt.pop(f"optimizer_{i}") for i in range(n)]
    return ckpt


def model_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The model's weights and quantizer state from a Lightning checkpoint (file or sharded directory):
    the ``model.`` entries of its state dict, without that prefix (what ``TaskModule.model`` loads)."""
    state = read_checkpoint(path)["state_dict"]
    return {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}


def phase_checkpoints(dirpath: Path, every_n_train_steps: int = 0) -> list[ModelCheckpoint]:
    """Checkpoint callbacks that keep ``dirpath/last.ckpt`` current: each epoch end, and every N steps.

    ``filename="last"`` with ``save_top_k=1`` and no version counter makes each save replace the single
    file (Lightning writes it through a temp file, so a kill mid-save leaves the previous one intact).
    Lightning offers only one trigger per callback, hence two callbacks when a step interval is set.
    """
    common: dict[str, Any] = {
        "dirpath": dirpath,
        "filename": CHECKPOINT_NAME,
        "save_top_k": 1,
        "enable_version_counter": False,
        "auto_insert_metric_name": False,
    }
    callbacks = [ModelCheckpoint(**common, save_on_train_epoch_end=True)]
    if every_n_train_steps > 0:
        callbacks.append(ModelCheckpoint(**common, every_n_train_steps=every_n_train_steps))
    return callbacks


class _EpochOrder(Sampler[int]):
    """The sample order of one epoch, minus the samples of batches already trained on.

    A ``RandomSampler`` (no replacement) is replaced by a permutation drawn from a generator seeded with
    ``(seed, epoch)``; other samplers (sequential, Lightning's ``DistributedSampler`` which it re-seeds
    per epoch) already give a fixed order per epoch and are only skipped into.
    """

    def __init__(self, base: Sampler[int], seed: int) -> None:
        self.base = base
        self.seed = seed
        self.epoch = 0
        self.skip = 0  # samples, not batches

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[int]:
        base = self.base
        if isinstance(base, RandomSampler) and not base.replacement and base._num_samples is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(len(base.data_source), generator=g).tolist()  # type: ignore[arg-type]
        else:
            order = list(base)
        skip, self.skip = self.skip, 0  # only the first pass after a resume starts mid-epoch
        return iter(order[skip:])


def _train_loaders(trainer: L.Trainer) -> list[DataLoader]:
    combined = trainer.fit_loop._combined_loader
    flat = combined.flattened if combined is not None else []
    return [dl for dl in flat if isinstance(dl, DataLoader)]


def _rng_state() -> dict[str, Any]:
    """Every generator a training step may draw from (dropout, augmentation), in weights_only-safe types."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(_as_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(x: Any) -> Any:
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


class ExactResume(L.Callback):
    """Makes a run resumed from any checkpoint (mid-epoch too) see the batches and random numbers an
    uninterrupted run would have seen.

    ``seed``: the run's seed; together with the epoch it fixes each epoch's sample order.
    State saved in every checkpoint: the RNG states, the epoch and how many of its batches are done.
    Under DDP the checkpoint holds rank 0's RNG state, which every rank restores (identical model code on
    all ranks draws identically; per-rank dropout streams would not be reproduced).
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self._epoch = 0
        self._batches_done = 0
        self._loaded: dict[str, Any] | None = None
        self._warned = False

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "batches_done": self._batches_done, "rng": _rng_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = dict(state_dict)

    # ------------------------------------------------------------------ data order
    def _install(self, trainer: L.Trainer, epoch: int, skip_batches: int) -> None:
        """Point each train loader's sampler at ``epoch``, ``skip_batches`` batches in, wrapping it the first
        time it is seen (Lightning may rebuild loaders, e.g. with ``reload_dataloaders_every_n_epochs``)."""
        for dl in _train_loaders(trainer):
            bs = dl.batch_sampler
            if not isinstance(bs, BatchSampler):
                if not self._warned:
                    log.warning("train loader with a custom batch sampler: a resume restarts its epoch")
                    self._warned = True
                continue
            if not isinstance(bs.sampler, _EpochOrder):
                bs.sampler = _EpochOrder(bs.sampler, self.seed)
            bs.sampler.epoch = epoch
            bs.sampler.skip = skip_batches * int(bs.batch_size)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch = trainer.current_epoch
        self._batches_done = 0
        loaded, self._loaded = self._loaded, None
        if loaded is not None:
            _set_rng_state(loaded["rng"])
            if int(loaded["epoch"]) == trainer.current_epoch:
                self._batches_done = int(loaded["batches_done"])
        self._install(trainer, self._epoch, self._batches_done)
        # Worker processes fetch indices as soon as an iterator exists, and Lightning made one already.
        if any(dl.num_workers > 0 for dl in _train_loaders(trainer)) and trainer.fit_loop._data_fetcher:
            iter(trainer.fit_loop._data_fetcher)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch = trainer.current_epoch
        self._batches_done = 0
        self._install(trainer, self._epoch, 0)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._batches_done += 1
