"""prepare / unprepare / quantizers on nested models: selection, overrides, report, errors."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import qat
from qat.config import QuantConfig, QuantConfigError
from qat.quant.modules import QUANT_MODULES, QuantConv2d, QuantEmbedding, QuantLinear, is_quant_module
from qat.quant.quantizer import FakeQuantizer
from qat.quant.tied import TiedWeightError
from qat.rewrite import UNKNOWN_TYPE, AlreadyPreparedError, PrepareReport, prepare, quantizers, unprepare


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, 2 * d)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(2 * d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.fc2(self.act(self.fc1(x))))


class Net(nn.Module):
    """Nested model whose forward takes keyword arguments; a tied embedding / head pair."""

    def __init__(self, vocab: int = 16, d: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.stem = nn.Sequential(nn.Conv1d(d, d, 3, padding=1), nn.ReLU())
        self.blocks = nn.ModuleList([Block(d) for _ in range(2)])
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor, *, mask: torch.Tensor | None = None, temperature: float = 1.0):
        h = self.embed(ids)
        h = self.stem(h.transpose(1, 2)).transpose(1, 2)
        if mask is not None:
            h = h * mask[..., None]
        for b in self.blocks:
            h = b(h)
        return self.head(h) / temperature


LAYERS = ["embed", "stem.0", "blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2", "head"]
W4 = {"format": "int4", "granularity": "per_channel", "scale": "lsq"}
A8 = {"format": "int8", "granularity": "per_token", "dynamic": True}


def _ids() -> torch.Tensor:
    return torch.randint(0, 16, (2, 5))


def _by_name(report: PrepareReport) -> dict[str, object]:
    return {r.name: r for r in report.quantized + report.skipped}


# ---------------------------------------------------------------- the happy path
def test_prepare_swaps_every_known_layer_in_place() -> None:
    model = Net()
    weights = {n: p for n, p in model.named_parameters()}
    out = prepare(model, {"weight": W4, "activation": A8})
    assert out is model
    assert isinstance(model.embed, QuantEmbedding) and isinstance(model.head, QuantLinear)
    assert type(model.stem[0]).__name__ == "QuantConv1d" and isinstance(model.blocks[1].fc2, QuantLinear)
    assert isinstance(model.blocks[0].norm, nn.LayerNorm)  # unknown types are left alone
    assert [r.name for r in model.qat_report.quantized] == LAYERS
    assert model.qat_report.skipped == []
    for n, p in model.named_parameters():
        if n in weights:
            assert p is weights[n]
    assert model.head.weight is model.embed.weight  # still tied
    assert isinstance(model.qat_config, QuantConfig)
    y = model(_ids(), mask=torch.ones(2, 5), temperature=2.0)  # keyword-argument forward still works
    assert y.shape == (2, 5, 16) and torch.isfinite(y).all()
    y.sum().backward()
    assert model.embed.weight.grad is not None


def test_report_contents() -> None:
    model = prepare(Net(), {"weight": W4, "activation": A8, "exclude": ["embed"]}, tied="untie")
    rep = _by_name(model.qat_report)
    assert rep["blocks.0.fc1"].type == "Linear"
    assert rep["blocks.0.fc1"].weight == "int4 per_channel lsq"
    assert rep["blocks.0.fc1"].activation == "int8 per_token dynamic"
    assert rep["stem.0"].type == "Conv1d"
    assert rep["head"].activation == "int8 per_token dynamic"
    assert rep["embed"].reason == "matched by exclude"
    text = str(model.qat_report)
    assert "blocks.1.fc2" in text and "kept in float:" in text and "matched by exclude" in text


def test_embedding_never_gets_an_input_quantizer() -> None:
    model = prepare(Net(), {"weight": W4, "activation": A8})
    assert model.embed.input_quant is None
    assert _by_name(model.qat_report)["embed"].activation == "float"


def test_include_exclude_globs() -> None:
    model = prepare(Net(), {"weight": W4, "include": ["blocks.*"], "exclude": ["*.fc2"]})
    rep = _by_name(model.qat_report)
    assert [r.name for r in model.qat_report.quantized] == ["blocks.0.fc1", "blocks.1.fc1"]
    assert rep["embed"].reason == "not matched by include" and rep["head"].reason == "not matched by include"
    assert rep["blocks.0.fc2"].reason == "matched by exclude"
    assert type(model.blocks[0].fc2) is nn.Linear and type(model.head) is nn.Linear


def test_first_and_last_layer_at_8_bit_by_override() -> None:
    cfg = {
        "weight": {"format": "int2", "granularity": "per_channel", "scale": "lsq"},
        "activation": {"format": "int4", "scale": "lsq"},
        "overrides": {
            "embed": {"weight": {"format": "int8"}},
            "head": {"weight": {"format": "int8"}, "activation": {"format": "int8", "scale": "minmax"}},
        },
    }
    model = prepare(Net(), cfg)
    rep = _by_name(model.qat_report)
    assert rep["embed"].weight == "int8 per_channel lsq"
    assert rep["head"].weight == "int8 per_channel lsq" and rep["head"].activation == "int8 per_tensor minmax"
    assert rep["blocks.0.fc1"].weight == "int2 per_channel lsq"
    assert model.head.weight_quant.qmax == 127 and model.blocks[0].fc1.weight_quant.qmax == 1
    assert model.head.input_quant.observer is not None


def test_later_override_wins() -> None:
    cfg = {
        "weight": W4,
        "overrides": {"blocks.*": {"weight": {"format": "int3"}}, "*.fc2": {"weight": {"format": "int6"}}},
    }
    rep = _by_name(prepare(Net(), cfg).qat_report)
    assert rep["blocks.0.fc1"].weight.startswith("int3") and rep["blocks.1.fc2"].weight.startswith("int6")


def test_override_weight_null_keeps_weight_float() -> None:
    model = prepare(Net(), {"weight": W4, "activation": A8, "overrides": {"blocks.0.fc1": {"weight": None}}})
    assert isinstance(model.blocks[0].fc1, QuantLinear)
    assert model.blocks[0].fc1.weight_quant is None and model.blocks[0].fc1.input_quant is not None
    assert _by_name(model.qat_report)["blocks.0.fc1"].weight == "float"


def test_override_both_null_keeps_layer_float() -> None:
    model = prepare(
        Net(),
        {"weight": W4, "activation": A8, "overrides": {"head": {"weight": None, "activation": None}}},
        tied="untie",
    )
    assert type(model.head) is nn.Linear
    assert _by_name(model.qat_report)["head"].reason == "override keeps it in float"
    emb = prepare(Net(), {"weight": W4, "overrides": {"embed": {"weight": None}}}, tied="untie")
    assert type(emb.embed) is nn.Embedding


def test_null_specs_without_override_are_reported_as_such() -> None:
    cfg = {"weight": None, "activation": None, "overrides": {"head": {"weight": {"format": "int8"}}}}
    model = prepare(Net(), cfg, tied="untie")
    rep = _by_name(model.qat_report)
    assert [r.name for r in model.qat_report.quantized] == ["head"]
    assert rep["blocks.0.fc1"].reason == "weight and activation specs are null"


def test_weight_only_config() -> None:
    model = prepare(Net(), {"weight": W4, "activation": None})
    assert all(q.role == "weight" for _, q in quantizers(model))


def test_activation_override_on_float_base() -> None:
    model = prepare(Net(), {"weight": W4, "overrides": {"head": {"activation": {"format": "int8"}}}})
    assert model.head.input_quant is not None and model.blocks[0].fc1.input_quant is None


def test_conv2d_model_per_channel_axis_one() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    prepare(model, {"weight": {"format": "int4", "granularity": "per_channel", "axis": 1}})
    assert isinstance(model[0], QuantConv2d)
    assert model[0].weight_quant.stat_shape == (3,) and model[2].weight_quant.stat_shape == (4,)
    assert model(torch.randn(1, 3, 5, 5)).shape == (1, 2, 3, 3)


def test_prepare_accepts_dict_dictconfig_and_quantconfig() -> None:
    d = {
        "name": "w4a8",
        "weight": W4,
        "activation": A8,
        "include": ["*"],
        "exclude": [],
        "overrides": {},
        "attention": None,
    }
    reports = []
    for cfg in (d, OmegaConf.create(d), QuantConfig.from_dict(d)):
        torch.manual_seed(0)
        model = prepare(Net(), cfg)
        reports.append(str(model.qat_report))
    assert reports[0] == reports[1] == reports[2]


def test_prepare_is_exported_at_top_level() -> None:
    assert (
        qat.prepare is prepare
        and qat.unprepare is unprepare
        and qat.AlreadyPreparedError is AlreadyPreparedError
    )


def test_quantizers_lists_every_fake_quantizer() -> None:
    model = prepare(Net(), {"weight": W4, "activation": A8}, tied="untie")  # a weight quantizer per layer
    names = [n for n, _ in quantizers(model)]
    assert "embed.weight_quant" in names and "blocks.1.fc2.input_quant" in names
    assert "embed.input_quant" not in names
    assert len(names) == 7 + 6
    assert all(isinstance(q, FakeQuantizer) for _, q in quantizers(model))


# ---------------------------------------------------------------- errors
def test_already_prepared() -> None:
    model = prepare(Net(), {"weight": W4})
    with pytest.raises(AlreadyPreparedError, match=r"already holds quantized layers.*qat\.unprepare"):
        prepare(model, {"weight": W4})


def test_include_glob_matching_nothing() -> None:
    with pytest.raises(QuantConfigError) as ei:
        prepare(Net(), {"weight": W4, "include": ["blocks.*", "decoder.*"]})
    msg = str(ei.value)
    assert msg.startswith("quant.include: 'decoder.*' matches no quantizable layer; allowed names: ")
    assert "embed, stem.0, blocks.0.fc1" in msg


def test_include_glob_matching_only_a_container_is_an_error() -> None:
    # "blocks" names a ModuleList, not a layer: it would select nothing.
    with pytest.raises(QuantConfigError, match=r"quant\.include: 'blocks' matches no quantizable layer"):
        prepare(Net(), {"weight": W4, "include": ["head", "blocks"]})


def test_override_glob_matching_nothing() -> None:
    with pytest.raises(QuantConfigError) as ei:
        prepare(Net(), {"weight": W4, "overrides": {"lm_head": {"weight": {"format": "int8"}}}})
    msg = str(ei.value)
    assert msg.startswith("quant.overrides: 'lm_head' matches no quantizable layer; allowed names: ")
    assert "head" in msg


def test_selection_of_nothing() -> None:
    with pytest.raises(
        QuantConfigError, match=r"quant\.include: \['head'\] with exclude \['head'\] selects no"
    ):
        prepare(Net(), {"weight": W4, "include": ["head"], "exclude": ["head"]})
    with pytest.raises(QuantConfigError, match="selects no quantizable layer"):
        prepare(nn.Sequential(nn.ReLU()), {"weight": W4})


@pytest.mark.parametrize(
    ("cfg", "key", "bad", "allowed"),
    [
        ({"weight": {"format": "int4x"}}, "quant.weight.format", "'int4x'", "int2, int3, int4"),
        (
            {"weight": {"format": "int4", "gran": "per_channel"}},
            "quant.weight.gran",
            None,
            "format, granularity",
        ),
        ({"wieght": W4}, "quant.wieght", None, "weight, activation"),
        (
            {"weight": W4, "overrides": {"head": {"weight": {"format": "fp4"}}}},
            "quant.overrides.head.weight.format",
            "'fp4'",
            "fp8_e4m3",
        ),
        (
            {"weight": {"format": "int4", "granularity": "per_group", "group_size": 8, "scale": "foo"}},
            "quant.weight.scale",
            "'foo'",
            "minmax, ema",
        ),
    ],
)
def test_config_errors_surface_through_prepare(cfg, key, bad, allowed) -> None:
    model = Net()
    with pytest.raises(QuantConfigError) as ei:
        prepare(model, cfg)
    msg = str(ei.value)
    assert msg.startswith(f"{key}: ")
    if bad is not None:
        assert f"{bad} is not valid" in msg
    else:
        assert "unknown field" in msg
    assert f"allowed: {allowed}" in msg or allowed in msg
    assert not any(isinstance(m, QuantLinear) for m in model.modules())  # nothing was half-rewritten


def test_group_size_not_dividing() -> None:
    with pytest.raises(QuantConfigError) as ei:
        prepare(Net(d=6), {"weight": {"format": "int4", "granularity": "per_group", "group_size": 4}})
    msg = str(ei.value)
    assert msg.startswith("quant.weight.group_size: 4 does not divide the input dimension")
    assert "layer 'embed'" in msg and "allowed: a divisor of 6" in msg


def test_a_failing_layer_leaves_the_model_untouched() -> None:
    model = Net(d=8)
    model.blocks[1].fc2 = nn.Linear(12, 8)  # the only layer whose input dimension 12 is not a multiple of 8
    with pytest.raises(
        QuantConfigError,
        match=r"group_size: 8 does not divide the input dimension 12 of layer "
        r"'blocks\.1\.fc2'",
    ):
        prepare(model, {"weight": {"format": "int4", "granularity": "per_group", "group_size": 8}})
    assert not any(is_quant_module(m) for m in model.modules())
    assert not hasattr(model, "qat_report")
    prepare(model, {"weight": {"format": "int4", "granularity": "per_group", "group_size": 4}})  # retry works


def test_per_channel_axis_out_of_range() -> None:
    with pytest.raises(QuantConfigError, match=r"quant\.weight\.axis: 2 is out of range for layer 'embed'"):
        prepare(Net(), {"weight": {"format": "int8", "granularity": "per_channel", "axis": 2}})


# ---------------------------------------------------------------- unprepare, registry, attention hooks
def test_unprepare_restores_float_layers() -> None:
    model = Net().eval()
    ids = _ids()
    ref = model(ids)
    params = dict(model.named_parameters())
    prepare(model, {"weight": W4, "activation": A8})
    assert not torch.equal(model(ids), ref)
    out = unprepare(model)
    assert out is model
    assert type(model.embed) is nn.Embedding and type(model.blocks[0].fc1) is nn.Linear
    assert type(model.stem[0]) is nn.Conv1d and type(model.head) is nn.Linear
    assert not any(isinstance(m, FakeQuantizer) for m in model.modules())
    assert not hasattr(model, "qat_report") and not hasattr(model, "qat_config")
    for n, p in model.named_parameters():
        assert p is params[n]
    assert model.head.weight is model.embed.weight
    assert torch.equal(model(ids), ref)
    prepare(model, {"weight": W4})  # and it can be prepared again


class Gain(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(n) + 0.5)

    def forward(self, x):
        return x * self.weight


class QuantGain(Gain):
    @classmethod
    def from_float(cls, mod, weight_spec, act_spec, name=""):
        q = cls(mod.weight.numel())
        q.weight = mod.weight
        q.weight_quant = FakeQuantizer(weight_spec, "weight", tuple(mod.weight.shape), name=name)
        return q

    def to_float(self):
        m = Gain(self.weight.numel())
        m.weight = self.weight
        return m

    def forward(self, x):
        return x * self.weight_quant(self.weight)


@pytest.fixture
def registry():
    saved = dict(QUANT_MODULES)
    yield
    QUANT_MODULES.clear()
    QUANT_MODULES.update(saved)


def test_register_quant_module_for_a_user_layer(registry) -> None:
    qat.register_quant_module(Gain, QuantGain)
    model = nn.Sequential(nn.Linear(4, 4), Gain(4))
    prepare(model, {"weight": {"format": "int2"}})
    assert isinstance(model[1], QuantGain) and model[1].weight_quant.layer_name == "1"
    assert [r.type for r in model.qat_report.quantized] == ["Linear", "Gain"]
    unprepare(model)
    assert type(model[1]) is Gain


class Attn(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.q_quant, self.k_quant, self.v_quant = nn.Identity(), nn.Identity(), nn.Identity()

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = self.q_quant(q), self.k_quant(k), self.v_quant(v)
        return torch.softmax(q @ k.transpose(-1, -2), -1) @ v


def test_attention_hooks() -> None:
    model = nn.Sequential(Attn(), Attn())
    prepare(model, {"weight": W4, "attention": A8})
    assert isinstance(model[0].q_quant, FakeQuantizer) and isinstance(model[1].v_quant, FakeQuantizer)
    assert "0.k_quant" in [r.name for r in model.qat_report.quantized]
    assert model(torch.randn(2, 3, 8)).shape == (2, 3, 8)
    unprepare(model)
    assert isinstance(model[0].q_quant, nn.Identity) and type(model[0].qkv) is nn.Linear


def test_attention_without_hooks_is_an_error() -> None:
    model = Net()
    with pytest.raises(
        QuantConfigError, match=r"^quant\.attention: the model exposes no attention hook points"
    ):
        prepare(model, {"weight": W4, "attention": A8})
    assert type(model.head) is nn.Linear  # nothing was rewritten


def test_attention_hooks_on_the_root_module() -> None:
    model = prepare(Attn(), {"weight": W4, "attention": A8})
    assert [r.name for r in model.qat_report.quantized] == ["qkv", "q_quant", "k_quant", "v_quant"]
    assert model.q_quant.layer_name == "q_quant"


def test_exclude_glob_matching_nothing_is_an_error():
    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(QuantConfigError, match=r"quant.exclude: 'haed' matches no quantizable layer"):
        qat.prepare(m, {"weight": {"format": "int8"}, "exclude": ["haed"]})


# ---------------------------------------------------------------- tied weights, unknown layer types
def test_tied_layers_share_one_weight_quantizer_or_are_refused() -> None:
    model = prepare(Net(), {"weight": W4})
    assert model.head.weight_quant is model.embed.weight_quant and model.qat_tied == [["embed", "head"]]
    other = Net()
    with pytest.raises(TiedWeightError, match=r"embed \(float\), head \(int4 .*tied='untie'"):
        prepare(other, {"weight": W4, "exclude": ["embed"]})
    assert not any(is_quant_module(m) for m in other.modules()) and not hasattr(other, "qat_tied")
    untied = prepare(Net(), {"weight": W4, "exclude": ["embed"]}, tied="untie")
    assert untied.head.weight is not untied.embed.weight and untied.qat_tied == []
    unprepare(model)
    assert not hasattr(model, "qat_tied") and model.head.weight is model.embed.weight


class WithUnknown(nn.Module):
    """A registry type, a known-type layer inside an unknown container, and two unknown weight holders."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.mha = nn.MultiheadAttention(8, 2)  # in_proj_weight [24, 8]; out_proj is a Linear subclass
        self.gain = Gain(8)  # a 1-D weight: not a layer the report asks about

    def forward(self, x):
        return self.gain(self.mha(self.fc(x), x, x)[0])


def test_unknown_layer_types_are_reported_and_refused_when_strict() -> None:
    model = prepare(WithUnknown(), {"weight": W4})
    unknown = [(r.name, r.type) for r in model.qat_report.skipped if r.reason == UNKNOWN_TYPE]
    assert unknown == [("mha", "MultiheadAttention"), ("mha.out_proj", "NonDynamicallyQuantizableLinear")]
    assert "left float: unknown type" in str(model.qat_report)
    strict = WithUnknown()
    with pytest.raises(QuantConfigError) as ei:
        prepare(strict, {"weight": W4}, strict=True)
    msg = str(ei.value)
    assert "\n" not in msg and "mha (MultiheadAttention)" in msg and "qat.register_quant_module" in msg
    assert type(strict.fc) is nn.Linear and not hasattr(strict, "qat_report")
    assert prepare(nn.Sequential(nn.Linear(4, 4)), {"weight": W4}, strict=True).qat_report.skipped == []


def test_bad_tied_policy_names_the_allowed_values() -> None:
    with pytest.raises(QuantConfigError, match="tied: 'keep' is not valid; allowed: share, untie"):
        prepare(Net(), {"weight": W4}, tied="keep")
