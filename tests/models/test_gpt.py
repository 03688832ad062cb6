import math

import torch
from torch import nn

from qat.models.gpt import TinyGPT


def _small(**kwargs) -> TinyGPT:
    torch.manual_seed(0)
    config = dict(vocab_size=256, seq_len=16, d_model=32, n_layers=2, n_heads=4)
    return TinyGPT(**{**config, **kwargs})


def test_logits_shape_and_backward() -> None:
    model = _small()
    idx = torch.randint(0, 256, (3, 16))
    logits = model(idx)
    assert logits.shape == (3, 16, 256)
    loss = nn.functional.cross_entropy(logits.reshape(-1, 256), idx.reshape(-1))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model(idx[:, :5]).shape == (3, 5, 256)


def test_causal_future_tokens_do_not_change_past_logits() -> None:
    model = _small().eval()
    idx = torch.randint(0, 256, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 256
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-5)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_module_names_and_hook_points() -> None:
    model = _small(n_layers=3)
    names = dict(model.named_modules())
    for name in ("tok_emb", "pos_emb", "ln_f", "lm_head", "blocks.0.ln1", "blocks.0.ln2"):
        assert name in names
    for i in range(3):
        for leaf in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"):
            assert isinstance(names[f"blocks.{i}.{leaf}"], nn.Linear)
        for hook in ("q_quant", "k_quant", "v_quant"):
            assert isinstance(names[f"blocks.{i}.attn.{hook}"], nn.Identity)
    assert model.lm_head.bias is None


def test_hook_points_see_q_k_v() -> None:
    model = _small()
    seen: dict[str, tuple[int, ...]] = {}

    def record(name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            seen[name] = tuple(output.shape)

        return hook

    for name in ("q_quant", "k_quant", "v_quant"):
        getattr(model.blocks[0].attn, name).register_forward_hook(record(name))
    model(torch.randint(0, 256, (2, 7)))
    assert seen == {h: (2, 4, 7, 8) for h in ("q_quant", "k_quant", "v_quant")}


def test_init_and_weight_tying() -> None:
    model = _small(d_model=64, n_layers=4)
    assert abs(model.blocks[0].mlp.fc.weight.std().item() - 0.02) < 0.003
    assert abs(model.blocks[0].mlp.proj.weight.std().item() - 0.02 / math.sqrt(8)) < 0.002
    assert torch.count_nonzero(model.blocks[0].attn.qkv.bias) == 0
    tied = _small(tie_weights=True)
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert sum(p.numel() for p in tied.parameters()) < sum(p.numel() for p in _small().parameters())


def test_too_long_sequence_raises() -> None:
    model = _small()
    try:
        model(torch.zeros(1, 17, dtype=torch.long))
    except ValueError as err:
        assert "seq_len" in str(err)
    else:
        raise AssertionError("expected ValueError")
