"""Sharded QAT with FSDP2: ``trainer=fsdp`` (GPUs, NCCL) and ``trainer=fsdp_cpu`` (CPU processes, gloo).

Lightning's ``FSDPStrategy`` wraps the FSDP1 API and refuses a CPU accelerator; its
``ModelParallelStrategy`` is built on FSDP2 (``fully_shard``) and runs on CPU, but expects the
LightningModule to shard itself in ``configure_model``. :class:`FSDP2Strategy` is that strategy with the
sharding done here, after ``qat.prepare``, for any model of any recipe:

* every trainer run (``fit``, ``test``, ``validate``) shards a *twin* of the model: the same module objects
  copied, sharing every tensor, then ``fully_shard`` per block (each member of an ``nn.ModuleList``, or
  the classes named in ``blocks``) and on the root; the original model's parameter storage is released.
  At teardown the full tensors are gathered once and put back into the original model, which is then a
  plain module again (the job copies it, prepares it, exports it);
* quantizer parameters (learned scales, zero points) are sharded with the weights of their layer, which
  FSDP all-gathers before each forward; quantizer buffers (observer statistics, observed scales,
  SmoothQuant factors, schedule flags) are replicated and broadcast from rank 0 after every optimizer
  step, which is DDP's rule (rank 0's buffers win), so every rank holds the same state after each step;
* learned scales must be initialised before sharding (calibration): a value written into a gathered
  parameter during the forward pass is not written back to its shards, so the strategy refuses to train
  an uninitialised learned scale;
* ``trainer.precision=bf16-mixed`` computes matmuls in bf16 under autocast while parameters stay fp32:
  fake quant reads the fp32 master weights (``bf16-true``, which casts the weights, is refused);
* ``activation_checkpointing``: each block recomputes its activations in the backward pass, with its
  observers paused during the recomputation (an EMA would otherwise count each batch twice).

Checkpoints are sharded by default (``last.ckpt`` is a directory with one file per rank, and the
non-tensor state in ``meta.pt``): :func:`qat.train.resume.read_checkpoint` reads them back in one process.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from qat.calibrate import restored
from qat.quant.quantizer import FakeQuantizer

PRECISIONS = ("32-true", "bf16-mixed")  # parameters stay fp32: fake quant reads the master weights


def blocks_of(model: nn.Module, blocks: str | list[str] = "auto") -> list[nn.Module]:
    """The modules sharded one by one: ``"auto"``: every member of an ``nn.ModuleList`` (transformer
    blocks), outermost first; or a list of class names (``[LlamaDecoderLayer]``)."""
    if blocks == "auto":
        found = [m for lst in model.modules() if isinstance(lst, nn.ModuleList) for m in lst]
    else:
        found = [m for m in model.modules() if type(m).__name__ in set(blocks)]
    inner = {id(sub) for m in found for sub in list(m.modules())[1:]}
    return [m for m in found if id(m) not in inner]


def refuse_sharded(model: nn.Module, what: str) -> None:
    """A one-line error when ``model`` still holds sharded (DTensor) parameters: ``what`` needs full
    tensors, which :func:`unshard_into` gathers once (the strategy does it when a trainer run ends)."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise ValueError(
            f"{what}: the model is sharded (FSDP2 DTensor parameters); allowed: a plain model, e.g. the one "
            "qat-train's FSDP2Strategy fills with the full tensors when training ends "
            "(qat.train.fsdp.unshard_into), on rank 0"
        )


@contextlib.contextmanager
def observers_paused(module: nn.Module) -> Iterator[None]:
    """No observer of ``module`` updates inside (an activation-checkpointing recomputation)."""
    with restored(module):
        for m in module.modules():
            if isinstance(m, FakeQuantizer):
                m.enable_observer(False)
        yield


def shard(
    model: nn.Module, mesh: Any, blocks: str | list[str] = "auto", activation_checkpointing: bool = False
) -> nn.Module:
    """A sharded twin of ``model``: the same modules (copied) over the same tensors, ``fully_shard`` per block
    and on the root. ``model`` keeps its buffers (shared with the twin); its parameters' storage is released
    (:func:`unshard_into` puts the trained values back)."""
    from torch.distributed._composable import checkpoint
    from torch.distributed.fsdp import fully_shard

    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    twin = copy.deepcopy(model, memo)  # new module objects, the same tensors
    for block in blocks_of(twin, blocks):
        if activation_checkpointing:
            checkpoint(block, context_fn=lambda b=block: (contextlib.nullcontext(), observers_paused(b)))
        fully_shard(block, mesh=mesh)
    fully_shard(twin, mesh=mesh)
    for p in model.parameters():  # the twin holds the shards now
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)
    return twin


@torch.no_grad()
def unshard_into(twin: nn.Module, model: nn.Module, devices: dict[str, torch.device]) -> None:
    """Gather the twin's full tensors once (every rank takes part) and load them into ``model``, whose
    parameters go back to the devices in ``devices`` (name -> device, recorded before :func:`shard`)."""
    from torch.distributed.tensor import DTensor

    full = {}
    for k, v in twin.state_dict().items():
        v = v.full_tensor() if isinstance(v, DTensor) else v
        full[k] = v.to(devices.get(k, v.device))
    params = dict(model.named_parameters(remove_duplicate=False))
    for k, p in params.items():  # tied parameters are one object: set once, still tied
        p.data = torch.empty_like(full[k])
    model.load_state_dict(full)  # buffers too (a ``num_bits`` registered since), quantizer flags synced


@torch.no_grad()
def broadcast_buffers(model: nn.Module, src: int = 0) -> None:
    """Every floating-point buffer (observer statistics, observed scales, SmoothQuant factors) from rank
    ``src`` to all ranks, one collective per dtype; integer flags follow the step on every rank already."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for b in model.buffers():
        if b.is_floating_point():
            by_dtype.setdefault(b.dtype, []).append(b)
    for bufs in by_dtype.values():
        flat = torch.cat([b.reshape(-1) for b in bufs])
        dist.broadcast(flat, src)
        for b, v in zip(bufs, flat.split([b.numel() for b in bufs]), strict=True):
            b.copy_(v.view_as(b))


def uninitialised_learned(model: nn.Module) -> list[str]:
    """Quantizers whose learned scale would first be set inside a sharded forward pass (and be lost)."""
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, FakeQuantizer) and m.learned and not m.is_initialized
    ]


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over every rank of every node (data parallel, no tensor parallel), sharding the job's model
    itself: see the module docstring. ``blocks``: what is sharded one by one (:func:`blocks_of`);
    ``activation_checkpointing``: recompute each block's activations in the backward pass;
    ``save_distributed_checkpoint``: sharded checkpoints (False: one full file written by rank 0)."""

    def __init__(
        self,
        blocks: str | list[str] = "auto",
        activation_checkpointing: bool = False,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
    ) -> None:
        super().__init__(
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
        )
        self.blocks = blocks if isinstance(blocks, str) else list(blocks)
        self.activation_checkpointing = bool(activation_checkpointing)
        self._plain: nn.Module | None = None
        self._devices: dict[str, torch.device] = {}
        self._failed = False

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # FSDP across every rank
        self._tensor_parallel_size = 1
        super().setup_environment()

    def setup(self, trainer: Any) -> None:
        precision = trainer.precision
        if precision not in PRECISIONS:
            raise ValueError(
                f"trainer.precision: {precision!r} is not valid with trainer=fsdp (fake quant needs fp32 "
                f"master weights); allowed: {', '.join(PRECISIONS)}"
            )
        module = self.lightning_module
        self._plain, self._failed = module.model, False
        self._devices = {k: v.device for k, v in self._plain.state_dict().items()}
        module.model = shard(
            self._plain, self.device_mesh["data_parallel"], self.blocks, self.activation_checkpointing
        )
        # ModelParallelStrategy.setup without its configure_model requirement (the model is sharded above)
        assert self.accelerator is not None
        self.accelerator.setup(trainer)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    def on_train_start(self) -> None:  # after a checkpoint was restored
        if names := uninitialised_learned(self.lightning_module.model):
            raise ValueError(
                f"calibration.batches: learned scales of {names[:3]} are not initialised, and a sharded "
                "forward pass cannot set them; allowed: >= 1 (calibrate before sharding)"
            )
        super().on_train_start()

    def optimizer_step(self, *args: Any, **kwargs: Any) -> Any:
        out = super().optimizer_step(*args, **kwargs)
        broadcast_buffers(self.lightning_module.model)
        return out

    def on_exception(self, exception: BaseException) -> None:
        self._failed = True  # a rank may be gone: no collective at teardown
        super().on_exception(exception)

    def teardown(self) -> None:
        module = self.lightning_module
        if self._plain is not None and module is not None:
            if not self._failed:
                unshard_into(module.model, self._plain, self._devices)
            module.model, self._plain = self._plain, None
        super().teardown()
