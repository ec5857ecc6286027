import pytest
import torch

from lowbit.pack import code_dtype, pack_codes, packed_nbytes, unpack_codes


@pytest.mark.parametrize("bits", range(1, 33))
@pytest.mark.parametrize("n", [1, 7, 8, 13, 1000, 4099])
def test_round_trip_is_bit_exact_and_tight(bits, n):
    gen = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 2**bits, (n,), generator=gen, dtype=torch.int64).to(code_dtype(bits))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_nbytes(n, bits) == -(-n * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, n), codes)


def test_known_layout_lsb_first():
    # 3-bit codes 1, 2, 7 -> bits 100 010 111 (LSB first) -> byte0 = 0b11_010_001, byte1 = 0b1
    packed = pack_codes(torch.tensor([1, 2, 7], dtype=torch.uint8), 3)
    assert packed.tolist() == [0b11010001, 0b1]


def test_code_out_of_range_is_refused():
    with pytest.raises(ValueError, match="exceeds the 3-bit range"):
        pack_codes(torch.tensor([8], dtype=torch.uint8), 3)


def test_wrong_buffer_size_is_refused():
    with pytest.raises(ValueError, match="bytes"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 4, 10)


def test_wide_codes_are_a_low_byte_plane_then_the_high_bits():
    # 12-bit codes 0xABC, 0x123 -> low bytes BC 23, then the high nibbles A, 1 packed 4-bit LSB first: 0x1A
    packed = pack_codes(torch.tensor([0xABC, 0x123], dtype=torch.int32), 12)
    assert packed.tolist() == [0xBC, 0x23, 0x1A]
    with pytest.raises(ValueError, match="outside the 12-bit range"):
        pack_codes(torch.tensor([4096], dtype=torch.int32), 12)
    with pytest.raises(ValueError, match="1 to 32 bits"):
        pack_codes(torch.tensor([0]), 33)
