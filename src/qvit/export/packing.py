"""Bit-packing of integer codes: ``bits`` bits per code, little-endian within each byte."""
from __future__ import annotations

import math

import torch

from ..quantizers.spec import MAX_BITS, MIN_BITS


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes that ``numel`` codes of ``bits`` bits take once packed."""
    return math.ceil(numel * bits / 8)


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")


def pack_codes(codes: torch.Tensor, bits: int, offset: int = 0) -> torch.Tensor:
    """Pack integer ``codes`` (any shape) into a flat ``uint8`` tensor of ``packed_nbytes(numel, bits)`` bytes.

    Each code is stored as the unsigned value ``code - offset``, which must lie in ``[0, 2**bits - 1]``; code ``i``
    occupies bits ``i*bits .. i*bits + bits - 1`` of the stream (bit 0 is the least significant bit of byte 0).
    """
    _check_bits(bits)
    u = codes.detach().reshape(-1).to(torch.int64) - int(offset)
    if u.numel() and (int(u.min()) < 0 or int(u.max()) > (1 << bits) - 1):
        raise ValueError(f"codes minus offset {offset} must lie in [0, {(1 << bits) - 1}] to pack at {bits} bits, "
                         f"got [{int(u.min())}, {int(u.max())}]")
    u = u.to(torch.uint8).cpu()
    if bits == 8:
        return u.clone()
    if 8 % bits == 0:                                   # 2 and 4 bits: whole codes per byte
        per = 8 // bits
        u = torch.nn.functional.pad(u, (0, (-u.numel()) % per)).view(-1, per)
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
        return (u << shifts).sum(dim=1, dtype=torch.uint8) if u.numel() else u.reshape(0)
    bit_positions = torch.arange(bits, dtype=torch.uint8)
    stream = ((u[:, None] >> bit_positions) & 1).reshape(-1)
    stream = torch.nn.functional.pad(stream, (0, (-stream.numel()) % 8)).view(-1, 8)
    return (stream << torch.arange(8, dtype=torch.uint8)).sum(dim=1, dtype=torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int, offset: int = 0) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``numel`` codes (``int32``, flat) from the ``uint8`` stream ``packed``."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.ndim != 1:
        raise ValueError(f"packed codes must be a flat uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    need = packed_nbytes(numel, bits)
    if packed.numel() != need:
        raise ValueError(f"{numel} codes of {bits} bits need {need} bytes, got {packed.numel()}")
    p = packed.cpu()
    if bits == 8:
        u = p
    elif 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
        u = ((p[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)[:numel]
    else:
        stream = ((p[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)[:numel * bits]
        weights = (1 << torch.arange(bits, dtype=torch.int32))
        u = (stream.view(numel, bits).to(torch.int32) * weights).sum(dim=1)
    return u.to(torch.int32) + int(offset)
