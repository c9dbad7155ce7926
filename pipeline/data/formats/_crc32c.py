"""CRC32C (Castagnoli) over many byte ranges at once, vectorised with numpy, and TFRecord's masking.

CRC32C runs slicing-by-8 with four 16-bit tables over a matrix of records, one row each:
records of one length are viewed in place (their first ``length % 8`` bytes fed one at a
time); others are left-padded with zeros to a common width (leading zeros leave a CRC with a
zero initial state unchanged, and the usual ``0xffffffff`` initial state is the same as
inverting the first four data bytes). Also the byte-window helpers the TFRecord codec shares.
Part of :mod:`pipeline.data.formats.tfrecord`, which re-exports the public names.
"""

from __future__ import annotations

import functools
from typing import Any, Final

import numpy as np

__all__ = ["crc32c", "crc32c_many", "mask_crc", "masked_crc32c"]

_POLY: Final = 0x82F63B78  # CRC-32C (Castagnoli), reflected
_MASK_DELTA: Final = 0xA282EAD8
_CRC_BYTES: Final = 8 << 20  # bytes of records per CRC matrix (wide rows keep numpy busy)


# -- CRC32C -----------------------------------------------------------------------------------
@functools.cache
def _byte_tables() -> np.ndarray:
    """``t[k][b]``: CRC contribution of byte ``b`` followed by ``k`` zero bytes (k < 8)."""
    c = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        c = np.where(c & 1, (c >> 1) ^ np.uint32(_POLY), c >> 1).astype(np.uint32)
    t = np.empty((8, 256), np.uint32)
    t[0] = c
    for k in range(1, 8):
        t[k] = (t[k - 1] >> 8) ^ t[0][t[k - 1] & 0xFF]
    return t


@functools.cache
def _pair_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Slicing-by-8 with 16-bit lookups: table ``j`` takes bytes ``2j, 2j+1`` of a step."""
    t, x = _byte_tables(), np.arange(1 << 16, dtype=np.uint32)
    u0, u1, u2, u3 = (t[7 - 2 * j][x & 0xFF] ^ t[6 - 2 * j][x >> 8] for j in range(4))
    return u0, u1, u2, u3


def _crc_rows(m: np.ndarray, crc: np.ndarray) -> np.ndarray:
    """CRC registers after feeding each row of ``m`` (uint8, width % 8 == 0) from ``crc``."""
    u0, u1, u2, u3 = _pair_tables()
    halves = np.ascontiguousarray(m.view("<u2").T)  # one row per 2-byte column, records along it
    for j in range(0, halves.shape[0], 4):
        lo = (crc & 0xFFFF).astype(np.uint16) ^ halves[j]
        hi = (crc >> 16).astype(np.uint16) ^ halves[j + 1]
        crc = u0[lo] ^ u1[hi] ^ u2[halves[j + 2]] ^ u3[halves[j + 3]]
    return crc


def _crc_bytewise(data: bytes | memoryview | np.ndarray) -> int:
    t0 = _byte_tables()[0]
    c = 0xFFFFFFFF
    for b in bytes(data):
        c = int(t0[(c ^ b) & 0xFF]) ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def excl_cumsum(x: np.ndarray) -> np.ndarray:
    out = np.zeros(len(x), np.int64)
    np.cumsum(x[:-1], out=out[1:])
    return out


def ragged_index(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For rows of ``lengths`` bytes laid end to end: (row of each byte, its offset in the row)."""
    rows = np.repeat(np.arange(len(lengths)), lengths)
    return rows, np.arange(len(rows), dtype=np.int64) - np.repeat(excl_cumsum(lengths), lengths)


def windows(buf: np.ndarray, pos: np.ndarray, width: int) -> np.ndarray:
    """``buf[p : p + width]`` for every ``p`` (a copy); ``p`` is clipped into the buffer."""
    if len(buf) < width:
        buf = np.concatenate([buf, np.zeros(width - len(buf), np.uint8)])
    view = np.lib.stride_tricks.sliding_window_view(buf, width)
    return view[np.minimum(np.maximum(pos, 0), len(buf) - width)]


def _crc_group(buf: np.ndarray, ends: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """CRC32C of records of >= 4 bytes ending at ``ends``, as rows of a zero-left-padded matrix.

    ``buf`` holds at least the matrix width of bytes before every record.
    """
    width = -(-int(lengths.max()) // 8) * 8
    pad = width - lengths
    m = windows(buf, ends - width, width)
    m *= np.arange(width) >= pad[:, None]
    rows = np.arange(len(lengths))
    for k in range(4):  # the initial state 0xffffffff = inverting the first four data bytes
        m[rows, pad + k] ^= 0xFF
    return _crc_rows(m, np.zeros(len(lengths), np.uint32)) ^ np.uint32(0xFFFFFFFF)


def _crc_equal(buf: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    """CRC32C of records of one ``length``: the first ``length % 8`` bytes go byte by byte."""
    n, step = len(starts), int(starts[1] - starts[0]) if len(starts) > 1 else 0
    if n > 1 and step > 0 and (np.diff(starts) == step).all():  # evenly spaced: a strided view
        m = np.lib.stride_tricks.as_strided(buf[starts[0] :], (n, length), (step, 1))
    else:
        m = windows(buf, starts, length)
    t0, head = _byte_tables()[0], length % 8
    crc = np.full(n, 0xFFFFFFFF, np.uint32)
    for j in range(head):
        crc = t0[(crc ^ m[:, j]) & 0xFF] ^ (crc >> 8)
    return _crc_rows(m[:, head:], crc) ^ np.uint32(0xFFFFFFFF)


def _groups(lengths: np.ndarray) -> list[slice]:
    """Runs of (sorted) ``lengths`` whose padded matrix stays under the chunk budget."""
    widths = (lengths + 7) // 8 * 8
    out, a, n = [], 0, len(lengths)
    while a < n:
        # at most twice the narrowest width (bounds the padding), and the byte budget
        b = int(np.searchsorted(widths, 2 * widths[a], side="right"))
        b = min(b, a + max(64, _CRC_BYTES // int(widths[b - 1])))
        out.append(slice(a, b))
        a = b
    return out


def crc32c_many(buf: np.ndarray | bytes, starts: Any, lengths: Any) -> np.ndarray:
    """CRC32C (uint32) of ``buf[starts[i] : starts[i] + lengths[i]]`` for every ``i``."""
    data = np.frombuffer(buf, np.uint8) if not isinstance(buf, np.ndarray) else buf
    s = np.asarray(starts, np.int64).reshape(-1)
    n = np.asarray(lengths, np.int64).reshape(-1)
    if len(s) != len(n) or (
        len(n) and ((s < 0).any() or (n < 0).any() or (s + n).max() > len(data))
    ):
        raise ValueError(f"byte ranges must be {len(s)} pairs inside the {len(data)}-byte buffer")
    out = np.empty(len(n), np.uint32)
    for i in np.flatnonzero(n < 4):  # too short for the inverted-prefix identity
        out[i] = _crc_bytewise(data[s[i] : s[i] + n[i]])
    big = np.flatnonzero(n >= 4)
    if not big.size:
        return out
    order = big[np.argsort(n[big], kind="stable")]
    mixed = []
    for run in np.split(order, np.flatnonzero(np.diff(n[order])) + 1):
        if len(run) < 64:  # rare lengths share zero-padded matrices
            mixed.append(run)
            continue
        step = max(64, _CRC_BYTES // int(n[run[0]]))
        for a in range(0, len(run), step):
            out[run[a : a + step]] = _crc_equal(data, s[run[a : a + step]], int(n[run[0]]))
    order = np.concatenate(mixed) if mixed else order[:0]
    if not order.size:
        return out
    front = -(-int(n[order[-1]]) // 8) * 8  # zeros before the data: room for any row's padding
    padded = np.concatenate([np.zeros(front, np.uint8), data])
    for g in _groups(n[order]):
        rows = order[g]
        out[rows] = _crc_group(padded, front + s[rows] + n[rows], n[rows])
    return out


def crc32c(data: bytes | memoryview | np.ndarray) -> int:
    """CRC32C of one buffer (``crc32c(b"123456789") == 0xE3069283``)."""
    arr = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data
    return int(crc32c_many(arr.reshape(-1).view(np.uint8), [0], [arr.nbytes])[0])


def mask_crc(crc: np.ndarray) -> np.ndarray:
    """TFRecord's masking of CRCs (uint32 arrays)."""
    c = crc.astype(np.uint32)
    return (((c >> 15) | (c << 17)) + np.uint32(_MASK_DELTA)).astype(np.uint32)


def masked_crc32c(data: bytes | memoryview | np.ndarray) -> int:
    """The masked CRC32C that TFRecord stores after a length and after the data."""
    return int(mask_crc(np.array([crc32c(data)], np.uint32))[0])
