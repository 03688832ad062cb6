"""Pack/unpack round trips for every code width, and the documented byte layout."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qat.deploy.packing import container_bits, pack, packed_numel, unpack, unpack_wide


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), signed=st.booleans(), data=st.data())
def test_round_trip_every_width(bits: int, signed: bool, data: st.DataObject) -> None:
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    n = data.draw(st.integers(0, 300))
    values = data.draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n))
    codes = torch.tensor(values, dtype=torch.int16)
    packed = pack(codes, bits, offset=lo)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_numel(n, bits) == -(-n * container_bits(bits) // 8)
    assert torch.equal(unpack_wide(packed, bits, n, offset=lo), codes)
    if hi <= 127:
        assert torch.equal(unpack(packed, bits, n, offset=lo), codes.to(torch.int8))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_round_trip_shapes(bits: int) -> None:
    codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (7, 5, 3))
    out = unpack(pack(codes, bits, -(1 << (bits - 1))), bits, codes.numel(), -(1 << (bits - 1)))
    assert torch.equal(out.reshape(codes.shape), codes.to(torch.int8))


def test_layout_is_lsb_first() -> None:
    """The layout other runtimes rely on (quant_config.json says "least significant bits first")."""
    assert pack(torch.tensor([1, 2, 3]), 2).tolist() == [1 | 2 << 2 | 3 << 4]
    assert pack(torch.tensor([0x3, 0xA]), 4).tolist() == [0xA3]
    assert pack(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1]), 1).tolist() == [0x81, 0x01]
    assert container_bits(3) == 4 and container_bits(5) == 8


def test_pack_rejects_codes_out_of_range() -> None:
    with pytest.raises(ValueError, match="outside the 2-bit range"):
        pack(torch.tensor([0, 4]), 2)
    with pytest.raises(ValueError, match="outside the 4-bit range"):
        pack(torch.tensor([-9]), 4, offset=-8)


def test_unpack_rejects_wrong_length_and_dtype() -> None:
    packed = pack(torch.arange(10), 4)
    with pytest.raises(ValueError, match="do not hold"):
        unpack(packed, 4, 12)
    with pytest.raises(ValueError, match="flat uint8"):
        unpack(packed.to(torch.int8), 4, 10)
