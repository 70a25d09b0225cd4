"""Vectorised parsing of a block of Criteo TSV lines.

Per-field Python `int()` calls cap a reader at ~150k lines/s; parsing the raw bytes with numpy
(field boundaries from separator positions, digits by Horner's rule one column at a time) is several
times faster and finds every malformed line of a block at once.

Accepted syntax, per line: label in {0, 1}; integers `-?[0-9]{1,18}`; categoricals
`[0-9a-fA-F]{1,16}`; an empty integer or categorical field is missing.
"""

from __future__ import annotations

import dataclasses

import numpy as np

_TAB, _NL, _MINUS, _ZERO = 9, 10, ord("-"), ord("0")
_MAX_INT_DIGITS, _MAX_HEX_DIGITS = 18, 16

_HEX_LUT = np.full(256, -1, dtype=np.int16)
for _c in range(10):
    _HEX_LUT[_ZERO + _c] = _c
for _c in range(6):
    _HEX_LUT[ord("a") + _c] = 10 + _c
    _HEX_LUT[ord("A") + _c] = 10 + _c


@dataclasses.dataclass
class BadLine:
    """One malformed line of a block: its 0-based offset in the block, a reason kind and detail."""

    offset: int
    kind: str  # "field_count" | "label" | "dense" | "categorical"
    detail: str


@dataclasses.dataclass
class ParsedBlock:
    """The good lines of a block, in order, plus the bad ones."""

    label_N: np.ndarray  # float32
    dense_NxQ: np.ndarray  # float32, log1p(max(count, 0)), missing -> 0
    ids_NxS: np.ndarray  # int32, int(hex) mod rows, missing -> -1
    bad: list[BadLine]
    num_lines: int


def _parse_ints(buf: np.ndarray, start: np.ndarray, length: np.ndarray):
    """Signed decimal fields -> (int64 values, ok mask); empty fields are ok and 0."""
    neg = (length > 0) & (buf[np.minimum(start, buf.size - 1)] == _MINUS)
    ndig = length - neg
    ok = (ndig <= _MAX_INT_DIGITS) & ((length == 0) | (ndig >= 1))
    first = start + neg
    val = np.zeros(start.shape, dtype=np.int64)
    for j in range(min(int(ndig.max(initial=0)), _MAX_INT_DIGITS)):
        active = j < ndig
        d = buf[np.where(active, first + j, 0)].astype(np.int64) - _ZERO
        ok &= ~active | ((d >= 0) & (d <= 9))
        val = np.where(active, val * 10 + d, val)
    return np.where(neg, -val, val), ok


def _parse_hex(buf: np.ndarray, start: np.ndarray, length: np.ndarray):
    """Hex fields -> (uint64 values, ok mask); empty fields are ok."""
    ok = length <= _MAX_HEX_DIGITS
    val = np.zeros(start.shape, dtype=np.uint64)
    for j in range(min(int(length.max(initial=0)), _MAX_HEX_DIGITS)):
        active = j < length
        d = _HEX_LUT[buf[np.where(active, start + j, 0)]]
        ok &= ~active | (d >= 0)
        val = np.where(active, (val << np.uint64(4)) | d.clip(0).astype(np.uint64), val)
    return val, ok


def _field_text(data: bytes, start: int, length: int, limit: int = 40) -> str:
    text = data[start:start + min(length, limit)].decode("utf-8", "replace")
    return repr(text + ("..." if length > limit else ""))


def parse_block(data: bytes, num_dense: int, rows_S: np.ndarray) -> ParsedBlock:
    """Parse complete lines (each ending in b"\\n", no b"\\r") of label/dense/categorical fields."""
    num_sparse = len(rows_S)
    num_fields = 1 + num_dense + num_sparse
    buf = np.frombuffer(data, dtype=np.uint8)
    sep_pos = np.flatnonzero((buf == _TAB) | (buf == _NL))
    nl_idx = np.flatnonzero(buf[sep_pos] == _NL)
    n = nl_idx.size
    fields_per_line = np.diff(nl_idx, prepend=-1)
    field_start = np.concatenate([[0], sep_pos[:-1] + 1])
    bad: list[BadLine] = []

    good_count = fields_per_line == num_fields
    if not good_count.all():
        for i in np.flatnonzero(~good_count):
            bad.append(BadLine(int(i), "field_count",
                               f"has {fields_per_line[i]} tab-separated fields, "
                               f"expected {num_fields}"))
        keep_sep = np.repeat(good_count, fields_per_line)
        sep_pos, field_start = sep_pos[keep_sep], field_start[keep_sep]
    line_of = np.flatnonzero(good_count)
    start_NxF = field_start.reshape(-1, num_fields)
    len_NxF = sep_pos.reshape(-1, num_fields) - start_NxF

    lab_ok = (len_NxF[:, 0] == 1) & ((buf[start_NxF[:, 0]] | 1) == ord("1"))
    label_N = (buf[start_NxF[:, 0]] == ord("1")).astype(np.float32)
    d_start, d_len = start_NxF[:, 1:1 + num_dense], len_NxF[:, 1:1 + num_dense]
    counts_NxQ, dense_ok_NxQ = _parse_ints(buf, d_start, d_len)
    s_start, s_len = start_NxF[:, 1 + num_dense:], len_NxF[:, 1 + num_dense:]
    hex_NxS, sparse_ok_NxS = _parse_hex(buf, s_start, s_len)

    dense_ok, sparse_ok = dense_ok_NxQ.all(axis=1), sparse_ok_NxS.all(axis=1)
    ok_N = lab_ok & dense_ok & sparse_ok
    for r in np.flatnonzero(~ok_N):
        if not lab_ok[r]:
            kind = "label"
            detail = (f"label (field 1) must be 0 or 1, got "
                      f"{_field_text(data, start_NxF[r, 0], len_NxF[r, 0])}")
        elif not dense_ok[r]:
            c = int(np.argmin(dense_ok_NxQ[r]))
            kind = "dense"
            detail = (f"integer feature I{c + 1} (field {c + 2}) is not an integer: "
                      f"{_field_text(data, d_start[r, c], d_len[r, c])}")
        else:
            c = int(np.argmin(sparse_ok_NxS[r]))
            kind = "categorical"
            detail = (f"categorical feature C{c + 1} (field {c + 2 + num_dense}) is not a hex "
                      f"id of 1-{_MAX_HEX_DIGITS} digits: "
                      f"{_field_text(data, s_start[r, c], s_len[r, c])}")
        bad.append(BadLine(int(line_of[r]), kind, detail))
    bad.sort(key=lambda b: b.offset)

    dense_NxQ = np.log1p(np.maximum(counts_NxQ[ok_N], 0).astype(np.float64)).astype(np.float32)
    ids_NxS = (hex_NxS[ok_N] % rows_S.astype(np.uint64)).astype(np.int32)
    ids_NxS[s_len[ok_N] == 0] = -1
    return ParsedBlock(label_N[ok_N], dense_NxQ, ids_NxS, bad, n)
