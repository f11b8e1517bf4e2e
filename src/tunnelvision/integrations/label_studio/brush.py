"""Label Studio's brush RLE: what `label_studio_sdk.converter.brush.mask2rle` makes, vectorised.

The format (label_studio_sdk's `decode_rle` reads it): a bit stream packed into bytes, most
significant bit first. A header: the number of values (32 bits), the word size minus one (5 bits:
8-bit values), then four run-length field sizes minus one (4 bits each: 3, 4, 8, 16). Then blocks
until that many values are out: a flag bit (1: one value repeated, 0: values one by one), 2 bits
choosing a field size, the run length minus one in that many bits, and the value (8 bits). The
values are the mask as an RGBA image of 0 or 255, four per pixel, row by row.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from tunnelvision.masks import BoolMask

RUN_FIELD_BITS = (3, 4, 8, 16)
WORD_BITS = 8
CHANNELS = 4  # Label Studio paints the mask as RGBA
MAX_RUN = 1 << RUN_FIELD_BITS[-1]
_BLOCK_BITS = 1 + 2 + WORD_BITS  # flag, field choice, value: plus the run length's field


def encode_brush(mask: BoolMask) -> list[int]:
    """The mask (height, width) as Label Studio's brush `rle` list of byte values."""
    flat = np.ascontiguousarray(mask, dtype=bool).reshape(-1)
    values = flat.size * CHANNELS
    if values >= 1 << 32:
        raise ValueError("mask too large for Label Studio's brush format")
    lengths, pixel_values = _runs(flat)
    pieces, piece_values = _split_long_runs(lengths * CHANNELS, pixel_values)
    stream = np.concatenate([_header_bits(values), _block_bits(pieces, piece_values)])
    return [int(b) for b in np.packbits(stream)]  # zero bits pad the last byte


def _runs(flat: NDArray[np.bool_]) -> tuple[NDArray[np.int64], NDArray[np.uint8]]:
    """Lengths and values (0 or 255) of the runs of equal pixels."""
    if flat.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.uint8)
    starts = np.concatenate(([0], np.flatnonzero(flat[1:] != flat[:-1]) + 1))
    lengths = np.diff(np.concatenate((starts, [flat.size]))).astype(np.int64)
    return lengths, flat[starts].astype(np.uint8) * 255


def _split_long_runs(
    lengths: NDArray[np.int64], values: NDArray[np.uint8]
) -> tuple[NDArray[np.int64], NDArray[np.uint8]]:
    """Runs longer than the widest length field allows, as several blocks."""
    blocks = (lengths + MAX_RUN - 1) // MAX_RUN
    pieces = np.full(int(blocks.sum()), MAX_RUN, dtype=np.int64)
    last = np.cumsum(blocks) - 1
    pieces[last] = lengths - (blocks - 1) * MAX_RUN
    return pieces, np.repeat(values, blocks)


def _header_bits(values: int) -> NDArray[np.uint8]:
    fields = [(values, 32), (WORD_BITS - 1, 5)] + [(size - 1, 4) for size in RUN_FIELD_BITS]
    return np.concatenate([_bits(np.array([v], np.int64), n) for v, n in fields])


def _block_bits(pieces: NDArray[np.int64], values: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """Each piece as a repeat block with the narrowest length field that holds it."""
    choice = np.searchsorted(np.array([1 << s for s in RUN_FIELD_BITS]), pieces)
    field = np.array(RUN_FIELD_BITS, np.int64)[choice]
    width = _BLOCK_BITS + field
    code = (1 << (width - 1)) | (choice << field + WORD_BITS) | ((pieces - 1) << WORD_BITS) | values
    widest = _BLOCK_BITS + RUN_FIELD_BITS[-1]
    aligned = code << (widest - width)  # each code's bits first, then padding to drop
    bits = _bits(aligned, widest)
    keep = np.arange(widest)[None, :] < width[:, None]
    return bits.reshape(-1, widest)[keep]


def _bits(numbers: NDArray[np.int64], width: int) -> NDArray[np.uint8]:
    """Each number's `width` bits, most significant first, one row per number (flattened)."""
    shifts = np.arange(width - 1, -1, -1, dtype=np.int64)
    return ((numbers[:, None] >> shifts) & 1).astype(np.uint8).reshape(-1)
