"""Bit packing of integer codes into bytes: the storage layer of the export format.

Layout (also written into ``quant_config.json`` so other runtimes can read it): codes are flattened in
C order, shifted to unsigned values ``u = code - offset`` and packed LSB first, ``8 // bits`` values per
byte: value ``i`` lives in byte ``i // n`` at bit ``(i % n) * bits``. The last byte is zero-padded.
Containers are 1, 2, 4 or 8 bits wide (3-bit codes use 4-bit containers, 5..7-bit codes use bytes):
a value never straddles a byte, which keeps unpacking a shift-and-mask on any runtime.
"""

from __future__ import annotations

import torch

CONTAINER_BITS = (1, 2, 4, 8)


def container_bits(bits: int) -> int:
    """Smallest container (1, 2, 4 or 8 bits) that holds a ``bits``-bit code."""
    for c in CONTAINER_BITS:
        if bits <= c:
            return c
    raise ValueError(f"bits: {bits} is not valid; allowed: 1..8")


def packed_numel(count: int, bits: int) -> int:
    """Bytes needed for ``count`` values in ``bits``-bit containers."""
    per = 8 // container_bits(bits)
    return (count + per - 1) // per


def pack(codes: torch.Tensor, bits: int, offset: int = 0) -> torch.Tensor:
    """Pack integer ``codes`` (any integer dtype, any shape) into a flat ``uint8`` tensor.

    ``offset`` is subtracted first (``qmin`` for signed formats), so the stored values are unsigned and
    must fit in ``bits`` bits; anything outside raises instead of silently wrapping.
    """
    c = container_bits(bits)
    u = codes.reshape(-1).to(torch.int16) - offset
    if u.numel() and (int(u.min()) < 0 or int(u.max()) >= (1 << bits)):
        raise ValueError(
            f"pack: codes minus offset {offset} span [{int(u.min())}, {int(u.max())}], "
            f"outside the {bits}-bit range [0, {(1 << bits) - 1}]"
        )
    per = 8 // c
    pad = (-u.numel()) % per
    if pad:
        u = torch.cat([u, u.new_zeros(pad)])
    u = u.reshape(-1, per)
    shifts = torch.arange(per, dtype=torch.int16) * c
    return (u << shifts).sum(dim=1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, count: int, offset: int = 0) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``count`` values as a flat ``int8`` tensor (``u + offset``).

    Codes of 8-bit unsigned formats (0..255) do not fit in ``int8``: use ``dtype`` int16 via
    :func:`unpack_wide` for those.
    """
    out = unpack_wide(packed, bits, count, offset)
    return out.to(torch.int8)


def unpack_wide(packed: torch.Tensor, bits: int, count: int, offset: int = 0) -> torch.Tensor:
    """As :func:`unpack` but returns ``int16`` (safe for every 1..8-bit format, signed or not)."""
    c = container_bits(bits)
    per = 8 // c
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(
            f"unpack: expected a flat uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}"
        )
    if packed.numel() != packed_numel(count, bits):
        raise ValueError(
            f"unpack: {packed.numel()} bytes do not hold {count} {bits}-bit values "
            f"(expected {packed_numel(count, bits)} bytes)"
        )
    p = packed.to(torch.int16)
    shifts = torch.arange(per, dtype=torch.int16) * c
    vals = (p[:, None] >> shifts) & ((1 << c) - 1)
    return vals.reshape(-1)[:count] + offset
