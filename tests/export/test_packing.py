"""Bit-packing of integer codes against hand-computed bytes."""
import pytest
import torch

from qvit.export import pack_codes, packed_nbytes, unpack_codes


def test_two_bit_codes_pack_four_to_a_byte_lsb_first():
    codes = torch.tensor([-2, -1, 0, 1, 1])                  # offset -2 -> 0, 1, 2, 3, 3
    packed = pack_codes(codes, 2, offset=-2)
    assert packed.tolist() == [0b11_10_01_00, 0b00_00_00_11]
    assert unpack_codes(packed, 2, 5, offset=-2).tolist() == codes.tolist()


def test_three_bit_codes_cross_byte_boundaries():
    codes = torch.tensor([5, 3, 7])                          # bits 101 | 011 | 111 -> stream 1,0,1,1,1,0,1,1,1
    packed = pack_codes(codes, 3)
    assert packed.tolist() == [0b11011101, 0b00000001]
    assert unpack_codes(packed, 3, 3).tolist() == [5, 3, 7]


@pytest.mark.parametrize("bits", range(2, 9))
def test_round_trip_and_size_every_bit_width(bits):
    gen = torch.Generator().manual_seed(bits)
    lo = -(1 << (bits - 1))
    codes = torch.randint(lo, -lo, (7, 13), generator=gen)
    packed = pack_codes(codes, bits, offset=lo)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(91, bits) == -(-91 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, 91, offset=lo).view(7, 13), codes.to(torch.int32))


def test_out_of_range_codes_and_bad_streams_raise():
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        pack_codes(torch.tensor([4]), 2)
    with pytest.raises(ValueError, match="bits"):
        pack_codes(torch.tensor([0]), 9)
    with pytest.raises(ValueError, match="need 1 bytes"):
        unpack_codes(torch.zeros(2, dtype=torch.uint8), 4, 2)
