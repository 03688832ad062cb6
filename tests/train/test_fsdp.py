"""FSDP2 pieces on two CPU processes (gloo), in one spawn: data-parallel calibration equals one process
calibrating on every batch (bit for bit, every observer kind and SmoothQuant), a sharded twin trains with
replicated quantizer state identical on both ranks after each step, activation checkpointing does not make
observers count a batch twice, bf16 autocast leaves fake quant on the fp32 master weights, and the
trained values come back into the plain model (tied weights still tied)."""

from __future__ import annotations

import copy
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from qat.calibrate import calibrate
from qat.models.gpt import TinyGPT
from qat.quant.quantizer import FakeQuantizer
from qat.rewrite import prepare

# One observer kind per layer of each block (activations accumulate across batches), SmoothQuant on qkv.
QUANT = {
    "weight": {"format": "int8", "granularity": "per_channel", "scale": "minmax"},
    "activation": {"format": "int8", "granularity": "per_tensor", "symmetric": False, "scale": "ema"},
    "include": ["blocks.*"],
    "overrides": {
        "*.qkv": {"activation": {"scale": "minmax"}, "smooth": 0.5},
        "*.attn.proj": {"activation": {"scale": "percentile", "percentile": 99.0}},
        "*.mlp.fc": {"activation": {"scale": "mse"}},
        "blocks.1.mlp.proj": {"activation": {"scale": "lsq", "init": "minmax"}},  # learned scale, offset
    },
}
BATCHES = 5  # odd: one rank runs a stand-in step


def tiny_gpt(tie: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    model = TinyGPT(vocab_size=32, seq_len=8, d_model=16, n_layers=2, n_heads=2, tie_weights=tie)
    return prepare(model, QUANT)


def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 32, (4, 8), generator=g) for _ in range(BATCHES)]


def quant_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every buffer (observer ranges, observed scales, SmoothQuant factors, flags) and learned scale."""
    from torch.distributed.tensor import DTensor

    learned = ((k, p) for k, p in model.named_parameters() if "_quant." in k)
    full = lambda v: v.full_tensor() if isinstance(v, DTensor) else v  # noqa: E731 - sharded: all ranks call
    return {k: full(v.detach()).clone() for k, v in (*model.named_buffers(), *learned)}


def _worker(rank: int, port: int, out: dict, export_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from qat.deploy import export
    from qat.train.fsdp import broadcast_buffers, shard, unshard_into

    result: dict = {}
    model = tiny_gpt(tie=True)
    result["calibrated_batches"] = calibrate(model, batches(), BATCHES)
    result["calibrated"] = quant_state(model)

    # A sharded twin with activation checkpointing: two steps, each rank its own half of the batch.
    mesh = init_device_mesh("cpu", (2,))
    devices = {k: v.device for k, v in model.state_dict().items()}
    twin = shard(model, mesh, activation_checkpointing=True)
    result["sharded"] = sorted(type(b).__name__ for b in twin.modules() if hasattr(b, "unshard"))
    result["dtensor_params"] = all(isinstance(p, DTensor) for p in twin.parameters())
    opt = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    seen: list[torch.dtype] = []
    twin.blocks[0].mlp.fc.weight_quant.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
    twin.train()
    for step, x in enumerate(batches()[:2]):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = twin(x[2 * rank : 2 * rank + 2]).float().logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step == 0:
            result["local_after_step"] = quant_state(twin)  # before the broadcast: ranks differ
        broadcast_buffers(twin)
    result["weight_dtypes"] = sorted({str(d) for d in seen})
    result["after_steps"] = quant_state(twin)
    try:
        export(twin, f"{export_dir}/rank{rank}", verify=False)
    except ValueError as e:
        result["export_error"] = str(e)
    unshard_into(twin, model, devices)
    result["plain_is_plain"] = not any(isinstance(p, DTensor) for p in model.parameters())
    result["tied"] = model.lm_head.weight is model.tok_emb.weight
    result["full"] = {k: v.clone() for k, v in copy.deepcopy(model).state_dict().items()}
    out[rank] = result
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("exports")


@pytest.fixture(scope="module")
def ranks(exports) -> dict:
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(_free_port(), out, str(exports)), nprocs=2, join=True)
        return dict(out)


def test_calibration_on_two_ranks_equals_one_process_on_every_batch(ranks):
    single = tiny_gpt(tie=True)
    assert calibrate(single, batches(), BATCHES) == BATCHES
    expected = quant_state(single)
    kinds = {type(m.observer).__name__ for m in single.modules() if isinstance(m, FakeQuantizer)}
    assert kinds >= {"MinMaxObserver", "EMAObserver", "PercentileObserver", "MSEObserver"}
    assert any(k.endswith("smooth.scale") for k in expected)
    for rank in (0, 1):
        assert ranks[rank]["calibrated_batches"] == BATCHES
        got = ranks[rank]["calibrated"]
        assert got.keys() == expected.keys()
        for k, v in expected.items():
            assert torch.equal(got[k], v), (rank, k)


def test_sharded_twin_keeps_quantizer_state_identical_across_ranks(ranks):
    assert ranks[0]["sharded"].count("FSDPBlock") == 2 and "FSDPTinyGPT" in ranks[0]["sharded"]
    assert ranks[0]["dtensor_params"]
    local0, local1 = ranks[0]["local_after_step"], ranks[1]["local_after_step"]
    assert any(not torch.equal(local0[k], local1[k]) for k in local0)  # each rank observed its own data
    after0, after1 = ranks[0]["after_steps"], ranks[1]["after_steps"]
    for k in after0:
        assert torch.equal(after0[k], after1[k]), k


def test_fake_quant_reads_fp32_master_weights_under_bf16_autocast(ranks):
    assert ranks[0]["weight_dtypes"] == ["torch.float32"]


def test_activation_checkpointing_observes_each_batch_once(ranks):
    """The EMA of rank 0's first step equals one uncheckpointed forward of the same half batch."""
    model = tiny_gpt(tie=True)
    calibrate(model, batches(), BATCHES)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(batches()[0][0:2])
    got = ranks[0]["local_after_step"]
    for k, v in quant_state(model).items():
        if "input_quant.observer" in k:
            assert torch.equal(got[k], v), k


def test_trained_values_come_back_into_the_plain_model(ranks):
    assert ranks[0]["plain_is_plain"] and ranks[0]["tied"]
    assert "the model is sharded" in ranks[0]["export_error"]  # export wants the gathered model
    full0, full1 = ranks[0]["full"], ranks[1]["full"]
    assert full0.keys() == full1.keys()
    for k in full0:
        assert torch.equal(full0[k], full1[k]), k
    start = tiny_gpt(tie=True).state_dict()
    assert not torch.equal(full0["blocks.0.mlp.fc.weight"], start["blocks.0.mlp.fc.weight"])  # it trained
