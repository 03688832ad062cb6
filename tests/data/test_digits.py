import torch

from qat.data.digits import DigitsDataModule


def _ids(ds) -> set[bytes]:
    """Identify rows by their pixel bytes (a few digits images are duplicates, so compare as a multiset)."""
    return {row["image"].numpy().tobytes() + bytes([int(row["label"])]) for row in ds}


def test_batches_have_expected_shapes_and_types() -> None:
    dm = DigitsDataModule(batch_size=16)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (16,) and y.dtype == torch.int64
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert dm.num_classes == 10 and dm.input_shape == (1, 8, 8)
    for loader in (dm.val_dataloader(), dm.test_dataloader(), dm.calibration_dataloader()):
        xb, yb = next(iter(loader))
        assert xb.shape[1:] == (1, 8, 8) and yb.dtype == torch.int64


def test_split_sizes_cover_dataset_and_are_stratified() -> None:
    dm = DigitsDataModule()
    dm.setup()
    sizes = {name: len(ds) for name, ds in dm.splits.items()}
    assert sum(sizes.values()) == 1797
    assert abs(sizes["validation"] - 0.15 * 1797) <= 2 and abs(sizes["test"] - 0.15 * 1797) <= 2
    # Stratified: every class appears in every split.
    for ds in dm.splits.values():
        assert set(ds["label"][:].tolist()) == set(range(10))


def test_same_seed_same_split_and_order_different_seed_differs() -> None:
    a, b, c = DigitsDataModule(seed=1), DigitsDataModule(seed=1), DigitsDataModule(seed=2)
    xa, ya = next(iter(a.train_dataloader()))
    xb, yb = next(iter(b.train_dataloader()))
    xc, _ = next(iter(c.train_dataloader()))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(xa, xc)
    assert torch.equal(a.splits["test"]["image"][:], b.splits["test"]["image"][:])


def test_calibration_loader_is_unshuffled_train() -> None:
    dm = DigitsDataModule(batch_size=32)
    first = [y for _, y in dm.calibration_dataloader()]
    second = [y for _, y in dm.calibration_dataloader()]
    assert all(torch.equal(p, q) for p, q in zip(first, second, strict=True))
    assert torch.equal(torch.cat(first), dm.splits["train"]["label"][:])


def test_splits_are_disjoint() -> None:
    dm = DigitsDataModule()
    dm.setup()
    train, val, test = (_ids(dm.splits[s]) for s in ("train", "validation", "test"))
    # load_digits has a handful of exact duplicate images, so allow a tiny overlap.
    assert len(train & val) + len(train & test) + len(val & test) <= 5
