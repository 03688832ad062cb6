"""Conv-BatchNorm folding: pairing by the forward pass (never by names or order), eval-mode equivalence with
conv + BN, batch statistics while BN trains, the schedule's BN freeze, checkpoints, and the folded model an
exporter sees (no BN, bit for bit)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import qat
from qat.config import QuantConfigError
from qat.models.cnn import MLP, DigitsCNN
from qat.quant.bnfold import QuantConvBn2d
from qat.quant.bnpairs import NO_RUNNING_STATS, NOT_A_CONV_OUTPUT, find_conv_bn_pairs
from qat.quant.modules import QuantConv, QuantConv2d, deployed, is_quant_module
from qat.quant.quantizer import FakeQuantizer
from qat.rewrite import PATTERN_PASSES, prepare, unprepare
from qat.train.schedule import QATSchedule

W4 = {"format": "int4", "granularity": "per_channel", "scale": "lsq"}
A8 = {"format": "int8", "symmetric": False, "scale": "ema"}


def _trained_bn_model() -> DigitsCNN:
    """A DigitsCNN whose BN layers hold non-trivial running statistics and affine parameters."""
    torch.manual_seed(0)
    m = DigitsCNN().train()
    with torch.no_grad():
        for bn in (m.bn1, m.bn2, m.bn3):
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.uniform_(-0.5, 0.5)
        for _ in range(4):
            m(torch.randn(32, 1, 8, 8) * 2 + 0.5)
    return m.eval()


def _fake_quant(model: nn.Module, on: bool) -> None:
    for q in model.modules():
        if isinstance(q, FakeQuantizer):
            q.enable_fake_quant(on)


def test_pairs_come_from_the_forward_traced_or_run_on_a_sample() -> None:
    want = {"conv1": "bn1", "conv2": "bn2", "conv3": "bn3"}
    assert find_conv_bn_pairs(DigitsCNN()).pairs == want
    assert find_conv_bn_pairs(DigitsCNN(), torch.randn(2, 1, 8, 8)).pairs == want
    seq = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU())
    assert find_conv_bn_pairs(seq).pairs == {"0": "1"}


def test_folding_is_a_registered_pattern_pass() -> None:
    fold = PATTERN_PASSES["fold_bn"]  # keyed by the QuantConfig flag that turns it on
    assert fold.find is find_conv_bn_pairs and fold.build == QuantConvBn2d.from_float
    assert issubclass(QuantConvBn2d, QuantConv)
    assert is_quant_module(QuantConvBn2d.from_float(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), None, None))


def test_prepare_folds_and_replaces_bn_with_identity() -> None:
    m = prepare(_trained_bn_model(), {"weight": W4, "activation": A8, "fold_bn": True})
    assert isinstance(m.conv1, QuantConvBn2d) and isinstance(m.bn1, nn.Identity)
    assert isinstance(m.conv1.bn, nn.BatchNorm2d)
    assert [r.type for r in m.qat_report.quantized][:3] == ["Conv2d+BN"] * 3
    assert m.qat_config.fold_bn is True


def test_excluded_conv_keeps_its_bn() -> None:
    m = prepare(_trained_bn_model(), {"weight": W4, "fold_bn": True, "exclude": ["conv1"]})
    assert type(m.conv1) is nn.Conv2d and isinstance(m.bn1, nn.BatchNorm2d)
    assert isinstance(m.conv2, QuantConvBn2d) and isinstance(m.bn2, nn.Identity)


def test_fold_bn_on_a_model_without_conv_bn_is_a_config_error() -> None:
    with pytest.raises(QuantConfigError, match=r"quant.fold_bn: true is not valid .* allowed: false"):
        prepare(MLP(), {"weight": W4, "fold_bn": True})
    relu_first = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.BatchNorm2d(4))
    with pytest.raises(QuantConfigError, match=r"'2': BN input is not a Conv2d's output\); allowed: false"):
        prepare(relu_first, {"weight": W4, "fold_bn": True})
    with pytest.raises(QuantConfigError, match="quant.fold_bn: 'yes' is not valid; allowed: true, false"):
        qat.QuantConfig(fold_bn="yes")  # type: ignore[arg-type]


def test_eval_mode_without_fake_quant_equals_conv_then_bn() -> None:
    float_model = _trained_bn_model()
    x = torch.randn(8, 1, 8, 8)
    q = prepare(copy.deepcopy(float_model), {"weight": W4, "activation": A8, "fold_bn": True}).eval()
    _fake_quant(q, False)
    assert torch.allclose(q(x), float_model(x), atol=1e-5)


def test_train_mode_uses_batch_statistics_and_updates_running_ones() -> None:
    float_model = _trained_bn_model().train()
    q = prepare(copy.deepcopy(float_model), {"weight": W4, "fold_bn": True}).train()
    _fake_quant(q, False)
    x = torch.randn(16, 1, 8, 8)
    before = q.conv1.bn.running_mean.clone()
    assert torch.allclose(q(x), float_model(x), atol=1e-4)  # same as the unfolded float model in training
    assert not torch.equal(q.conv1.bn.running_mean, before)
    assert torch.allclose(q.conv1.bn.running_mean, float_model.bn1.running_mean, atol=1e-6)


def test_quantizer_sees_the_folded_weight_and_gets_gradients() -> None:
    q = prepare(_trained_bn_model(), {"weight": W4, "fold_bn": True}).train()
    conv = q.conv2
    factor = conv.bn.weight / torch.sqrt(conv.bn.running_var + conv.bn.eps)
    assert torch.allclose(conv.folded_weight(), conv.weight * factor[:, None, None, None])
    q(torch.randn(8, 1, 8, 8)).square().mean().backward()
    assert conv.weight_quant.scale.grad is not None and conv.weight.grad.abs().sum() > 0
    assert conv.bn.weight.grad.abs().sum() > 0 and conv.bn.bias.grad.abs().sum() > 0


def test_schedule_freezes_bn_and_switches_to_the_folded_path() -> None:
    q = prepare(_trained_bn_model(), {"weight": W4, "fold_bn": True}).train()
    x = torch.randn(8, 1, 8, 8)
    QATSchedule(freeze_bn_step=5).apply(q, step=5)
    assert not q.conv1.bn.training and q.conv1.training
    mean = q.conv1.bn.running_mean.clone()
    y = q(x)
    assert torch.equal(q.conv1.bn.running_mean, mean)  # frozen statistics
    assert torch.equal(y, deployed(copy.deepcopy(q)).train()(x))  # exactly the deployed folded conv


def test_fold_bn_gives_plain_quant_convs_bit_for_bit() -> None:
    q = prepare(_trained_bn_model(), {"weight": W4, "activation": A8, "fold_bn": True})
    qat.calibrate(q, [(torch.randn(16, 1, 8, 8),) for _ in range(2)])
    q.eval()
    x = torch.randn(8, 1, 8, 8)
    folded = deployed(copy.deepcopy(q)).eval()
    assert type(folded.conv1) is QuantConv2d and folded.conv1.bias is not None
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert torch.equal(folded(x), q(x))
    float_folded = unprepare(copy.deepcopy(q)).eval()  # to_float: the folded float conv
    assert type(float_folded.conv1) is nn.Conv2d and isinstance(float_folded.bn1, nn.Identity)
    _fake_quant(q, False)
    assert torch.allclose(float_folded(x), q(x), atol=1e-6)


def test_checkpoint_round_trip_through_prepare() -> None:
    cfg = {"weight": W4, "activation": A8, "fold_bn": True}
    a = prepare(_trained_bn_model(), cfg)
    qat.calibrate(a, [(torch.randn(16, 1, 8, 8),)])
    b = prepare(DigitsCNN(), cfg)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 1, 8, 8)
    assert any(k.startswith("conv1.bn.") for k in a.state_dict())
    assert torch.equal(a.eval()(x), b.eval()(x))


def test_prepare_twice_is_refused() -> None:
    q = prepare(_trained_bn_model(), {"weight": W4, "fold_bn": True, "include": ["conv*"]})
    with pytest.raises(qat.AlreadyPreparedError):
        prepare(q, {"weight": W4})


def test_folded_model_exports_and_reloads_in_the_integer_runtime(tmp_path) -> None:
    q = prepare(_trained_bn_model(), {"weight": W4, "activation": A8, "fold_bn": True})
    batches = [(torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))) for _ in range(2)]
    qat.calibrate(q, batches)
    q.eval()
    report = qat.export(deployed(copy.deepcopy(q)), tmp_path / "exp", batches=batches, task="classification")
    assert report.verification["top1_agreement"] == 1.0
    runtime = qat.load_quantized(tmp_path / "exp", unprepare(deployed(copy.deepcopy(q))))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in runtime.modules())
    x = batches[0][0]
    assert torch.allclose(runtime(x), q(x), atol=1e-5)


# --- layouts where definition order and the forward disagree ----------------------------------------------


def _randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and affine parameters (a fresh BN is almost an identity)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                bn.weight.uniform_(0.5, 2.0)
                bn.bias.uniform_(-0.5, 0.5)
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


class _Swapped(nn.Module):
    """Defines ``conv1, conv2, bn1, bn2`` but applies bn1 after conv1: definition order would fold conv2
    with bn1 and leave conv1 unfolded."""

    def __init__(self, bn2_stats: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4, track_running_stats=bn2_stats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


class _Unfoldable(nn.Module):
    """``conv1, bn1, conv2, bn2`` in the usual order, but conv2 and bn2 cannot be folded: "relu" applies
    bn2(relu(conv2)), "relu_inplace" the same with an in-place ReLU, "residual" bn2(y) + y with y = conv2."""

    def __init__(self, layout: str) -> None:
        super().__init__()
        self.layout = layout
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=layout == "relu_inplace")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(torch.relu(self.bn1(self.conv1(x))))
        return self.bn2(y) + y if self.layout == "residual" else self.bn2(self.relu(y))


def _prepared_eval(model: nn.Module, sample: torch.Tensor | None) -> nn.Module:
    q = prepare(copy.deepcopy(model), {"weight": W4, "fold_bn": True}, example_inputs=sample).eval()
    _fake_quant(q, False)
    return q


@pytest.mark.parametrize("with_sample", [False, True], ids=["fx", "sample"])
def test_pairs_by_forward_not_by_definition_order(with_sample: bool) -> None:
    model = _randomize_bn(_Swapped())
    x = torch.randn(4, 1, 6, 6)
    q = _prepared_eval(model, x if with_sample else None)
    assert torch.allclose(q(x), model(x), atol=1e-5)  # fake quant off: exactly conv then BN
    assert isinstance(q.conv1, QuantConvBn2d) and isinstance(q.conv2, QuantConvBn2d)
    assert (q.conv1.bn_name, q.conv2.bn_name) == ("bn1", "bn2") and q.qat_report.not_folded == []


@pytest.mark.parametrize("with_sample", [False, True], ids=["fx", "sample"])
@pytest.mark.parametrize(
    ("layout", "reason"),
    [
        ("relu", NOT_A_CONV_OUTPUT),
        ("relu_inplace", NOT_A_CONV_OUTPUT),
        ("residual", "conv 'conv2' output is also used elsewhere"),
    ],
)
def test_layout_that_cannot_be_folded_is_left_unfolded_and_reported(
    layout: str, reason: str, with_sample: bool
) -> None:
    """conv -> ReLU -> BN, and a conv whose output also feeds a residual add: folding either changes the
    model, so only conv1 + bn1 is folded and the report says why bn2 is not."""
    model = _randomize_bn(_Unfoldable(layout))
    x = torch.randn(4, 1, 6, 6)
    q = _prepared_eval(model, x if with_sample else None)
    assert torch.allclose(q(x), model(x), atol=1e-5)
    assert isinstance(q.conv1, QuantConvBn2d) and type(q.conv2) is QuantConv2d
    assert type(q.bn2) is nn.BatchNorm2d
    not_folded = q.qat_report.not_folded
    assert [r.name for r in not_folded] == ["bn2"] and not_folded[0].reason.startswith(reason)
    assert "BatchNorm not folded" in str(q.qat_report) and reason in str(q.qat_report)


def test_bn_without_running_statistics_is_reported() -> None:
    model = _randomize_bn(_Swapped(bn2_stats=False))
    q = prepare(copy.deepcopy(model), {"weight": W4, "fold_bn": True})
    assert isinstance(q.conv1, QuantConvBn2d) and type(q.conv2) is QuantConv2d
    assert [(r.name, r.reason) for r in q.qat_report.not_folded] == [("bn2", NO_RUNNING_STATS)]


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = -x
        return self.bn(self.conv(x))


def test_untraceable_model_needs_example_inputs() -> None:
    with pytest.raises(
        QuantConfigError, match=r"^quant.fold_bn: torch.fx cannot trace .* example_inputs="
    ) as e:
        prepare(_Untraceable(), {"weight": W4, "fold_bn": True})
    assert "\n" not in str(e.value)
    q = prepare(_Untraceable(), {"weight": W4, "fold_bn": True}, example_inputs=(torch.randn(2, 1, 5, 5),))
    assert isinstance(q.conv, QuantConvBn2d) and isinstance(q.bn, nn.Identity)


def test_pairing_leaves_the_model_and_random_state_untouched() -> None:
    model = _Unfoldable("residual").train()
    state = copy.deepcopy(model.state_dict())
    torch.manual_seed(3)
    found = find_conv_bn_pairs(model, torch.randn(4, 1, 6, 6))
    after = torch.rand(1)
    torch.manual_seed(3)
    torch.randn(4, 1, 6, 6)
    assert torch.equal(after, torch.rand(1))  # no draw from the global generator
    assert model.training and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    # a fresh BN is almost an identity; the residual fold is refused all the same
    assert found.pairs == {"conv1": "bn1"} and list(found.unfolded) == ["bn2"]


def test_job_pairs_on_the_first_calibration_batch_without_touching_the_random_stream() -> None:
    from qat.data import DigitsDataModule
    from qat.train.job import example_inputs

    dm = DigitsDataModule(batch_size=16)
    torch.manual_seed(1)
    x = example_inputs(dm)
    after = torch.rand(1)
    torch.manual_seed(1)
    assert torch.equal(after, torch.rand(1))  # the run's seeded stream is the same with or without fold_bn
    assert torch.equal(x, next(iter(dm.calibration_dataloader()))[0])
    assert find_conv_bn_pairs(DigitsCNN(), x).pairs == {"conv1": "bn1", "conv2": "bn2", "conv3": "bn3"}
