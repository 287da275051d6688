"""PNG files of masks, deflated from the masks' runs instead of byte by byte.

A mask is a few runs per row (background, car, background), 2.45 MB of pixels at 1918x1280 that zlib
compresses to about 5 kB by finding, byte after byte, that each byte repeats the one before. That
scan costs 5 ms a mask, as much as decoding the photo. The same deflate stream follows from the
runs alone: over the PNG's byte stream (each row a filter byte 0, then its pixels), a run of ``L``
equal bytes is a literal and matches of distance 1 covering the other ``L - 1`` bytes, 258 bytes a
match at most, which is what zlib's run-length strategy writes. Here the runs are found with one
comparison of neighbouring pixels (:class:`batch.core.masks.MaskRuns`; a mask made from a model's scores
has its runs without its pixels, batch.inference.postprocess), the matches are laid out for all runs at once, and one
deflate block with Huffman codes fitted to their counts is packed with numpy: the PNG of a
1918x1280 mask in about a millisecond, as small as zlib's.

The Adler-32 checksum of the zlib stream is computed from the runs as well (a run of ``L`` bytes of
value ``v`` adds ``v * L`` to the sum and ``v`` times the sum of its positions' distances from the end
to the second sum), so no pass over the pixels is made at all.

Any (H, B) uint8 rows can be written this way: :func:`encode_png` takes the runs of 8-bit grayscale
masks (0/255) and of bit-packed 1-bit masks alike; only its speed depends on the rows being mostly runs.
"""

from __future__ import annotations

import functools
import heapq
import struct
import zlib

import numpy as np

from batch.core.images import PNG_SIGNATURE
from batch.core.masks import MaskRuns

ZLIB_HEADER = b"\x78\x01"  # deflate, 32 KB window, no dictionary, fastest (what the header check wants: 0x7801 % 31 == 0)
ADLER_MOD = 65521
MAX_MATCH = 258
MIN_MATCH = 3
END_OF_BLOCK = 256
LITERAL_LENGTH_CODES = 286
MAX_CODE_BITS = 15  # deflate's longest Huffman code
MAX_CODE_LENGTH_BITS = 7  # the longest code of the code-length alphabet
CODE_LENGTH_ORDER = (16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15)  # RFC 1951 3.2.7


def length_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each match length 0..258: its length symbol (257..285), the symbol's base length and its extra bits."""
    extra_bits = [0] * 8 + [b for b in range(1, 6) for _ in range(4)] + [0]  # symbols 257..285
    symbol = np.zeros(MAX_MATCH + 1, np.int64)
    base = np.zeros(MAX_MATCH + 1, np.int64)
    bits = np.zeros(MAX_MATCH + 1, np.int64)
    start = MIN_MATCH
    for code, extra in enumerate(extra_bits[:-1]):
        stop = start + (1 << extra)
        symbol[start:stop], base[start:stop], bits[start:stop] = 257 + code, start, extra
        start = stop
    symbol[MAX_MATCH], base[MAX_MATCH], bits[MAX_MATCH] = 285, MAX_MATCH, 0  # 258 has its own symbol
    return symbol, base, bits


LENGTH_SYMBOL, LENGTH_BASE, LENGTH_EXTRA = length_tables()


def encode_png(runs: MaskRuns, width: int, bit_depth: int) -> bytes:
    """A grayscale PNG of the rows ``runs`` describe (their packed bytes), ``width`` pixels of ``bit_depth`` bits."""
    height = runs.size[0]
    header = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)  # grayscale, no interlace
    return PNG_SIGNATURE + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib_from_runs(runs)) + png_chunk(b"IEND", b"")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def zlib_from_runs(runs: MaskRuns) -> bytes:
    """The zlib stream of the rows as PNG scanlines (a filter byte 0 before each row), deflated from their runs."""
    starts, values, stream_length = scanline_runs(runs)
    lengths = np.diff(np.append(starts, stream_length))
    symbols, extra_values, extra_bits, is_match = tokens(values, lengths)
    return (
        ZLIB_HEADER + deflate_block(symbols, extra_values, extra_bits, is_match) + adler32(starts, values, lengths, stream_length)
    )


def scanline_runs(runs: MaskRuns) -> tuple[np.ndarray, np.ndarray, int]:
    """Where each run of equal bytes starts in the scanline stream, its byte, and the stream's length.

    Stream position of row ``r``'s filter byte (0): ``r * (W + 1)``; of its byte ``c``: ``r * (W + 1) + 1 + c``.
    The rows' stretches and the filter bytes, in stream order, are merged where a value continues the one before.
    """
    height, width = runs.size
    stride = width + 1
    positions = np.concatenate((np.arange(height, dtype=np.int64) * stride, runs.starts + runs.starts // width + 1))
    order = np.argsort(positions, kind="stable")  # a filter byte before its row's first stretch
    positions = positions[order]
    values = np.concatenate((np.zeros(height, np.int64), runs.values.astype(np.int64)))[order]
    new = np.empty(values.size, bool)
    new[0] = True
    np.not_equal(values[1:], values[:-1], out=new[1:])
    return positions[new], values[new], height * stride


def tokens(values: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, ...]:
    """The deflate tokens of the runs, in stream order: per run a literal (its byte), then matches of distance 1 for
    the rest, 258 bytes each and one shorter one; a rest of 1 or 2 bytes is written as literals.

    Returns each token's literal/length symbol, the extra bits of a length (value, count) and whether it is a match.
    """
    rest = lengths - 1
    full, left = rest // MAX_MATCH, rest % MAX_MATCH
    last = np.where(left >= MIN_MATCH, 1, left)  # a shorter match, or 0-2 literals
    per_run = 1 + full + last
    run = np.repeat(np.arange(values.size), per_run)
    position = np.arange(run.size) - np.repeat(np.cumsum(per_run) - per_run, per_run)
    full_of, left_of = full[run], left[run]
    literal = (position == 0) | ((position > full_of) & (left_of < MIN_MATCH))
    match_length = np.where(literal, 0, np.where(position <= full_of, MAX_MATCH, left_of))
    symbols = np.where(literal, values[run], LENGTH_SYMBOL[match_length])
    extra_values = np.where(literal, 0, match_length - LENGTH_BASE[match_length])
    return symbols, extra_values, LENGTH_EXTRA[match_length], ~literal


def deflate_block(symbols: np.ndarray, extra_values: np.ndarray, extra_bits: np.ndarray, is_match: np.ndarray) -> bytes:
    """One final deflate block with dynamic Huffman codes for ``symbols`` (distance: always 1, a 1-bit code)."""
    counts = np.bincount(symbols, minlength=LITERAL_LENGTH_CODES)
    counts[END_OF_BLOCK] += 1
    code_lengths = huffman_lengths(counts, MAX_CODE_BITS)
    codes, header = huffman_codes(code_lengths.astype(np.uint8).tobytes())
    # One field per token: its Huffman code, then the extra bits of a length, then a match's distance code (one bit, 0).
    token_bits = code_lengths[symbols]
    token_values = codes[symbols] | (extra_values << token_bits)
    values = np.concatenate([header[:, 0], token_values, [codes[END_OF_BLOCK]]])
    counts = np.concatenate([header[:, 1], token_bits + extra_bits + is_match, [code_lengths[END_OF_BLOCK]]])
    return pack_bits(values, counts)


@functools.lru_cache(maxsize=256)
def huffman_codes(code_lengths: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(the codes of :func:`reversed_codes`, the block header's (value, bits) fields (n, 2)) for the literal/length
    ``code_lengths`` (one byte each): kept for the next mask, whose codes are usually the same."""
    lengths = np.frombuffer(code_lengths, np.uint8).astype(np.int64)
    codes, header = reversed_codes(lengths), np.array(block_header(lengths), np.int64).reshape(-1, 2)
    for table in (codes, header):  # shared by the writer threads
        table.setflags(write=False)
    return codes, header


def block_header(code_lengths: np.ndarray) -> list[tuple[int, int]]:
    """BFINAL, BTYPE=2, and the two alphabets' code lengths, themselves Huffman-coded (RFC 1951 3.2.7)."""
    used = max(257, int(np.flatnonzero(code_lengths)[-1]) + 1)
    sequence = [*code_lengths[:used].tolist(), 1]  # then the one distance code: 1 bit
    coded = run_length_code_lengths(sequence)  # (symbol 0..18, extra value, extra bits)
    cl_counts = np.bincount([symbol for symbol, _, _ in coded], minlength=19)
    cl_lengths = huffman_lengths(cl_counts, MAX_CODE_LENGTH_BITS)
    cl_codes, cl_lengths = reversed_codes(cl_lengths).tolist(), cl_lengths.tolist()
    order = [cl_lengths[symbol] for symbol in CODE_LENGTH_ORDER]
    sent = max(4, max(i for i, length in enumerate(order) if length) + 1)
    fields = [(1, 1), (2, 2), (used - 257, 5), (0, 5), (sent - 4, 4)] + [(length, 3) for length in order[:sent]]
    for symbol, value, bits in coded:
        fields += [(cl_codes[symbol], cl_lengths[symbol]), (value, bits)]
    return fields


def run_length_code_lengths(sequence: list[int]) -> list[tuple[int, int, int]]:
    """Code lengths as the code-length alphabet writes them: zeros in runs (17: 3-10, 18: 11-138), the rest as they are."""
    coded = []
    for value, length in equal_runs(sequence):
        while length > 0:
            run = min(length, 138)
            if value == 0 and run >= 11:
                coded.append((18, run - 11, 7))
            elif value == 0 and run >= 3:
                coded.append((17, run - 3, 3))
            else:
                run = 1
                coded.append((value, 0, 0))
            length -= run
    return coded


def equal_runs(sequence: list[int]) -> list[tuple[int, int]]:
    """(value, how many times in a row) of each run of equal values in ``sequence``, in order."""
    values = np.asarray(sequence)
    starts = np.flatnonzero(np.diff(values, prepend=values[0] - 1))
    lengths = np.diff(starts, append=values.size)
    return list(zip(values[starts].tolist(), lengths.tolist()))


def huffman_lengths(counts: np.ndarray, limit: int) -> np.ndarray:
    """Huffman code lengths for symbols with ``counts`` (0: unused), none longer than ``limit`` bits.

    Counts are halved (kept non-zero) until the longest code fits: such skew never comes from a mask, but a
    valid stream must not depend on that. A lone symbol gets a 1-bit code, as deflate requires.
    """
    counts = counts.astype(np.int64)
    while True:
        lengths = tree_depths(counts)
        if lengths.max() <= limit:
            return lengths
        counts = np.where(counts > 0, (counts + 1) // 2, 0)


def tree_depths(counts: np.ndarray) -> np.ndarray:
    """Each symbol's depth in a Huffman tree of ``counts`` (a mask uses a few dozen symbols: plain Python is fastest)."""
    lengths = [0] * counts.size
    heap = [(count, [symbol]) for symbol, count in zip(np.flatnonzero(counts).tolist(), counts[counts > 0].tolist())]
    if len(heap) == 1:
        lengths[heap[0][1][0]] = 1
    heapq.heapify(heap)
    while len(heap) > 1:
        (count_a, symbols_a), (count_b, symbols_b) = heapq.heappop(heap), heapq.heappop(heap)
        for symbol in symbols_a + symbols_b:
            lengths[symbol] += 1
        heapq.heappush(heap, (count_a + count_b, symbols_a + symbols_b))
    return np.array(lengths, np.int64)


def reversed_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical Huffman codes for ``lengths`` (RFC 1951 3.2.2), bit-reversed: deflate packs them from their top bit."""
    codes = np.zeros(lengths.size, np.int64)
    code, previous = 0, 0
    used = np.flatnonzero(lengths)
    for symbol, length in sorted(zip(used.tolist(), lengths[used].tolist()), key=lambda pair: pair[1]):  # stable
        code <<= length - previous
        codes[symbol] = int(f"{code:0{length}b}"[::-1], 2)
        code, previous = code + 1, length
    return codes


def pack_bits(values: np.ndarray, counts: np.ndarray) -> bytes:
    """Fields (``values``, ``counts`` bits each, up to 32) -> bytes, each value's bits from its lowest, the first
    field in the lowest bits.

    Each field is shifted to its bit offset in its 32-bit word and summed into that word and the next (a field
    spans at most two): fields never share a bit, so the sum is their bitwise or, exact in float64 below 2**32,
    and two ``bincount`` calls pack them all.
    """
    ends = np.cumsum(counts)
    size = -(-int(ends[-1]) // 8) if ends.size else 0
    starts = ends - counts
    shifted = (values & ((1 << counts) - 1)) << (starts & 31)  # below 2**63: a field of 32 bits shifted by 31
    word = starts >> 5
    words = -(-size // 4) + 1
    low = np.bincount(word, weights=shifted & 0xFFFFFFFF, minlength=words)
    high = np.bincount(word + 1, weights=shifted >> 32, minlength=words + 1)[:words]
    return (low + high).astype("<u4").view(np.uint8)[:size].tobytes()


def adler32(starts: np.ndarray, values: np.ndarray, lengths: np.ndarray, total: int) -> bytes:
    """The Adler-32 of the stream the runs make, from the runs: ``A = 1 + sum(x_i)`` and ``B = n + sum((n - i) x_i)``."""
    nonzero = values != 0
    v, p, n = values[nonzero], starts[nonzero], lengths[nonzero]
    a = (1 + int((v * n % ADLER_MOD).sum())) % ADLER_MOD
    distances = (n * (total - p) - n * (n - 1) // 2) % ADLER_MOD  # sum over the run of (total - i)
    b = (total + int((v * distances % ADLER_MOD).sum())) % ADLER_MOD
    return struct.pack(">I", (b << 16) | a)
