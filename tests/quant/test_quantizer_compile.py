"""``torch.compile`` of every scale source of the registry: ``torch._dynamo.explain`` finds no graph break,
and the quantizer compiled with ``fullgraph=True`` gives the eager forward and backward (value, input
gradient, learned-parameter gradients). The default suite traces with AOTAutograd and runs the traced ops
(``aot_eager``: the whole forward + backward graph, no code generation); the slow variant generates the
inductor kernels of every source."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.quantizers import fq, randn

from qat.quant.quantizer import COMPILE_OPTIONS, SOURCES, source_key

W, A = (8, 64), None  # a weight's shape; activations are (4, 64)
TOKEN = dict(granularity="per_token", dynamic=True)  # a dynamic scale per token
GROUP = dict(granularity="per_group", group_size=32)
# One quantizer of every (format kind, scale) of the registry, plus LSQ+ (LSQ's learned offset).
CASES = {
    "int_minmax_act": ("activation", A, dict(format="uint8", symmetric=False)),
    "int_ema_act": ("activation", A, dict(format="int8", scale="ema")),
    "int_percentile_act": ("activation", A, dict(format="int8", scale="percentile")),
    "int_mse_weight": ("weight", W, dict(format="int4", scale="mse", granularity="per_channel")),
    "int_lsq_weight_group": ("weight", W, dict(format="int4", scale="lsq", **GROUP)),
    "int_lsq_plus_act": ("activation", A, dict(format="int4", scale="lsq", symmetric=False)),
    "int_pact_act": ("activation", A, dict(format="uint4", scale="pact")),
    "int_dynamic_token": ("activation", A, dict(format="int8", symmetric=False, **TOKEN)),
    "fp8_minmax_weight": ("weight", W, dict(format="fp8_e4m3", granularity="per_channel")),
    "fp8_ema_act": ("activation", A, dict(format="fp8_e4m3", scale="ema")),
    "fp8_lsq_weight": ("weight", W, dict(format="fp8_e4m3", scale="lsq")),
    "fp8_dynamic_token": ("activation", A, dict(format="fp8_e5m2", **TOKEN)),
    "binary_mean_weight": ("weight", W, dict(format="binary", granularity="per_channel")),
    "binary_lsq_weight": ("weight", W, dict(format="binary", scale="lsq")),
    "ternary_twn_weight": ("weight", W, dict(format="ternary", granularity="per_channel")),
    "ternary_absmean_weight": ("weight", W, dict(format="ternary", scale="absmean")),
    "ternary_ttq_weight": ("weight", W, dict(format="ternary", scale="ttq")),
    "gguf_q4_0_weight": ("weight", W, dict(format="int4", scale="gguf", **GROUP)),
    "gguf_tq2_0_weight": ("weight", (4, 256), dict(format="ternary", scale="gguf", granularity="per_group",
                                                   group_size=256)),
    "vllm_token": ("activation", A, dict(format="int8", scale="vllm", **TOKEN)),
    "compressed_tensors_token": ("activation", A, dict(format="int8", scale="compressed_tensors", **TOKEN)),
}  # fmt: skip
# The schemes people train with (issue 16), compiled in the default suite.
TRAINED = [
    "int_lsq_weight_group",
    "int_lsq_plus_act",
    "int_dynamic_token",
    "int_minmax_act",
    "fp8_lsq_weight",
]


def _case(name: str):
    role, shape, spec = CASES[name]
    q = fq(role, shape=shape, **spec).train()
    x = randn(0, *(shape or (4, 64))) * 2
    q(x)  # learned scales get their first value; observers a range
    return q, x


def test_every_scale_source_has_a_case() -> None:
    keys = {source_key(fq(role, shape=shape, **spec).spec) for role, shape, spec in CASES.values()}
    assert keys == set(SOURCES)


def _step(q: torch.nn.Module, fn, x: torch.Tensor) -> list[torch.Tensor]:
    xg = x.clone().requires_grad_()
    y = fn(xg)
    y.backward(randn(1, *y.shape))
    return [y.detach(), xg.grad, *(p.grad for p in q.parameters())]


def check_compiles(name: str, backend: str) -> None:
    q, x = _case(name)
    torch._dynamo.reset()
    try:
        explain = torch._dynamo.explain(copy.deepcopy(q))(x)
        assert explain.graph_break_count == 0, explain.break_reasons
        eager, compiled = copy.deepcopy(q), copy.deepcopy(q)
        expected = _step(eager, eager, x)
        options = COMPILE_OPTIONS if backend == "inductor" else None
        got = _step(compiled, torch.compile(compiled, fullgraph=True, backend=backend, options=options), x)
    finally:
        torch._dynamo.reset()
    # Float tolerance: generated kernels sum a learned scale's gradient in another order.
    close = dict(rtol=1e-4, atol=1e-5)
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, **close)
    for (k, a), b in zip(compiled.state_dict().items(), eager.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, **close, msg=k)  # the same observer / flag updates


@pytest.mark.parametrize("name", TRAINED)
def test_trained_schemes_compile_fullgraph_to_the_eager_step(name: str) -> None:
    check_compiles(name, "aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_every_source_compiles_fullgraph_with_inductor(name: str) -> None:
    check_compiles(name, "inductor")
