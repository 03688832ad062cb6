"""QAT training overhead (issue 16): one training step of float vs ours vs torchao, eager and compiled.

Workloads (every variant is built in one process from the same float weights):

* ``gpt``: TinyGPT, d=256, 4 layers, 4 heads, 128 tokens, batch 16, 256-token vocabulary. Every
  ``nn.Linear`` is quantized (the embeddings stay float, as torchao's QAT leaves them): ours ``quant=
  w4g32a8dyn`` (int4 weights in groups of 32 with learned LSQ scales, int8 dynamic per-token asymmetric
  inputs); torchao ``QATConfig`` with ``IntxFakeQuantizeConfig(int4, group_size=32)`` weights (scales from
  each step's weight: its default) and ``int8 per_token asymmetric`` activations; ``torchao-lsq`` the same
  with ``range_learning=True`` (learned scales, its LSQ).
* ``cnn``: the default digits model (``DigitsCNN``) and recipe (``quant=w4a4``: W4 per-channel LSQ, A4
  per-tensor LSQ+; conv1 and fc at 8 bits), batch 64 of 1x8x8. torchao has no QAT for convolutions: n/a.

Besides float, ours and torchao: ``ours-torch-ops``, ours with the fused CPU kernels of
:mod:`qat.quant.kernels` off (the same bits in PyTorch ops; compiled steps never use the kernels); and
``floor``, the float model whose quantized layers pass both operands through the least work a fake quant
that hands the layer a tensor does (one pass reading it for its range and one writing the value forward,
one writing the gradient backward; :class:`_FloorPass`, no rounding, nothing saved): the overhead below
which no such implementation, fused or not, can go.

A step is forward, cross-entropy, backward, AdamW step, ``zero_grad(set_to_none=True)``. Learned scales are
initialised (one calibration batch) before the optimizer is built and before compiling.

Timing: each round times the same number of steps of every variant in turn (interleaved, so a load change
on a shared machine hits all of them; about ``--round-seconds`` each); the table shows the median over
``--rounds`` rounds of the per-step time and its ratio to float in the same mode. Compiled variants use
``torch.compile(model, options=COMPILE_OPTIONS)``, as ``compile: true`` does (the optimizer stays eager,
as in Lightning).

Peak memory (``peak MiB``): the most tensor memory alive during one step, after warm-up. On CPU: the bytes
of the tensors alive before the step (parameters, buffers, optimizer state; unique storages) plus the
peak of the running sum of allocations minus frees that ``torch.profiler`` (``profile_memory=True``)
records for every call of the CPU allocator during the step, compiled code included. On CUDA:
``torch.cuda.max_memory_allocated`` over the step (after ``reset_peak_memory_stats``).

On CUDA (when present) everything runs on the GPU under bf16 autocast (weights stay float32).

Run (2 cores, on a quiet machine; say so when it was shared)::

    OMP_NUM_THREADS=2 cpujob .venv/bin/python scripts/bench_overhead.py --threads 2
    .venv/bin/python scripts/bench_overhead.py --workloads gpt --modes eager --rounds 3   # quick look
    .venv/bin/python scripts/bench_overhead.py --profile ours                             # where time goes

torchao is the optional extra ``bench`` (``pip install 'qatkit[bench]'``); without it its rows say so.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from omegaconf import OmegaConf
from torch import nn

import qat
from qat.conf import CONFIG_DIR
from qat.models.cnn import DigitsCNN
from qat.models.gpt import TinyGPT
from qat.quant import kernels
from qat.quant.quantizer import COMPILE_OPTIONS

MiB = 2**20


@dataclass
class Workload:
    """A float model builder, a batch builder and the quant config of ours."""

    build: Callable[[], nn.Module]
    batch: Callable[[torch.device], tuple[torch.Tensor, torch.Tensor]]
    quant: dict
    torchao: bool  # torchao's QAT covers the model's quantized layers


def _quant(name: str, **extra) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(f"{CONFIG_DIR}/quant/{name}.yaml"))
    cfg.pop("name")
    cfg.update(extra)
    return cfg


def _gpt_batch(device):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (16, 129), generator=g)
    return ids[:, :-1].to(device), ids[:, 1:].to(device)


def _cnn_batch(device):
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, 1, 8, 8, generator=g).to(device), torch.randint(0, 10, (64,), generator=g).to(
        device
    )


def _digits_recipe_quant() -> dict:
    recipe = OmegaConf.to_container(OmegaConf.load(f"{CONFIG_DIR}/recipe/digits_w4a4.yaml"))
    return _quant("w4a4", overrides=recipe["quant"]["overrides"])


WORKLOADS = {
    "gpt": Workload(
        lambda: TinyGPT(vocab_size=256, seq_len=128, d_model=256, n_layers=4, n_heads=4),
        _gpt_batch,
        _quant("w4g32a8dyn", exclude=["*_emb"]),
        torchao=True,
    ),
    "cnn": Workload(DigitsCNN, _cnn_batch, _digits_recipe_quant(), torchao=False),
}


# ---------------------------------------------------------------------------------------- variants
def _ours(model: nn.Module, w: Workload, batch) -> nn.Module:
    qat.prepare(model, w.quant)
    qat.calibrate(model, [batch], num_batches=1)  # learned scales get their first value
    return model


def _torchao(model: nn.Module, w: Workload, batch, range_learning: bool = False) -> nn.Module:
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig, initialize_fake_quantizers

    act = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
    weight = IntxFakeQuantizeConfig(
        torch.int4,
        group_size=32,
        is_symmetric=True,
        is_dynamic=not range_learning,
        range_learning=range_learning,
    )
    quantize_(model, QATConfig(activation_config=act, weight_config=weight, step="prepare"))
    if range_learning:
        initialize_fake_quantizers(model, (batch[0],))
    return model


class _FloorPass(torch.autograd.Function):
    """The least work any fake quant of a tensor does: forward, one pass reading it (its range) and one
    writing the value; backward, one pass writing the gradient. No rounding, nothing saved."""

    @staticmethod
    def forward(ctx, t):
        t.amax(-1)
        return t.clone()

    @staticmethod
    def backward(ctx, g):
        return g.clone()


class _FloorLinear(nn.Linear):
    def forward(self, x):
        return nn.functional.linear(_FloorPass.apply(x), _FloorPass.apply(self.weight), self.bias)


class _FloorConv2d(nn.Conv2d):
    def forward(self, x):
        return self._conv_forward(_FloorPass.apply(x), _FloorPass.apply(self.weight), self.bias)


def _floor(model: nn.Module, w: Workload, batch) -> nn.Module:
    """The float model with :class:`_FloorPass` on both operands of every layer ours quantizes (every
    Linear and Conv2d of both workloads)."""
    for m in model.modules():
        m.__class__ = {nn.Linear: _FloorLinear, nn.Conv2d: _FloorConv2d}.get(type(m), type(m))
    return model


VARIANTS: dict[str, Callable[..., nn.Module] | None] = {
    "float": None,
    "floor": _floor,
    "ours": _ours,
    "ours-torch-ops": _ours,  # the same, its fake quant in PyTorch ops (qat.quant.kernels off)
    "torchao": _torchao,
    "torchao-lsq": lambda m, w, b: _torchao(m, w, b, range_learning=True),
}


class Step:
    """One variant's model, optimizer and training step."""

    def __init__(
        self, model: nn.Module, batch, device: torch.device, compiled: bool, torch_ops: bool = False
    ) -> None:
        self.model = model.to(device).train()
        self.ops = kernels.disabled if torch_ops else contextlib.nullcontext
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.fn = torch.compile(self.model, options=COMPILE_OPTIONS) if compiled else self.model
        self.batch = batch
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if device.type == "cuda"
            else contextlib.nullcontext()
        )

    def __call__(self) -> None:
        x, y = self.batch
        with self.autocast, self.ops():
            out = self.fn(x)
            loss = nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]).float(), y.reshape(-1))
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def build(names: list[str], w: Workload, device, compiled: bool) -> dict[str, Step | str]:
    torch.manual_seed(0)
    base = w.build()
    batch = w.batch(device)
    steps: dict[str, Step | str] = {}
    for name in names:
        make = VARIANTS[name]
        if name.startswith("torchao") and not w.torchao:
            steps[name] = "n/a (no conv QAT)"
            continue
        try:
            model = copy.deepcopy(base).to(device)
            model = model if make is None else make(model, w, batch)
            steps[name] = Step(model, batch, device, compiled, torch_ops=name == "ours-torch-ops")
        except ImportError as e:
            steps[name] = f"n/a ({e.name} not installed)"
    return steps


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_rounds(
    steps: dict[str, Step | str], device, rounds: int, seconds: float, warmup: int
) -> dict[str, float]:
    """Median seconds per step of each variant; every round runs ``n`` steps of each, ``n`` steps of the
    fastest taking about ``seconds``."""
    live = {k: s for k, s in steps.items() if isinstance(s, Step)}
    first = []
    for name, s in list(live.items()):
        try:
            for _ in range(warmup):
                _sync(device)
                t = time.perf_counter()
                s()
                _sync(device)
                first.append(time.perf_counter() - t)
        except Exception as e:  # a compile failure: reported in the table, the others go on
            steps[name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:60]}"
            del live[name]
    n = max(1, round(seconds / min(first))) if first else 1
    times: dict[str, list[float]] = {k: [] for k in live}
    for _ in range(rounds):
        for name, s in live.items():
            _sync(device)
            t = time.perf_counter()
            for _ in range(n):
                s()
            _sync(device)
            times[name].append((time.perf_counter() - t) / n)
    return {k: statistics.median(v) for k, v in times.items()}


def _state_bytes(s: Step) -> int:
    """Bytes of the distinct storages of the parameters, buffers and optimizer state."""
    tensors = [*s.model.parameters(), *s.model.buffers()]
    tensors += [t for st in s.opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
    seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(seen.values())


def peak_bytes(s: Step, device) -> int:
    """Peak tensor memory of one step (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        s()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    from torch.profiler import ProfilerActivity, profile

    before = _state_bytes(s)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        s()
    # The raw allocator records (bytes > 0: allocated, < 0: freed), in time order; the FunctionEvent view
    # folds most of them into the ops (inclusive of their children) and cannot be summed.
    records = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(records, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return before + peak


def profile_step(s: Step, rows: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            s()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--round-seconds", type=float, default=1.0, help="time of one variant's steps per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps of each variant (compiles)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--profile", default=None, help="print a torch.profiler table of this variant's step")
    p.add_argument("--no-memory", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where = (
        torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    )
    print(f"# {where}; torch {torch.__version__}; median of {args.rounds} interleaved rounds")
    header = ("workload", "mode", "variant", "ms/step", "x float", "peak MiB", "x float")
    print("{:8} {:8} {:12} {:>9} {:>8} {:>9} {:>8}".format(*header))
    for wname in args.workloads:
        w = WORKLOADS[wname]
        for mode in args.modes:
            steps = build(args.variants, w, device, mode == "compiled")
            ms = time_rounds(steps, device, args.rounds, args.round_seconds, args.warmup)
            mem = {}
            if not args.no_memory:
                mem = {k: peak_bytes(s, device) for k, s in steps.items() if isinstance(s, Step)}
            for name, s in steps.items():
                if not isinstance(s, Step):
                    print(f"{wname:8} {mode:8} {name:12} {s}")
                    continue
                t, f = ms[name], ms.get("float")
                m, fm = mem.get(name), mem.get("float")
                print(
                    f"{wname:8} {mode:8} {name:12} {t * 1e3:9.2f} {t / f if f else float('nan'):8.3f} "
                    f"{m / MiB if m else float('nan'):9.1f} {m / fm if m and fm else float('nan'):8.3f}",
                    flush=True,
                )
            if args.profile and isinstance(steps.get(args.profile), Step):
                print(f"\n## profile: {wname} {mode} {args.profile}")
                profile_step(steps[args.profile], 25)


if __name__ == "__main__":
    main()
