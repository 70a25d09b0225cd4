"""The MovieLens-100k reader on rows written here in the recbole atomic-file format."""

import glob
import os

import numpy as np
import pytest

from autoshard_jax.errors import DataError
from fgd import movielens

WEEK = 7 * 86400
T0 = 874724710  # ml-100k's first timestamp

ITEM = ("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "1\tToy Story\t1995\tAnimation Children's Comedy\n"
        "2\tGoldenEye\t1995\tAction Adventure Thriller\n"
        "3\tFour Rooms\t1995\tThriller\n")
USER = ("user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
        "1\t24\tM\ttechnician\t85711\n2\t53\tF\tother\t94043\n")


def _inter(rows):
    head = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    return head + "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows)


def test_parse_labels_features_history_and_periods():
    rows = [(1, 1, 5, T0 + 10), (2, 3, 2, T0), (1, 2, 4, T0 + WEEK + 1),
            (1, 3, 3, T0 + 2 * WEEK + 1), (2, 1, 4, T0 + 2 * WEEK + 2),
            (1, 1, 1, T0 + 2 * WEEK + 3)]
    ml = movielens.parse(_inter(rows), ITEM, USER, history=2)
    b = ml.batch
    # Time order: (2,3) first, then (1,1), (1,2), (1,3), (2,1), (1,1).
    np.testing.assert_array_equal(b["ids"][0][:, 0], [1, 0, 0, 0, 1, 0])
    np.testing.assert_array_equal(b["ids"][1][:, 0], [2, 0, 1, 2, 0, 0])
    np.testing.assert_array_equal(b["label"], [0, 1, 1, 0, 1, 0])
    np.testing.assert_array_equal(ml.period_N, [0, 0, 1, 2, 2, 2])
    assert ml.num_periods == 3
    # History: earlier positives only, newest first, -1 padded.
    np.testing.assert_array_equal(b["ids"][3], [[-1, -1], [-1, -1], [0, -1], [1, 0], [-1, -1],
                                                [1, 0]])
    genres = b["ids"][2]
    assert (genres[1] >= 0).sum() == 3 and (genres[0] >= 0).sum() == 1  # Toy Story; Four Rooms
    np.testing.assert_array_equal(b["ids"][4][:, 0], [1, 0, 0, 0, 1, 0])  # gender F
    assert ml.vocab["user"] == 2 and ml.vocab["item"] == 3
    assert b["ids"][1].dtype == np.int32 and b["dense"].shape == (6, 0)
    assert movielens.parse(_inter(rows), ITEM, USER).period(2)["label"].tolist() == [0, 1, 0]


def test_31_weekly_periods_from_files_in_a_directory(tmp_path):
    rows = [(1 + w % 2, 1 + w % 3, 3 + w % 3, T0 + w * WEEK + 100) for w in range(31)]
    for ext, text in (("inter", _inter(rows)), ("item", ITEM), ("user", USER)):
        (tmp_path / f"ml-100k.{ext}").write_text(text)
    ml = movielens.load(str(tmp_path))
    assert ml.num_periods == 31
    assert [len(ml.period(t)["label"]) for t in range(31)] == [1] * 31


def test_bad_files_name_file_and_line():
    with pytest.raises(DataError, match=r"ml-100k.inter:1: header lacks"):
        movielens.parse("user_id:token\titem_id:token\n1\t2\n", ITEM, USER)
    with pytest.raises(DataError, match=r"ml-100k.inter:3: 3 fields"):
        movielens.parse(_inter([(1, 1, 5, T0)]) + "1\t2\t3\n", ITEM, USER)
    with pytest.raises(DataError, match="non-numeric"):
        movielens.parse(_inter([(1, 1, "x", T0)]), ITEM, USER)


def test_real_wheel_gives_31_periods_when_present():
    cache = os.path.expanduser("~/.cache/autoshard_jax/recbole")
    wheels = glob.glob(os.path.join(cache, "recbole-1.2.1-*.whl"))
    if not wheels:
        pytest.skip(f"the recbole wheel is not in {cache} (fetched by the study at run time)")
    ml = movielens.load(wheels[0])
    assert ml.num_periods == 31 and len(ml.batch["label"]) == 100000
    assert abs(float(ml.batch["label"].mean()) - 0.554) < 0.01
