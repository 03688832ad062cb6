import torch
from torch import nn

from qat.models.cnn import MLP, DigitsCNN


def test_cnn_shapes_and_backward() -> None:
    model = DigitsCNN()
    x = torch.randn(4, 1, 8, 8)
    logits = model(x)
    assert logits.shape == (4, 10)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_cnn_layer_names_are_addressable() -> None:
    model = DigitsCNN(in_channels=3, num_classes=5, channels=(8, 12))
    names = dict(model.named_modules())
    for name in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "fc"):
        assert name in names
    assert isinstance(model.conv1, nn.Conv2d) and model.conv1.in_channels == 3
    assert isinstance(model.fc, nn.Linear) and model.fc.out_features == 5
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 5)
    assert not any(isinstance(m, nn.Sequential) for m in model.modules())


def test_mlp_names_and_shapes() -> None:
    model = MLP(in_features=64, num_classes=10, hidden=(32, 16))
    linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert linear == ["fc1", "fc2", "head"]
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    assert MLP(hidden=()).head.in_features == 64
