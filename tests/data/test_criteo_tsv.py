"""Tests of the Criteo TSV reader against a plain-Python reference parser."""

import gzip
import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoshard_jax.data import CriteoTSVReader, MalformedLineError, check_batch, criteo_tsv
from autoshard_jax.errors import DataError
from autoshard_jax.tables.spec import TableSpec
from autoshard_jax.train.prefetch import prefetch

ROWS = [10, 1000, 2**31 - 1]
D = 2  # dense features in the small hand-written files


def ref_parse(lines, rows, num_dense):
    """The obvious per-field Python parser: (label_N, dense_NxD, ids_NxS)."""
    labels, dense, ids = [], [], []
    for line in lines:
        f = line.rstrip("\n").split("\t")
        labels.append(float(f[0]))
        dense.append([np.log1p(float(max(int(x), 0))) if x else 0.0 for x in f[1:1 + num_dense]])
        cats = f[1 + num_dense:]
        ids.append([int(x, 16) % r if x else -1 for x, r in zip(cats, rows, strict=True)])
    return (np.array(labels, np.float32), np.array(dense, np.float64).astype(np.float32),
            np.array(ids, np.int64))


def concat(batches):
    return (np.concatenate([b["label"] for b in batches]),
            np.concatenate([b["dense"] for b in batches]),
            np.stack([np.concatenate([b["ids"][s][:, 0] for b in batches])
                      for s in range(len(batches[0]["ids"]))], axis=1))


def assert_matches(batches, lines, rows=ROWS, num_dense=D):
    want = ref_parse(lines, rows, num_dense)
    got = concat(batches)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


def make_lines(n, seed=0):
    rng = np.random.default_rng(seed)
    return [f"{rng.integers(2)}\t{rng.integers(-2, 500)}\t{rng.integers(0, 10**9)}\t"
            f"{rng.integers(0, 2**32):x}\t{rng.integers(0, 2**32):08X}\t"
            f"{rng.integers(0, 2**63):x}\n"
            for _ in range(n)]


def write(path, lines):
    path.write_text("".join(lines))
    return path


@pytest.fixture(params=[7, 1 << 22], ids=["tiny_reads", "big_reads"])
def read_bytes(request, monkeypatch):
    """Tiny reads put block boundaries inside lines, exercising carry-over and skipping."""
    monkeypatch.setattr(criteo_tsv, "_READ_BYTES", request.param)
    return request.param


HAND = [
    "1\t5\t0\t68fd1e64\t80e26c9b\tfb936136\n",
    "0\t\t-3\t\t0A\tFFFFFFFFFFFFFFFF\n",  # missing int, negative int, missing id, uppercase hex
    "0\t12345678901\t\t0\t\t1\n",
]


def test_hand_written_file_matches_reference(tmp_path, read_bytes):
    path = write(tmp_path / "day_0", HAND)
    tables = [TableSpec(f"c{i}", r, 4) for i, r in enumerate(ROWS)]
    batches = list(CriteoTSVReader(path, tables, num_dense=D, drop_last=False).batches(2))
    assert [len(b["label"]) for b in batches] == [2, 1]
    for b in batches:
        check_batch(b, tables, num_dense=D)
    assert_matches(batches, HAND)
    label, dense, ids = concat(batches)
    np.testing.assert_array_equal(dense[1], [0.0, 0.0])  # missing -> 0, negative clamps to 0
    np.testing.assert_array_equal(ids[1], [-1, 10, (2**64 - 1) % (2**31 - 1)])
    assert ids[0, 0] == 0x68FD1E64 % 10


def test_multi_hot_specs_get_padding_slots(tmp_path):
    path = write(tmp_path / "f.tsv", HAND)
    tables = [TableSpec("a", 10, 4, pooling_factor=2.5), TableSpec("b", 1000, 4),
              TableSpec("c", 2**31 - 1, 4)]
    (batch,) = CriteoTSVReader(path, tables, num_dense=D).batches(3)
    check_batch(batch, tables, num_dense=D)
    assert batch["ids"][0].shape == (3, 3) and np.all(batch["ids"][0][:, 1:] == -1)


def test_crlf_and_unterminated_last_line(tmp_path):
    path = tmp_path / "f.tsv"
    path.write_bytes("".join(HAND).replace("\n", "\r\n").rstrip("\r\n").encode())
    batches = list(CriteoTSVReader(path, ROWS, num_dense=D, drop_last=False).batches(2))
    assert_matches(batches, HAND)


def test_gzip_input(tmp_path):
    lines = make_lines(50)
    path = tmp_path / "day_0.gz"
    with gzip.open(path, "wt") as f:
        f.write("".join(lines))
    assert_matches(list(CriteoTSVReader(path, ROWS, num_dense=D).batches(10)), lines)


BAD = {
    "too_few_fields": ("1\t2\t3\t4\t5\n", "field_count", "has 5 tab-separated fields"),
    "too_many_fields": ("1\t2\t3\t4\t5\t6\t7\n", "field_count", "expected 6"),
    "blank_line": ("\n", "field_count", "has 1"),
    "label_2": ("2\t1\t1\ta\tb\tc\n", "label", "must be 0 or 1"),
    "label_missing": ("\t1\t1\ta\tb\tc\n", "label", "must be 0 or 1"),
    "int_word": ("1\tabc\t1\ta\tb\tc\n", "dense", "I1 (field 2) is not an integer: 'abc'"),
    "int_float": ("1\t1\t1.5\ta\tb\tc\n", "dense", "I2 (field 3)"),
    "int_lone_minus": ("1\t-\t1\ta\tb\tc\n", "dense", "I1"),
    "int_too_long": ("1\t1234567890123456789\t1\ta\tb\tc\n", "dense", "I1"),
    "hex_bad_char": ("1\t1\t1\ta\t12g4\tc\n", "categorical", "C2 (field 5)"),
    "hex_too_long": ("1\t1\t1\ta\tb\t" + "f" * 17 + "\n", "categorical", "C3"),
    "hex_space": ("1\t1\t1\ta \tb\tc\n", "categorical", "C1"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_malformed_line_raises_with_path_and_line(tmp_path, name):
    line, kind, detail = BAD[name]
    good = make_lines(4)
    path = write(tmp_path / "day_3", good[:2] + [line] + good[2:])
    reader = CriteoTSVReader(path, ROWS, num_dense=D)
    with pytest.raises(MalformedLineError) as err:
        list(reader.batches(2))
    assert f"{path}:3:" in str(err.value) and detail in str(err.value)
    assert err.value.kind == kind and err.value.lineno == 3 and isinstance(err.value, ValueError)


def test_skip_bad_lines_counts_and_reports(tmp_path, caplog, read_bytes):
    good = make_lines(10)
    bad = [BAD["label_2"][0], BAD["int_word"][0], BAD["blank_line"][0], BAD["int_float"][0]]
    lines = good[:3] + bad[:2] + good[3:7] + bad[2:] + good[7:]
    path = write(tmp_path / "f.tsv", lines)
    reader = CriteoTSVReader(path, ROWS, num_dense=D, skip_bad_lines=True, drop_last=False)
    with caplog.at_level(logging.WARNING):
        batches = list(reader.batches(4))
    assert_matches(batches, good)
    assert reader.stats.lines == 14 and reader.stats.samples == 10
    assert reader.stats.bad_lines == {"label": 1, "dense": 2, "field_count": 1}
    assert reader.stats.first_bad["dense"] == f"{path}:5"
    assert "4 bad lines skipped" in reader.stats.report() and "dense: 2" in caplog.text


def test_all_bad_lines_is_an_error(tmp_path):
    path = write(tmp_path / "f.tsv", [BAD["label_2"][0]] * 3)
    with pytest.raises(ValueError, match="no valid lines"):
        list(CriteoTSVReader(path, ROWS, num_dense=D, skip_bad_lines=True).batches(2))


def test_missing_and_empty_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        CriteoTSVReader(tmp_path / "nope.tsv", ROWS, num_dense=D)
    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(ValueError, match="empty.tsv' is empty"):
        CriteoTSVReader(tmp_path / "empty.tsv", ROWS, num_dense=D)
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match="no day files"):
        CriteoTSVReader(tmp_path / "d", ROWS, num_dense=D)


def test_directory_of_days_in_natural_order(tmp_path, read_bytes):
    days = [make_lines(5 + d, seed=d) for d in range(11)]
    (tmp_path / "days").mkdir()
    for d, lines in enumerate(days):
        write(tmp_path / "days" / f"day_{d}", lines)
    everything = [line for lines in days for line in lines]
    reader = CriteoTSVReader(tmp_path / "days", ROWS, num_dense=D, drop_last=False)
    assert_matches(list(reader.batches(7)), everything)  # batches span day boundaries
    picked = CriteoTSVReader(tmp_path / "days", ROWS, num_dense=D, days=[10, 2], drop_last=False)
    assert_matches(list(picked.batches(4)), days[10] + days[2])
    with pytest.raises(ValueError, match="day 11 out of range"):
        CriteoTSVReader(tmp_path / "days", ROWS, num_dense=D, days=[11])


def test_kaggle_seven_day_split(tmp_path, read_bytes):
    lines = make_lines(23)
    path = write(tmp_path / "train.txt", lines)
    train = CriteoTSVReader(path, ROWS, num_dense=D, kaggle_days=7, days=range(6))
    evaluation = CriteoTSVReader(path, ROWS, num_dense=D, kaggle_days=7, days=[6], drop_last=False)
    assert_matches(list(train.batches(5)), lines[:20])  # day sizes 4,4,3,3,3,3 | 3
    assert_matches(list(evaluation.batches(2)), lines[20:])
    middle = CriteoTSVReader(path, ROWS, num_dense=D, kaggle_days=7, days=[2], drop_last=False)
    assert_matches(list(middle.batches(10)), lines[8:11])


def test_kaggle_file_is_line_counted_once(tmp_path, monkeypatch):
    path = write(tmp_path / "train.txt", make_lines(23))
    counted = []
    real = criteo_tsv._line_blocks
    monkeypatch.setattr(criteo_tsv, "_line_blocks", lambda p: (counted.append(p), real(p))[1])
    train = CriteoTSVReader(path, ROWS, num_dense=D, kaggle_days=7, days=range(6))
    evaluation = CriteoTSVReader(path, ROWS, num_dense=D, kaggle_days=7, days=[6])
    assert len(counted) == 1
    assert train.segments[-1][2] == evaluation.segments[0][1] == 20
    with open(path, "a") as f:  # a changed file is counted again
        f.writelines(make_lines(5, seed=1))
    grown = CriteoTSVReader(path, ROWS, num_dense=D, kaggle_days=7, days=[6])
    assert len(counted) == 2 and grown.segments[0][2] == 28


def test_drop_last(tmp_path):
    path = write(tmp_path / "f.tsv", make_lines(10))
    assert [len(b["label"]) for b in CriteoTSVReader(path, ROWS, num_dense=D).batches(4)] == [4, 4]


@pytest.mark.parametrize("skip_bad", [False, True])
@pytest.mark.parametrize("source", ["days", "kaggle"])
def test_resume_matches_full_read(tmp_path, read_bytes, skip_bad, source):
    lines = make_lines(40)
    if skip_bad:
        lines = lines[:9] + [BAD["int_word"][0]] + lines[9:]
    if source == "days":
        (tmp_path / "days").mkdir()
        for d, chunk in enumerate([lines[:6], lines[6:13], lines[13:14], lines[14:]]):
            write(tmp_path / "days" / f"day_{d}", chunk)
        kwargs = dict(path=tmp_path / "days", days=[0, 1, 2, 3])
    else:
        kwargs = dict(path=write(tmp_path / "k.tsv", lines), kaggle_days=7, days=[1, 2, 3, 4, 5])
    reader = CriteoTSVReader(tables=ROWS, num_dense=D, skip_bad_lines=skip_bad, drop_last=False,
                             **kwargs)
    full = list(reader.batches(3))
    for start in range(len(full) + 2):
        resumed = list(reader.batches(3, start_batch=start))
        assert len(resumed) == max(0, len(full) - start)
        for a, b in zip(resumed, full[start:], strict=True):
            assert concat([a])[2].tolist() == concat([b])[2].tolist()
            np.testing.assert_array_equal(a["dense"], b["dense"])
            np.testing.assert_array_equal(a["label"], b["label"])


@pytest.mark.parametrize("source", ["days", "kaggle"])
def test_resume_by_stored_line_skips_without_parsing(tmp_path, read_bytes, source):
    lines = make_lines(40)
    lines = lines[:9] + [BAD["int_word"][0]] + lines[9:20] + [BAD["int_word"][0]] + lines[20:]
    if source == "days":
        (tmp_path / "days").mkdir()
        for d, chunk in enumerate([lines[:6], lines[6:13], lines[13:14], lines[14:]]):
            write(tmp_path / "days" / f"day_{d}", chunk)
        kwargs = dict(path=tmp_path / "days", days=[0, 1, 2, 3])
        total = len(lines)
    else:
        kwargs = dict(path=write(tmp_path / "k.tsv", lines), kaggle_days=7, days=[1, 2, 3, 4, 5])
        total = sum(len(a) for a in np.array_split(np.arange(len(lines)), 7)[1:6])
    reader = CriteoTSVReader(tables=ROWS, num_dense=D, skip_bad_lines=True, drop_last=False,
                             **kwargs)
    full, ends = [], [reader.resume_line(0)]
    for batch in reader.batches(3):
        full.append(batch)
        ends.append(reader.resume_line(len(full)))
    assert ends[0] == 0 and ends[-1] == total and ends == sorted(ends)
    for start in range(len(full) + 1):
        resumed = list(reader.batches(3, start_batch=start, start_line=ends[start]))
        assert reader.stats.lines == total - ends[start]  # nothing before the offset parsed
        assert len(resumed) == len(full) - start
        for a, b in zip(resumed, full[start:], strict=True):
            assert concat([a])[2].tolist() == concat([b])[2].tolist()
            np.testing.assert_array_equal(a["label"], b["label"])
        # A pass that re-parses to the resume point notes the same offset there.
        list(reader.batches(3, start_batch=start))
        if start < len(full):
            assert reader.resume_line(start) == ends[start]


hex_field = st.one_of(st.just(""), st.integers(0, 2**64 - 1).map(lambda v: f"{v:x}"),
                      st.integers(0, 2**32).map(lambda v: f"{v:08X}"))
int_field = st.one_of(st.just(""), st.integers(-(10**18) + 1, 10**18 - 1).map(str))
line_strategy = st.tuples(st.sampled_from("01"), st.lists(int_field, min_size=3, max_size=3),
                          st.lists(hex_field, min_size=2, max_size=2)).map(
    lambda t: "\t".join([t[0], *t[1], *t[2]]) + "\n")


@settings(max_examples=40, deadline=None)
@given(lines=st.lists(line_strategy, min_size=1, max_size=30), batch_size=st.integers(1, 8),
       rows=st.lists(st.integers(1, 2**31 - 1), min_size=2, max_size=2))
def test_random_valid_lines_round_trip(tmp_path_factory, lines, batch_size, rows):
    path = write(tmp_path_factory.mktemp("h") / "f.tsv", lines)
    reader = CriteoTSVReader(path, rows, num_dense=3, drop_last=False)
    batches = list(reader.batches(batch_size))
    assert_matches(batches, lines, rows=rows, num_dense=3)
    assert reader.stats.samples == len(lines)


def test_day_directory_reads_only_day_numbered_files(tmp_path, caplog):
    days = [make_lines(5 + d, seed=d) for d in range(3)]
    (tmp_path / "days").mkdir()
    for d, lines in enumerate(days):
        write(tmp_path / "days" / f"day_{d}", lines)
    write(tmp_path / "days" / "README.txt", ["About these files.\n"])
    write(tmp_path / "days" / "day_1.old", make_lines(3, seed=9))
    (tmp_path / "days" / "sub").mkdir()
    write(tmp_path / "days" / ".hidden", ["x\n"])
    with caplog.at_level(logging.WARNING):
        reader = CriteoTSVReader(tmp_path / "days", ROWS, num_dense=D, days=[2], drop_last=False)
    assert_matches(list(reader.batches(4)), days[2])  # "day 2" is day_2, whatever else is there
    assert "README.txt, day_1.old, sub" in caplog.text and ".hidden" not in caplog.text
    everything = CriteoTSVReader(tmp_path / "days", ROWS, num_dense=D, drop_last=False)
    assert everything.available_days == [0, 1, 2]
    assert_matches(list(everything.batches(4)), days[0] + days[1] + days[2])


def test_day_numbers_come_from_names(tmp_path):
    (tmp_path / "d").mkdir()
    a, b = make_lines(4, seed=1), make_lines(6, seed=2)
    write(tmp_path / "d" / "day-5.tsv", b)
    with gzip.open(tmp_path / "d" / "0.gz", "wt") as f:
        f.write("".join(a))
    reader = CriteoTSVReader(tmp_path / "d", ROWS, num_dense=D, days=[5, 0], drop_last=False)
    assert_matches(list(reader.batches(3)), b + a)
    with pytest.raises(DataError, match=r"day 1-2 out of range: .* 2 day\(s\), numbered 0, 5"):
        CriteoTSVReader(tmp_path / "d", ROWS, num_dense=D, days=[0, 1, 2])
    write(tmp_path / "d" / "day_5", b)
    with pytest.raises(DataError, match="day-5.tsv and day_5 are both day 5"):
        CriteoTSVReader(tmp_path / "d", ROWS, num_dense=D)


def test_single_file_is_one_day(tmp_path):
    path = write(tmp_path / "train.txt", make_lines(10))
    with pytest.raises(DataError, match="day 1 out of range.*unless kaggle_days"):
        CriteoTSVReader(path, ROWS, num_dense=D, days=[0, 1])


def _truncated_gz(path, lines, keep=0.5):
    with gzip.open(path, "wt") as f:
        f.write("".join(lines))
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    return path


@pytest.mark.parametrize("read_bytes", [7, 1 << 22], indirect=True)
def test_truncated_gzip_names_file_and_last_good_line(tmp_path, read_bytes):
    lines = make_lines(3000)
    path = _truncated_gz(tmp_path / "day_0.gz", lines)
    got = []
    with pytest.raises(DataError, match=r"day_0\.gz: corrupt or truncated compressed file after "
                       r"line (\d+)") as err:
        for b in CriteoTSVReader(path, ROWS, num_dense=D).batches(1):
            got.append(b)
    last_good = int(err.value.args[0].split("after line ")[1].split()[0])
    assert 0 < last_good < 3000 and len(got) == last_good  # every good line was delivered
    assert_matches(got, lines[:last_good])
    assert isinstance(err.value.__cause__, EOFError)


def test_truncated_gzip_in_a_directory_fails_in_the_prefetch_thread_naming_the_file(tmp_path):
    (tmp_path / "days").mkdir()
    write(tmp_path / "days" / "day_0", make_lines(20))
    _truncated_gz(tmp_path / "days" / "day_1.gz", make_lines(3000, seed=1))
    reader = CriteoTSVReader(tmp_path / "days", ROWS, num_dense=D)
    with pytest.raises(DataError, match=r"days/day_1\.gz: corrupt or truncated .* after line"):
        for _ in prefetch(reader.batches(8), place=lambda b: b):
            pass


def test_gzip_crc_mismatch_is_named(tmp_path):
    path = tmp_path / "day_0.gz"
    with gzip.open(path, "wt") as f:
        f.write("".join(make_lines(50)))
    data = bytearray(path.read_bytes())
    data[-8] ^= 0xFF  # the trailer's CRC32
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"day_0\.gz: corrupt .* after line 50 .*CRC check failed"):
        list(CriteoTSVReader(path, ROWS, num_dense=D).batches(10))


def test_not_a_gzip_file_is_named(tmp_path):
    path = write(tmp_path / "day_0.gz", make_lines(3))
    with pytest.raises(DataError, match=r"day_0\.gz: corrupt or truncated .*Not a gzipped file"):
        CriteoTSVReader(path, ROWS, num_dense=D)


@pytest.mark.parametrize("skip_bad", [False, True])
def test_less_than_one_batch_says_how_much_there_is(tmp_path, skip_bad):
    lines = make_lines(3) + ([BAD["int_word"][0]] if skip_bad else [])
    path = write(tmp_path / "f.tsv", lines)
    reader = CriteoTSVReader(path, ROWS, num_dense=D, skip_bad_lines=skip_bad)
    with pytest.raises(DataError, match="f.tsv holds 3 samples, fewer than one batch of 4"):
        next(reader.batches(4))
    assert len(list(reader.batches(4, start_batch=1))) == 0  # resuming past the end: no error
    assert len(list(reader.batches(3))) == 1


# Published per-feature cardinalities, typed in from their sources rather than from our constants:
# Criteo Kaggle (Display Advertising Challenge) train.txt, as in facebookresearch/dlrm's
# `--arch-embedding-size` for Kaggle; Criteo 1TB (days 0-23) unclipped counts, and MLPerf
# DLRM-DCNv2 (torchrec `--num_embeddings_per_feature`), which caps each at 40M rows.
PUBLISHED_KAGGLE = [1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593,
                    3194, 27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105,
                    142572]
PUBLISHED_1TB_RAW = [227605432, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 130229467, 3067956,
                     405282, 10, 2209, 11938, 155, 4, 976, 14, 292775614, 40790948, 187188510,
                     590152, 12973, 108, 36]


def test_criteo_cardinalities_match_the_published_values():
    from autoshard_jax.tables.spec import CRITEO_1TB_MLPERF_ROWS, CRITEO_KAGGLE_ROWS
    assert list(CRITEO_KAGGLE_ROWS) == PUBLISHED_KAGGLE
    assert list(CRITEO_1TB_MLPERF_ROWS) == [min(r, 40_000_000) for r in PUBLISHED_1TB_RAW]
