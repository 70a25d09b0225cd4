"""MovieLens-100k as 31 weekly periods, read from the recbole==1.2.1 wheel's example files.

The data's licence forbids redistribution, so nothing is committed: at run time the wheel is
fetched with pip into a cache directory and the atomic files (`ml-100k.inter`, `.item`, `.user`,
tab-separated with a typed header such as `user_id:token`) are read straight from the zip. A
directory holding those three files works the same way (the tests write a few rows themselves).

Rows follow the ASMG protocol: sorted by timestamp, label = rating >= 4, features user / item /
genres / gender / age bucket / occupation and the user's last `history` positively rated items
*before* this row (so a row never sees its own or a later label).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import subprocess
import sys
import zipfile

import numpy as np

from autoshard_jax.data.batch import Batch
from autoshard_jax.errors import DataError

WHEEL = "recbole==1.2.1"
PREFIX = "recbole/dataset_example/ml-100k/ml-100k"
WEEK_SECONDS = 7 * 86400
AGE_EDGES = (18, 25, 35, 45, 50, 56)
MAX_GENRES = 6


@dataclasses.dataclass
class MovieLens:
    """Rows in time order plus their period (week) index; vocabulary sizes per feature."""

    batch: Batch  # ids: user, item, genres [N, MAX_GENRES], history [N, H], gender, age, occ
    period_N: np.ndarray
    vocab: dict[str, int]

    @property
    def num_periods(self) -> int:
        return int(self.period_N.max()) + 1

    def period(self, t: int) -> Batch:
        rows = np.flatnonzero(self.period_N == t)
        b = self.batch
        return {"dense": b["dense"][rows], "ids": tuple(i[rows] for i in b["ids"]),
                "label": b["label"][rows]}


def _table(text: str, name: str, columns: tuple[str, ...]) -> list[list[str]]:
    """Rows of an atomic file whose header names `columns` (types stripped), in that order."""
    lines = text.splitlines()
    if not lines:
        raise DataError(f"{name}: empty file")
    header = [h.split(":")[0] for h in lines[0].split("\t")]
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(f"{name}:1: header lacks columns {missing} (got {header})")
    index = [header.index(c) for c in columns]
    rows = []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise DataError(f"{name}:{lineno}: {len(fields)} fields, header has {len(header)}")
        rows.append([fields[i] for i in index])
    if not rows:
        raise DataError(f"{name}: no data rows")
    return rows


def parse(inter: str, item: str, user: str, history: int = 30, name: str = "ml-100k") -> MovieLens:
    """Builds the period rows from the three files' text."""
    inter_rows = _table(inter, f"{name}.inter", ("user_id", "item_id", "rating", "timestamp"))
    try:
        u_raw = [r[0] for r in inter_rows]
        i_raw = [r[1] for r in inter_rows]
        rating_N = np.array([float(r[2]) for r in inter_rows])
        ts_N = np.array([int(float(r[3])) for r in inter_rows], dtype=np.int64)
    except ValueError as e:
        raise DataError(f"{name}.inter: non-numeric rating or timestamp ({e})") from None
    users = {u: k for k, u in enumerate(sorted(set(u_raw), key=_natural))}
    items = {i: k for k, i in enumerate(sorted(set(i_raw), key=_natural))}
    genre_vocab: dict[str, int] = {}
    item_genres = np.full((len(items), MAX_GENRES), -1, np.int32)
    for item_id, genres in _table(item, f"{name}.item", ("item_id", "class")):
        if item_id in items:
            for k, g in enumerate(genres.split()[:MAX_GENRES]):
                item_genres[items[item_id], k] = genre_vocab.setdefault(g, len(genre_vocab))
    occ_vocab: dict[str, int] = {}
    user_feats = np.zeros((len(users), 3), np.int32)  # gender, age bucket, occupation
    for user_id, age, gender, occ in _table(user, f"{name}.user",
                                            ("user_id", "age", "gender", "occupation")):
        if user_id in users:
            try:
                bucket = int(np.searchsorted(AGE_EDGES, int(age), side="right"))
            except ValueError:
                raise DataError(f"{name}.user: age {age!r} of user {user_id} is not an integer") \
                    from None
            user_feats[users[user_id]] = (gender == "F", bucket,
                                          occ_vocab.setdefault(occ, len(occ_vocab)))
    order_N = np.argsort(ts_N, kind="stable")
    user_N = np.array([users[u] for u in u_raw], np.int32)[order_N]
    item_N = np.array([items[i] for i in i_raw], np.int32)[order_N]
    label_N = (rating_N[order_N] >= 4).astype(np.float32)
    ts_N = ts_N[order_N]
    hist_NxH = np.full((len(order_N), history), -1, np.int32)
    recent: dict[int, list[int]] = {}
    for n in range(len(order_N)):  # the history holds earlier rows only
        past = recent.setdefault(int(user_N[n]), [])
        if past:
            hist_NxH[n, :len(past[-history:])] = past[-history:][::-1]
        if label_N[n] > 0:
            past.append(int(item_N[n]))
    feats_Nx3 = user_feats[user_N]
    batch = {"dense": np.zeros((len(order_N), 0), np.float32),
             "ids": (user_N[:, None], item_N[:, None], item_genres[item_N], hist_NxH,
                     feats_Nx3[:, :1].copy(), feats_Nx3[:, 1:2].copy(), feats_Nx3[:, 2:].copy()),
             "label": label_N}
    vocab = {"user": len(users), "item": len(items), "genre": max(len(genre_vocab), 1),
             "gender": 2, "age": len(AGE_EDGES) + 1, "occupation": max(len(occ_vocab), 1)}
    return MovieLens(batch, ((ts_N - ts_N[0]) // WEEK_SECONDS).astype(np.int32), vocab)


def _natural(s: str):
    return (0, int(s)) if s.isdigit() else (1, s)


def fetch_wheel(cache_dir: str) -> str:
    """Path of the recbole wheel in cache_dir, downloading it with pip if it is not there."""
    found = glob.glob(os.path.join(cache_dir, "recbole-1.2.1-*.whl"))
    if found:
        return found[0]
    os.makedirs(cache_dir, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                           WHEEL, "-d", cache_dir], capture_output=True, text=True)
    found = glob.glob(os.path.join(cache_dir, "recbole-1.2.1-*.whl"))
    if proc.returncode or not found:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise DataError(f"pip download {WHEEL} into {cache_dir} failed ({tail}); put the wheel "
                        "or the ml-100k.inter/.item/.user files there and set config.data.path")
    return found[0]


def load(path: str, history: int = 30) -> MovieLens:
    """From a directory with ml-100k.{inter,item,user}, a recbole wheel, or a directory holding
    the wheel (fetched there with pip when absent)."""
    names = [f"ml-100k.{ext}" for ext in ("inter", "item", "user")]
    if os.path.isdir(path) and all(os.path.exists(os.path.join(path, n)) for n in names):
        texts = []
        for n in names:
            with open(os.path.join(path, n), encoding="latin-1") as f:
                texts.append(f.read())
        return parse(*texts, history=history, name=os.path.join(path, "ml-100k"))
    wheel = path if path.endswith(".whl") else fetch_wheel(path)
    try:
        with zipfile.ZipFile(wheel) as z:
            texts = [z.read(f"{PREFIX}.{ext}").decode("latin-1")
                     for ext in ("inter", "item", "user")]
    except (zipfile.BadZipFile, KeyError) as e:
        raise DataError(f"{wheel}: not a recbole wheel with the ml-100k example ({e})") from None
    return parse(*texts, history=history, name=f"{wheel}:{PREFIX}")
