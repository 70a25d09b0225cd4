"""Streaming, resumable reader of Criteo TSV click logs (Kaggle and 1TB layouts).

A line is `label \\t I1..I13 \\t C1..C26` (counts configurable). Missing integers become 0 and
negative ones are clamped to 0 before log1p (as the public DLRM does); a missing categorical becomes
the padding id -1; a present one is int(hex, 16) mod the table's rows.

Layouts: a directory of day files is one day per file, and day d is the file whose name carries
the number d (`day_0`, `day_1.gz`, `day-2.tsv`, `3.txt`); any other entry (a README, a stray copy)
is listed in a warning and never read as a day. A single file is one day, or `kaggle_days` equal
consecutive chunks of it (the Kaggle convention: train on days 0-5, evaluate on day 6). Selected
days are read in order as one stream.

Malformed lines raise MalformedLineError naming file and line; with skip_bad_lines=True they are
counted per reason in `stats` and a warning is logged when the stream ends. Nothing malformed is
silently turned into a value. A corrupt or truncated .gz file, too little data for one batch and
days that are not there are `DataError`s that name the file (and the last good line) or say how
much data there is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import gzip
import logging
import os
import re
import zlib
from collections.abc import Iterator, Sequence

import numpy as np

from autoshard_jax.data.batch import Batch
from autoshard_jax.data.tsv_parse import parse_block
from autoshard_jax.errors import DataError, InputError
from autoshard_jax.tables.spec import TableSpec

log = logging.getLogger(__name__)

_READ_BYTES = 1 << 22
# Batch end lines remembered for `resume_line`: enough for any prefetch depth.
_RESUME_LINES_KEPT = 1024


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


# A day file's name: an optional "day" prefix, the day number, optional .tsv/.txt/.csv and .gz.
_DAY_NAME = re.compile(r"(?:day[_-]?)?(\d+)(?:\.(?:tsv|txt|csv))?(?:\.gz)?", re.IGNORECASE)
_DECODE_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)


def _span(numbers: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5": a list of day numbers as a person would write it."""
    parts, run = [], []
    for n in sorted(numbers):
        if run and n != run[-1] + 1:
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
            run = []
        run.append(n)
    if run:
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ", ".join(parts) or "none"


def day_files(directory: str) -> dict[int, str]:
    """Day number -> path for the day files of a directory, by the numbers in their names.

    Hidden entries are ignored; any other entry that is not a file named like a day is listed in
    a warning (never read as a day). Two files with one day number are an error.
    """
    days: dict[int, str] = {}
    ignored = []
    for name in sorted(os.listdir(directory)):
        if name.startswith("."):
            continue
        full = os.path.join(directory, name)
        match = _DAY_NAME.fullmatch(name)
        if match is None or not os.path.isfile(full):
            ignored.append(name)
            continue
        d = int(match.group(1))
        if d in days:
            raise DataError(f"{directory}: {os.path.basename(days[d])} and {name} are both day "
                            f"{d}; keep one of them")
        days[d] = full
    if not days:
        raise DataError(f"directory {directory!r} holds no day files (named like day_0, "
                        f"day_1.gz, 2.tsv){'; found: ' + ', '.join(ignored) if ignored else ''}")
    if ignored:
        log.warning("Criteo TSV directory %s: ignoring %d entries whose names carry no day number "
                    "(day files are named like day_0, day_1.gz): %s", directory, len(ignored),
                    ", ".join(ignored))
    return dict(sorted(days.items()))


@contextlib.contextmanager
def _decoding(path: str, good_lines: list[int]):
    """Turns a corrupt or truncated compressed file into a DataError naming it and its last good
    line (`good_lines[0]`: complete lines read so far)."""
    try:
        yield
    except _DECODE_ERRORS as exc:
        raise DataError(f"{path}: corrupt or truncated compressed file after line {good_lines[0]} "
                        f"(the last complete line) ({type(exc).__name__}: {exc}); re-download or "
                        "re-compress it") from exc


def _open(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _chunks(f) -> Iterator[bytes]:
    """Chunks of about _READ_BYTES. On a decode error the bytes decoded before it come out first
    (a plain `read` would drop them), so the error can name the true last good line."""
    parts, size = [], 0
    try:
        while chunk := f.read1(_READ_BYTES - size):
            parts.append(chunk)
            size += len(chunk)
            if size >= _READ_BYTES:
                yield b"".join(parts)
                parts, size = [], 0
    except _DECODE_ERRORS:
        if parts:
            yield b"".join(parts)
        raise
    if parts:
        yield b"".join(parts)


def _line_blocks(path: str) -> Iterator[bytes]:
    """Blocks of complete lines, each ending in b"\\n" (added to an unterminated last line)."""
    good = [0]
    with _decoding(path, good), _open(path) as f:
        rest = b""
        for block in _chunks(f):
            block = rest + block
            cut = block.rfind(b"\n") + 1
            rest = block[cut:]
            if cut:
                out = block[:cut].replace(b"\r\n", b"\n")
                good[0] += out.count(b"\n")
                yield out
        if rest:
            yield rest.replace(b"\r\n", b"\n") + b"\n"


def _split_after_lines(block: bytes, k: int) -> int:
    """Byte offset just after the k-th line of a block (0 < k <= lines in block)."""
    nl = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 10)
    return int(nl[k - 1]) + 1


# (path, size, mtime_ns) -> lines: a Kaggle file is counted once per process, not once per reader
# (the train and eval readers of one run split the same file).
_LINE_COUNTS: dict[tuple[str, int, int], int] = {}


def _count_lines(path: str) -> int:
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _LINE_COUNTS:
        _LINE_COUNTS[key] = sum(block.count(b"\n") for block in _line_blocks(path))
    return _LINE_COUNTS[key]


def _is_empty(path: str) -> bool:
    with _decoding(path, [0]), _open(path) as f:
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
            raise FileNotFoundError(errno.ENOENT, "Criteo TSV path does not exist", path)
        if not tables:
            raise InputError("need at least one table (one per categorical feature)")
        rows = [t.rows if isinstance(t, TableSpec) else int(t) for t in tables]
        if any(r < 1 or r >= 2**31 for r in rows):
            raise InputError(f"table rows must be in [1, 2**31), got {rows}")
        self.path = path
        self.rows_S = np.array(rows, dtype=np.int64)
        self.hotness_S = [t.hotness if isinstance(t, TableSpec) else 1 for t in tables]
        self.num_dense = num_dense
        self.skip_bad_lines = skip_bad_lines
        self.drop_last = drop_last
        self.stats = ReadStats()
        self._line_after: dict[int, int] = {}

        if os.path.isdir(path):
            if kaggle_days is not None:
                raise InputError(f"kaggle_days splits a single file; {path!r} is a directory of "
                                 "day files")
            all_days = {d: (f, 0, None) for d, f in day_files(path).items()}
        else:
            all_days = {0: (path, 0, None)}
        if kaggle_days is not None:
            if kaggle_days < 1:
                raise InputError(f"kaggle_days must be >= 1, got {kaggle_days}")
            n = 0 if _is_empty(path) else _count_lines(path)
            if n < kaggle_days:
                raise DataError(f"{path!r} has {n} lines, fewer than kaggle_days={kaggle_days}")
            # np.array_split sizes: the first n % k days get one extra line.
            bounds = np.cumsum([0] + [len(a) for a in np.array_split(np.arange(n), kaggle_days)])
            all_days = {d: (path, int(bounds[d]), int(bounds[d + 1])) for d in range(kaggle_days)}
        #: The day numbers this path holds (a directory's may have gaps).
        self.available_days = sorted(all_days)
        if days is None:
            days = self.available_days
        missing = [d for d in days if d not in all_days]
        if missing:
            hint = "" if len(all_days) > 1 or os.path.isdir(path) else (
                " (a single file is one day unless kaggle_days splits it)")
            raise DataError(f"day {_span(missing)} out of range: {path!r} holds "
                            f"{len(all_days)} day(s), numbered {_span(all_days)}{hint}")
        self.days = list(days)
        self.segments = [all_days[d] for d in days]
        for f in sorted({f for f, _, _ in self.segments}):
            if _is_empty(f):
                raise DataError(f"Criteo TSV file {f!r} is empty")

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
                raise DataError(f"{path!r} ended {limit} lines before its day did (the file "
                                "changed since the run started?)")
            skip_lines = skip  # a day file shorter than the resume offset passes the rest on

    def _record_bad(self, path: str, lineno0: int, bad) -> None:
        for b in bad:
            if not self.skip_bad_lines:
                raise MalformedLineError(path, lineno0 + b.offset, b.kind, b.detail)
            self.stats.bad_lines[b.kind] = self.stats.bad_lines.get(b.kind, 0) + 1
            self.stats.first_bad.setdefault(b.kind, f"{path}:{lineno0 + b.offset}")

    def _batch(self, label_N, dense_NxQ, ids_NxS, lo: int, hi: int) -> Batch:
        ids = []
        for s, h in enumerate(self.hotness_S):
            ids_BxH = np.full((hi - lo, h), -1, dtype=np.int32)
            ids_BxH[:, 0] = ids_NxS[lo:hi, s]
            ids.append(ids_BxH)
        return {"dense": dense_NxQ[lo:hi].copy(), "ids": tuple(ids), "label": label_N[lo:hi].copy()}

    def batches(self, batch_size: int, start_batch: int = 0,
                start_line: int | None = None,
                rows: tuple[int, int] | None = None) -> Iterator[Batch]:
        """Batches from batch number `start_batch` on; resuming at k yields what a full read
        yields from its k-th batch. Resets `stats` to this pass (a resumed pass counts from
        where it starts).

        Args:
          batch_size: samples per batch.
          start_batch: the first batch to yield.
          start_line: `resume_line(start_batch)` of an earlier pass, if known: the lines before
            it are skipped unparsed. Without it, a reader that skips bad lines must parse every
            line up to the resume point to know which ones held samples.
          rows: (lo, hi): yield only samples lo..hi-1 of each batch, parsing only their lines
            (one process's slice of a global batch; see `_row_slices`).
        """
        if batch_size < 1 or start_batch < 0:
            raise InputError(f"need batch_size >= 1, start_batch >= 0; got {batch_size}, "
                             f"{start_batch}")
        if rows is not None:
            yield from self._row_slices(batch_size, start_batch, *rows)
            return
        self.stats = ReadStats()
        self._line_after = {}
        to_skip = start_batch * batch_size
        # Without skipping, every line is a sample, so resuming can skip raw lines unparsed.
        if start_line is not None:
            raw_skip = start_line
        else:
            raw_skip = 0 if self.skip_bad_lines else to_skip
        drop = 0 if start_line is not None else to_skip - raw_skip
        num_sparse = len(self.rows_S)
        # label, dense, ids, and the stream line number of each pending sample.
        pend = (np.zeros(0, np.float32), np.zeros((0, self.num_dense), np.float32),
                np.zeros((0, num_sparse), np.int32), np.zeros(0, np.int64))
        yielded, line0 = 0, raw_skip
        if not drop:
            self._line_after[start_batch] = raw_skip
        for path, lineno0, block in self._blocks(raw_skip):
            parsed = parse_block(block, self.num_dense, self.rows_S)
            self._record_bad(path, lineno0, parsed.bad)
            self.stats.lines += parsed.num_lines
            self.stats.samples += len(parsed.label_N)
            good_N = np.setdiff1d(np.arange(parsed.num_lines), [b.offset for b in parsed.bad])
            new = (parsed.label_N, parsed.dense_NxQ, parsed.ids_NxS, line0 + good_N)
            line0 += parsed.num_lines
            if drop:
                cut = min(drop, len(new[0]))
                if cut == drop:
                    self._line_after[start_batch] = int(new[3][cut - 1]) + 1
                new, drop = tuple(a[cut:] for a in new), drop - cut
            pend = tuple(np.concatenate([p, a]) for p, a in zip(pend, new, strict=True))
            n_full = len(pend[0]) // batch_size
            for i in range(n_full):
                self._note_end(start_batch + yielded + i + 1, pend[3][(i + 1) * batch_size - 1])
                yield self._batch(*pend[:3], i * batch_size, (i + 1) * batch_size)
            pend = tuple(a[n_full * batch_size:] for a in pend)
            yielded += n_full
        if len(pend[0]) and not self.drop_last:
            self._note_end(start_batch + yielded + 1, pend[3][-1])
            yield self._batch(*pend[:3], 0, len(pend[0]))
            yielded += 1
        self._finish(to_skip, yielded, batch_size)

    def _row_slices(self, batch_size: int, start_batch: int, lo: int,
                    hi: int) -> Iterator[Batch]:
        """Samples lo..hi-1 of every batch: batch k is stream lines k*B .. k*B + B - 1, so a
        process's rows are disjoint line ranges, and only those lines are parsed.

        Every line must be a sample (no `skip_bad_lines`: which lines a batch holds would
        depend on lines other processes parse). A final short batch (drop_last=False) yields
        this slice's part of it, possibly empty, so every process yields as many batches.
        """
        if self.skip_bad_lines:
            raise InputError("a row slice of each batch (multi-process input) needs every line "
                             "to be a sample; set skip_bad_lines=False")
        if not 0 <= lo < hi <= batch_size:
            raise InputError(f"rows ({lo}, {hi}) is not a non-empty range of [0, {batch_size})")
        self.stats = ReadStats()
        self._line_after = {}
        num_sparse = len(self.rows_S)
        # label, dense, ids and the batch number of each pending sample of this slice.
        pend = (np.zeros(0, np.float32), np.zeros((0, self.num_dense), np.float32),
                np.zeros((0, num_sparse), np.int32), np.zeros(0, np.int64))
        line0 = start_batch * batch_size
        batch = start_batch  # the next batch to yield
        for path, lineno0, block in self._blocks(line0):
            nl_K = np.flatnonzero(np.frombuffer(block, np.uint8) == 10)
            k = nl_K.size
            pos_K = (line0 + np.arange(k)) % batch_size
            keep_K = np.flatnonzero((pos_K >= lo) & (pos_K < hi))
            if keep_K.size:
                begin_K = np.concatenate([[0], nl_K[:-1] + 1])
                # Runs of consecutive kept lines, each one contiguous byte range.
                cut = np.flatnonzero(np.diff(keep_K) > 1)
                firsts, lasts = keep_K[np.r_[0, cut + 1]], keep_K[np.r_[cut, keep_K.size - 1]]
                data = b"".join(block[begin_K[a]:nl_K[z] + 1]
                                for a, z in zip(firsts, lasts, strict=True))
                parsed = parse_block(data, self.num_dense, self.rows_S)
                for b in parsed.bad:
                    raise MalformedLineError(path, lineno0 + int(keep_K[b.offset]), b.kind,
                                             b.detail)
                self.stats.lines += parsed.num_lines
                self.stats.samples += parsed.num_lines
                new = (parsed.label_N, parsed.dense_NxQ, parsed.ids_NxS,
                       (line0 + keep_K) // batch_size)
                pend = tuple(np.concatenate([p, a]) for p, a in zip(pend, new, strict=True))
            line0 += k
            while (batch + 1) * batch_size <= line0:  # batch `batch` is complete
                n = int(np.sum(pend[3] == batch))
                yield self._batch(*pend[:3], 0, n)
                pend = tuple(a[n:] for a in pend)
                batch += 1
        if line0 > batch * batch_size and not self.drop_last:
            yield self._batch(*pend[:3], 0, len(pend[0]))
            batch += 1
        if batch == 0 and start_batch == 0:
            raise DataError(f"{self.describe()} holds {line0} samples, fewer than one batch of "
                            f"{batch_size}")

    def _note_end(self, batches_done: int, last_line: int) -> None:
        self._line_after[batches_done] = int(last_line) + 1
        self._line_after.pop(batches_done - _RESUME_LINES_KEPT, None)

    def resume_line(self, batches_done: int) -> int | None:
        """The stream line just after the last sample of the first `batches_done` batches of the
        current pass (None if that batch is not among the last few produced): store it with a
        checkpoint and pass it as `batches(start_line=...)` to resume without re-parsing."""
        return 0 if batches_done == 0 else self._line_after.get(batches_done)

    def describe(self) -> str:
        """The file or directory and the selected days, for messages."""
        return f"{self.path} (day {_span(self.days)})" if len(self.available_days) > 1 \
            else self.path

    def _finish(self, skipped: int, yielded: int, batch_size: int) -> None:
        if self.stats.num_bad:
            log.warning("Criteo TSV %s: %s", self.describe(), self.stats.report())
        if self.stats.samples == 0 and skipped == 0:
            raise DataError(f"no valid lines in {self.describe()} ({self.stats.lines} lines read, "
                            f"{self.stats.num_bad} malformed)")
        if yielded == 0 and skipped == 0:
            raise DataError(f"{self.describe()} holds {self.stats.samples} samples, fewer than one "
                            f"batch of {batch_size}")
