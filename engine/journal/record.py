"""Journal record format (docs/format.md has the byte diagram).

A record is a 56-byte header, then a payload. WRITE and BASELINE payloads are a table of
per-block crc32c values followed by the blocks, so one block can be checked on its own when it is
read back, and a torn tail is found block by block. The header's crc covers the header and the
crc table (or the whole payload for MARK records), so no field is used before it is checked.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

import crc32c as _crc32c

MAGIC = b"RWJ1"
HEADER = struct.Struct("<4sBBHQQQIIQII")
HEADER_SIZE = HEADER.size  # 56
_HEAD48 = struct.Struct("<4sBBHQQQIIQ")
_TAIL = struct.Struct("<II")
assert HEADER_SIZE == 56
SEGMENT_MAGIC = b"RWSEG\x00\x01\x00"
SEGMENT_HEADER = struct.Struct("<8sQ")
SEGMENT_HEADER_SIZE = SEGMENT_HEADER.size  # 16
MAX_MARK_NAME = 200
MAX_RECORD_BYTES = 64 << 20  # a WRITE/BASELINE record carries at most this much data


class Kind(IntEnum):
    """What a record holds."""

    WRITE = 1  # new contents of `count` blocks from `block`
    BASELINE = 2  # old contents of blocks before their first overwrite; `aux` = the seq it stands at
    ZERO = 3  # `count` blocks from `block` now read as zeros (write-zeroes and trim)
    MARK = 4  # a named point; payload = UTF-8 name
    UNMARK = 5  # a mark removed; payload = UTF-8 name


crc32c: Callable[..., int] = _crc32c.crc32c
"""crc32c(data, value=0): CRC-32C (Castagnoli), hardware-accelerated where the CPU has it."""


ZERO_BLOCK_CRC: dict[int, int] = {}


def zero_crc(block_size: int) -> int:
    """crc32c of an all-zero block (cached per block size)."""
    c = ZERO_BLOCK_CRC.get(block_size)
    if c is None:
        c = ZERO_BLOCK_CRC[block_size] = crc32c(bytes(block_size))
    return c


@dataclass(frozen=True)
class Header:
    """A decoded, checked record header."""

    kind: Kind
    flags: int
    seq: int
    time_ns: int
    block: int
    count: int
    paylen: int
    aux: int
    hcrc: int

    def table_len(self) -> int:
        return 4 * self.count if self.kind in (Kind.WRITE, Kind.BASELINE) else 0

    @property
    def total(self) -> int:
        return HEADER_SIZE + self.paylen


def payload_len(kind: Kind, count: int, block_size: int, name_len: int = 0) -> int:
    if kind in (Kind.WRITE, Kind.BASELINE):
        return count * (4 + block_size)
    if kind in (Kind.MARK, Kind.UNMARK):
        return name_len
    return 0


def encode_header(
    kind: int, seq: int, time_ns: int, block: int, count: int, paylen: int, aux: int, covered: bytes
) -> bytes:
    """Pack a header whose crc covers the header fields and `covered` (crc table or mark name)."""
    raw = _HEAD48.pack(MAGIC, int(kind), 0, HEADER_SIZE, seq, time_ns, block, count, paylen, aux)
    return raw + _TAIL.pack(crc32c(covered, crc32c(raw)), 0)


def encode_one_block(kind: int, seq: int, time_ns: int, block: int, aux: int, data: bytes | memoryview) -> tuple[bytes, int]:
    """Header and crc table of a one-block WRITE or BASELINE record, and the block's crc (the
    hot path of 4 KiB writes: encode_header + block_crcs + pack_table in one call)."""
    crc = crc32c(data)
    table = _ONE.pack(crc)
    return encode_header(kind, seq, time_ns, block, 1, 4 + len(data), aux, table) + table, crc


def block_crcs(data: bytes | bytearray | memoryview, block_size: int) -> list[int]:
    """crc32c of each block of `data` (a whole number of blocks)."""
    if len(data) == block_size:
        return [crc32c(data)]
    mv = memoryview(data)
    return [crc32c(mv[i : i + block_size]) for i in range(0, len(mv), block_size)]


_ONE = struct.Struct("<I")


def pack_table(crcs: list[int]) -> bytes:
    if len(crcs) == 1:
        return _ONE.pack(crcs[0])
    return struct.pack(f"<{len(crcs)}I", *crcs)


def unpack_table(raw: bytes, count: int) -> tuple[int, ...]:
    return struct.unpack(f"<{count}I", raw)


class HeaderError(ValueError):
    """A header that is not a valid record (torn, overwritten or corrupt)."""


def decode_header(raw: bytes, block_size: int) -> Header:
    """Parse and sanity-check a header; the crc is checked by the caller with the covered bytes."""
    if len(raw) < HEADER_SIZE:
        raise HeaderError("short header")
    magic, kind, flags, hlen, seq, t, block, count, paylen, aux, hcrc, _pad = HEADER.unpack_from(raw)
    if magic != MAGIC or hlen != HEADER_SIZE:
        raise HeaderError("bad magic")
    try:
        k = Kind(kind)
    except ValueError:
        raise HeaderError(f"unknown record kind {kind}") from None
    if k in (Kind.WRITE, Kind.BASELINE):
        if not 0 < count * block_size <= MAX_RECORD_BYTES or paylen != count * (4 + block_size):
            raise HeaderError("bad length")
    elif k == Kind.ZERO:
        if count <= 0 or paylen != 0:
            raise HeaderError("bad length")
    elif not 0 < paylen <= MAX_MARK_NAME * 4:
        raise HeaderError("bad mark length")
    return Header(k, flags, seq, t, block, count, paylen, aux, hcrc)


def header_crc_ok(raw: bytes, covered: bytes | memoryview) -> bool:
    c = crc32c(raw[:48])
    c = crc32c(covered, c)
    return bool(c == struct.unpack_from("<I", raw, 48)[0])
