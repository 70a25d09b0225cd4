"""Streaming, resumable reader of Criteo TSV click logs (Kaggle and 1TB layouts).

A line is `label \\t I1..I13 \\t C1..C26` (counts configurable). Missing integers become 0 and
negative ones are clamped to 0 before log1p (as the public DLRM does); a missing categorical becomes
the padding id -1; a present one is int(hex, 16) mod the table's rows.

Layouts: a directory of day files (`day_0`, `day_1`, ..., sorted by the numbers in their names)
is one day per file; a single file is one day, or `kaggle_days` equal consecutive chunks of it
(the Kaggle convention: train on days 0-5, evaluate on day 6). Selected days are read in order as
one stream.

Malformed lines raise MalformedLineError naming file and line; with skip_bad_lines=True they are
counted per reason in `stats` and a warning is logged when the stream ends. Nothing malformed is
silently turned into a value.
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
import os
import re
from collections.abc import Iterator, Sequence

import numpy as np

from autoshard_jax.data.batch import Batch
from autoshard_jax.data.tsv_parse import parse_block
from autoshard_jax.errors import InputError
from autoshard_jax.tables.spec import TableSpec

log = logging.getLogger(__name__)

_READ_BYTES = 1 << 22


class MalformedLineError(InputError):
    """A line that does not parse; the message is `path:line: what is wrong`."""

    def __init__(self, path: str, lineno: int, kind: str, detail: str):
        super().__init__(f"{path}:{lineno}: malformed line ({kind}): {detail}")
        self.path, self.lineno, self.kind, self.detail = path, lineno, kind, detail


@dataclasses.dataclass
class ReadStats:
    """Counts of one pass of `batches()`; bad lines are keyed by reason."""

    lines: int = 0
    samples: int = 0
    bad_lines: dict[str, int] = dataclasses.field(default_factory=dict)
    first_bad: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def num_bad(self) -> int:
        return sum(self.bad_lines.values())

    def report(self) -> str:
        text = f"read {self.lines} lines, {self.samples} samples, {self.num_bad} bad lines skipped"
        for kind, count in sorted(self.bad_lines.items()):
            text += f"\n  {kind}: {count} (first at {self.first_bad[kind]})"
        return text


def _natural_key(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _open(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _line_blocks(path: str) -> Iterator[bytes]:
    """Blocks of complete lines, each ending in b"\\n" (added to an unterminated last line)."""
    with _open(path) as f:
        rest = b""
        while block := f.read(_READ_BYTES):
            block = rest + block
            cut = block.rfind(b"\n") + 1
            rest = block[cut:]
            if cut:
                yield block[:cut].replace(b"\r\n", b"\n")
        if rest:
            yield rest.replace(b"\r\n", b"\n") + b"\n"


def _split_after_lines(block: bytes, k: int) -> int:
    """Byte offset just after the k-th line of a block (0 < k <= lines in block)."""
    nl = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 10)
    return int(nl[k - 1]) + 1


def _count_lines(path: str) -> int:
    return sum(block.count(b"\n") for block in _line_blocks(path))


def _is_empty(path: str) -> bool:
    with _open(path) as f:
        return not f.read(1)


class CriteoTSVReader:
    """Fixed-size batches (see batch.py) from Criteo TSV files, streamed block by block.

    Args:
      path: a TSV file (optionally .gz) or a directory of day files.
      tables: one TableSpec or row count per categorical feature, in feature order. Ids are
        single-hot: column 0 of each [B, spec.hotness] array; further slots, if any, are -1.
      num_dense: number of integer features per line.
      days: indices of the days to read, in order (default: all).
      kaggle_days: split a single file into this many equal consecutive days (Kaggle: 7).
      skip_bad_lines: skip and count malformed lines instead of raising.
      drop_last: drop the final partial batch (train); False returns it short (eval).
    """

    def __init__(self, path: str | os.PathLike, tables: Sequence[TableSpec] | Sequence[int],
                 num_dense: int = 13, days: Sequence[int] | None = None,
                 kaggle_days: int | None = None, skip_bad_lines: bool = False,
                 drop_last: bool = True):
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"Criteo TSV path {path!r} does not exist")
        if not tables:
            raise ValueError("need at least one table (one per categorical feature)")
        rows = [t.rows if isinstance(t, TableSpec) else int(t) for t in tables]
        if any(r < 1 or r >= 2**31 for r in rows):
            raise ValueError(f"table rows must be in [1, 2**31), got {rows}")
        self.rows_S = np.array(rows, dtype=np.int64)
        self.hotness_S = [t.hotness if isinstance(t, TableSpec) else 1 for t in tables]
        self.num_dense = num_dense
        self.skip_bad_lines = skip_bad_lines
        self.drop_last = drop_last
        self.stats = ReadStats()

        if os.path.isdir(path):
            if kaggle_days is not None:
                raise ValueError("kaggle_days splits a single file; got a directory")
            files = sorted((os.path.join(path, n) for n in os.listdir(path)
                            if not n.startswith(".") and os.path.isfile(os.path.join(path, n))),
                           key=lambda p: _natural_key(os.path.basename(p)))
            if not files:
                raise ValueError(f"directory {path!r} holds no day files")
            all_days = [(f, 0, None) for f in files]
        else:
            all_days = [(path, 0, None)]
        for f, _, _ in all_days:
            if _is_empty(f):
                raise ValueError(f"Criteo TSV file {f!r} is empty")
        if kaggle_days is not None:
            if kaggle_days < 1:
                raise ValueError(f"kaggle_days must be >= 1, got {kaggle_days}")
            n = _count_lines(path)
            if n < kaggle_days:
                raise ValueError(f"{path!r} has {n} lines, fewer than kaggle_days={kaggle_days}")
            # np.array_split sizes: the first n % k days get one extra line.
            bounds = np.cumsum([0] + [len(a) for a in np.array_split(np.arange(n), kaggle_days)])
            all_days = [(path, int(bounds[d]), int(bounds[d + 1])) for d in range(kaggle_days)]
        if days is None:
            days = range(len(all_days))
        for d in days:
            if not 0 <= d < len(all_days):
                raise ValueError(f"day {d} out of range: {path!r} has {len(all_days)} days")
        self.segments = [all_days[d] for d in days]

    def _blocks(self, skip_lines: int) -> Iterator[tuple[str, int, bytes]]:
        """(path, 1-based line number of the first line, block) over the selected days, in order,
        after skipping `skip_lines` lines of the stream unparsed."""
        for path, begin, end in self.segments:
            if end is not None and skip_lines >= end - begin:
                skip_lines -= end - begin
                continue
            skip, lineno = begin + skip_lines, 1
            limit = None if end is None else end - begin - skip_lines
            skip_lines = 0
            for block in _line_blocks(path):
                k = block.count(b"\n")
                if skip >= k:
                    skip, lineno = skip - k, lineno + k
                    continue
                if skip:
                    block = block[_split_after_lines(block, skip):]
                    lineno, k, skip = lineno + skip, k - skip, 0
                if limit is not None and k >= limit:
                    yield path, lineno, block[:_split_after_lines(block, limit)]
                    limit = 0
                    break
                yield path, lineno, block
                lineno += k
                if limit is not None:
                    limit -= k
            if limit:
                raise ValueError(f"{path!r} ended {limit} lines before its day did (file changed?)")
            skip_lines = skip  # a day file shorter than the resume offset passes the rest on

    def _record_bad(self, path: str, lineno0: int, bad) -> None:
        for b in bad:
            if not self.skip_bad_lines:
                raise MalformedLineError(path, lineno0 + b.offset, b.kind, b.detail)
            self.stats.bad_lines[b.kind] = self.stats.bad_lines.get(b.kind, 0) + 1
            self.stats.first_bad.setdefault(b.kind, f"{path}:{lineno0 + b.offset}")

    def _batch(self, label_N, dense_NxD, ids_NxS, lo: int, hi: int) -> Batch:
        ids = []
        for s, h in enumerate(self.hotness_S):
            ids_BxH = np.full((hi - lo, h), -1, dtype=np.int32)
            ids_BxH[:, 0] = ids_NxS[lo:hi, s]
            ids.append(ids_BxH)
        return {"dense": dense_NxD[lo:hi].copy(), "ids": tuple(ids), "label": label_N[lo:hi].copy()}

    def batches(self, batch_size: int, start_batch: int = 0) -> Iterator[Batch]:
        """Batches from batch number `start_batch` on; resuming at k yields what a full read
        yields from its k-th batch. Resets `stats` to this pass."""
        if batch_size < 1 or start_batch < 0:
            raise ValueError(f"need batch_size >= 1, start_batch >= 0; got {batch_size}, "
                             f"{start_batch}")
        self.stats = ReadStats()
        to_skip = start_batch * batch_size
        # Without skipping, every line is a sample, so resuming can skip raw lines unparsed.
        raw_skip = 0 if self.skip_bad_lines else to_skip
        drop = to_skip - raw_skip
        num_sparse = len(self.rows_S)
        pend = (np.zeros(0, np.float32), np.zeros((0, self.num_dense), np.float32),
                np.zeros((0, num_sparse), np.int32))
        for path, lineno0, block in self._blocks(raw_skip):
            parsed = parse_block(block, self.num_dense, self.rows_S)
            self._record_bad(path, lineno0, parsed.bad)
            self.stats.lines += parsed.num_lines
            self.stats.samples += len(parsed.label_N)
            new = (parsed.label_N, parsed.dense_NxD, parsed.ids_NxS)
            if drop:
                cut = min(drop, len(new[0]))
                new, drop = tuple(a[cut:] for a in new), drop - cut
            pend = tuple(np.concatenate([p, a]) for p, a in zip(pend, new, strict=True))
            n_full = len(pend[0]) // batch_size
            for i in range(n_full):
                yield self._batch(*pend, i * batch_size, (i + 1) * batch_size)
            pend = tuple(a[n_full * batch_size:] for a in pend)
        if len(pend[0]) and not self.drop_last:
            yield self._batch(*pend, 0, len(pend[0]))
        self._finish(to_skip)

    def _finish(self, skipped: int) -> None:
        if self.stats.num_bad:
            log.warning("Criteo TSV %s: %s", self.segments[0][0], self.stats.report())
        if self.stats.samples == 0 and skipped == 0:
            files = sorted({p for p, _, _ in self.segments})
            raise ValueError(f"no valid lines in {files} ({self.stats.lines} lines read, "
                             f"{self.stats.num_bad} malformed)")
