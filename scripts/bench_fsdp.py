"""Memory per rank of sharded QAT (FSDP2, :mod:`qat.train.fsdp`) against one process, for a GPT-style model.

Each configuration runs in fresh processes (gloo on CPU; more ranks than cores is fine, only slower): the
model is built, prepared (w8a8: LSQ weight scales, EMA activation ranges), calibrated on one batch, sharded
(not for the single process), then trained for a few AdamW steps. Per rank it reports the tensor bytes it
holds (parameters, gradients, optimizer state: what sharding divides) and the process's resident memory
after the steps and at its peak (the peak includes building the full model before sharding it).

    MALLOC_MMAP_THRESHOLD_=131072 OMP_NUM_THREADS=1 python scripts/bench_fsdp.py --ranks 2 4

(the fixed mmap threshold makes glibc return freed tensors to the system, so that resident memory follows
the live tensors)
"""

from __future__ import annotations

import argparse
import os
import resource
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

MB = 2**20


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


def local_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors if t is not None)


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, out: dict) -> None:
    torch.set_num_threads(1)
    from qat.calibrate import calibrate
    from qat.models.gpt import TinyGPT
    from qat.rewrite import prepare

    start = rss_mb()
    torch.manual_seed(0)
    model = TinyGPT(vocab_size=256, seq_len=args.seq, d_model=args.d_model, n_layers=args.layers, n_heads=8)
    prepare(model, "w8a8")
    x = torch.randint(0, 256, (args.batch, args.seq))
    calibrate(model, [x], 1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        from torch.distributed.device_mesh import init_device_mesh

        from qat.train.fsdp import broadcast_buffers, shard

        model = shard(model, init_device_mesh("cpu", (world,)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    for _ in range(args.steps):
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x.flatten())
        loss.backward()
        opt.step()
        if world > 1:
            broadcast_buffers(model)
        grads = local_bytes(p.grad for p in model.parameters())
        opt.zero_grad(set_to_none=False)
    states = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    out[(world, rank)] = {
        "params": local_bytes(model.parameters()) / MB,
        "grads": grads / MB,
        "optim": local_bytes(states) / MB,
        "rss": rss_mb() - start,
        "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - start,
    }
    if world > 1:
        dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[2], help="FSDP world sizes to compare with 1")
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    with mp.Manager() as manager:
        out = manager.dict()
        for world in [1, *args.ranks]:
            mp.spawn(_rank, args=(world, _port(), args, out), nprocs=world, join=True)
        results = dict(out)
    print(
        f"TinyGPT d_model={args.d_model} layers={args.layers}, w8a8 QAT, AdamW, {args.steps} steps, MiB/rank"
    )
    print("| ranks | params | grads | optimizer | sum | vs 1 process | RSS after steps | peak RSS |")
    print("|---|---|---|---|---|---|---|---|")
    one = results[(1, 0)]
    base = one["params"] + one["grads"] + one["optim"]
    for (world, rank), r in sorted(results.items()):
        total = r["params"] + r["grads"] + r["optim"]
        print(
            f"| {world} (rank {rank}) | {r['params']:.1f} | {r['grads']:.1f} | {r['optim']:.1f} | "
            f"{total:.1f} | {total / base:.2f} | {r['rss']:.0f} | {r['peak']:.0f} |"
        )


if __name__ == "__main__":
    main()
