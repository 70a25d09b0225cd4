"""Table pools: the public dlrm_datasets files, and a synthetic pool calibrated to them.

`facebookresearch/dlrm_datasets` (embedding_bag/2021/fbgemm_t856_bs65536*.pt.gz) holds one batch
of 65536 samples over 856 tables as a torch-saved tuple (indices, offsets, lengths): `lengths` is
[T, B], `offsets` has T * B + 1 entries, and bag (t, b) is indices[offsets[i]:offsets[i + 1]]
with i = t * B + b.
`specs_from_arrays` turns those arrays into `TableSpec`s the way the AutoShard / DreamShard tools
do (rows = max id + 1, at least 100; pooling factor = mean bag length; the 17-bin reuse
histogram). Reading the file needs torch (`pip install 'autoshard-jax[torch]'`); nothing else does.

Without the 2.4 GB files, `synthetic_pool` draws 856 tables whose statistics match the published
locality statistics of that dataset (`DLRM_DATASETS_2021`).
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Sequence

import numpy as np

from autoshard_jax.errors import DataError
from autoshard_jax.tables.ids import reuse_histogram
from autoshard_jax.tables.spec import NUM_REUSE_BINS, TableSpec

DEFAULT_DIMS = (4, 8, 16, 32, 64, 128)

# Published locality statistics of fbgemm_t856_bs65536.pt (dlrm_datasets, 2021): one batch of
# 65536 samples, 887,017,990 ids over 856 tables (15.8 per table and sample), 128,435,723 unique
# rows, and the fraction of unique rows per access-count bin.
DLRM_DATASETS_2021 = {
    "num_tables": 856,
    "batch_size": 65536,
    "num_indices": 887_017_990,
    "num_unique": 128_435_723,
    "reuse_hist": (0.473, 0.152, 0.139, 0.112, 0.072, 0.032, 0.011, 0.005, 0.002, 0.001,
                   0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
}
MIN_ROWS = 100  # the AutoShard tools' floor on a table's hash size


def mean_lookups_per_table(stats: dict = DLRM_DATASETS_2021) -> float:
    """Average ids per (table, sample): 887,017,990 / (856 * 65536) = 15.8."""
    return stats["num_indices"] / (stats["num_tables"] * stats["batch_size"])


def specs_from_arrays(indices: np.ndarray, offsets: np.ndarray, lengths: np.ndarray,
                      dims: Sequence[int] | int = 16, seed: int = 0,
                      prefix: str = "t") -> list[TableSpec]:
    """TableSpecs from a dlrm_datasets batch (numpy arrays; see the module docstring).

    Args:
      indices: [N] ids of every bag, table-major.
      offsets: [T * B + 1] start of each bag in `indices`.
      lengths: [T, B] ids per bag.
      dims: one dim for every table, or a set each table's dim is drawn from (seeded).
      seed: seeds the dim draw.
      prefix: tables are named f"{prefix}{t:03d}".
    Returns:
      One spec per table with rows, pooling factor and reuse histogram of this batch.
    """
    indices = np.asarray(indices).reshape(-1)
    offsets = np.asarray(offsets).reshape(-1)
    lengths = np.asarray(lengths)
    if lengths.ndim != 2:
        raise DataError(f"lengths must be [tables, batch], got shape {lengths.shape}")
    num_tables, batch = lengths.shape
    if offsets.size != num_tables * batch + 1:
        raise DataError(f"offsets must have tables * batch + 1 = {num_tables * batch + 1} "
                        f"entries, got {offsets.size}")
    if offsets[-1] != indices.size or np.any(np.diff(offsets) != lengths.reshape(-1)):
        raise DataError("offsets and lengths disagree (offsets[i+1] - offsets[i] must equal "
                        "lengths.flat[i], and offsets[-1] the number of indices)")
    if indices.size and indices.min() < 0:
        raise DataError(f"indices must be >= 0, found {indices.min()}")
    rng = np.random.default_rng(seed)
    dim_of = ([int(dims)] * num_tables if np.isscalar(dims)
              else [int(d) for d in rng.choice(np.asarray(dims), num_tables)])
    specs = []
    for t in range(num_tables):
        ids = indices[offsets[t * batch]:offsets[(t + 1) * batch]]
        rows = max(MIN_ROWS, int(ids.max()) + 1 if ids.size else 0)
        pf = float(lengths[t].mean())
        hist = reuse_histogram(ids)
        specs.append(TableSpec(f"{prefix}{t:03d}", rows, dim_of[t],
                               pooling_factor=max(pf, 1.0 / batch),
                               reuse_hist=tuple(float(h) for h in hist)))
    return specs


def load_dlrm_datasets(path: str | os.PathLike, dims: Sequence[int] | int = 16,
                       seed: int = 0) -> list[TableSpec]:
    """TableSpecs from a `fbgemm_t856_bs65536*.pt(.gz)` file; needs the optional torch extra."""
    try:
        import torch
    except ImportError as e:
        raise DataError(f"reading {os.fspath(path)} needs PyTorch: pip install "
                        "'autoshard-jax[torch]' (or pip install torch)") from e
    if not os.path.exists(path):
        raise FileNotFoundError(f"dlrm_datasets file {os.fspath(path)!r} does not exist")
    opener = gzip.open if os.fspath(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = torch.load(f, map_location="cpu", weights_only=True)
    if not isinstance(data, (tuple, list)) or len(data) != 3:
        raise DataError(f"{os.fspath(path)}: expected a tuple (indices, offsets, lengths)")
    indices, offsets, lengths = (np.asarray(x.numpy()) for x in data)
    return specs_from_arrays(indices, offsets, lengths, dims=dims, seed=seed)


def synthetic_pool(num_tables: int = 856, seed: int = 0, dims: Sequence[int] = DEFAULT_DIMS,
                   max_rows: int = 40_000_000, min_rows: int = MIN_ROWS,
                   stats: dict = DLRM_DATASETS_2021, prefix: str = "t") -> list[TableSpec]:
    """A pool of tables with dlrm_datasets-like statistics, deterministic from `seed`.

    Pooling factors are log-normal (heavy-tailed, many tables below one id per sample, a few in
    the hundreds) with mean `mean_lookups_per_table(stats)`; rows are log-normal between
    `min_rows` and `max_rows` (a CPU-sized pool lowers `max_rows`); each table's reuse histogram
    is a Dirichlet draw around the published histogram, so the pool's mean histogram matches it.
    Tables that see more ids per batch reuse their rows more (their draw is shifted toward
    higher bins), as in the real data.
    """
    if num_tables < 1:
        raise ValueError(f"num_tables must be >= 1, got {num_tables}")
    if not dims or any(int(d) < 1 for d in dims):
        raise ValueError(f"dims must be positive integers, got {tuple(dims)}")
    rng = np.random.default_rng(seed)
    mean_pf = mean_lookups_per_table(stats)
    pf = rng.lognormal(0.0, 1.4, num_tables)
    for _ in range(20):  # rescale to the published mean, within [0.05, 200] ids per sample
        pf = np.clip(pf * mean_pf / pf.mean(), 0.05, 200.0)
    log_rows = rng.normal(np.log(2e5), 2.3, num_tables)
    rows = np.clip(np.exp(log_rows), min_rows, max_rows).astype(np.int64)
    base = np.asarray(stats["reuse_hist"], np.float64) + 1e-3
    base /= base.sum()
    # Heavier tables (ids per row high) lean toward high-reuse bins; zero-mean over the pool.
    lean = np.log(pf * stats["batch_size"] / rows)
    lean = (lean - lean.mean()) / (lean.std() + 1e-9)
    specs = []
    for t in range(num_tables):
        shift = np.exp(0.06 * lean[t] * (np.arange(NUM_REUSE_BINS) - 1.0))
        alpha = 40.0 * base * shift / np.sum(base * shift)
        hist = rng.dirichlet(alpha)
        specs.append(TableSpec(f"{prefix}{t:03d}", int(rows[t]), int(rng.choice(dims)),
                               pooling_factor=float(round(pf[t], 3)),
                               reuse_hist=tuple(float(round(h, 5)) for h in hist)))
    return specs


def augment_dims(specs: Sequence[TableSpec], dims: Sequence[int],
                 min_pooling: float = 0.0) -> list[TableSpec]:
    """Copies of `specs` at other embedding widths (NeuroShard's augmentation: its pool is the
    856 tables times every width), named `<name>_d<dim>`, for tables looking up at least
    `min_pooling` ids per sample; a table's own width is skipped. Rows, pooling and reuse stay
    the table's, so a cost collection can fill the costly corner (wide tables with many lookups)
    that a pool's random widths leave sparse, without drawing a single test table."""
    if not dims or any(isinstance(d, bool) or int(d) != d or d < 1 for d in dims):
        raise ValueError(f"dims must be positive integers, got {tuple(dims)}")
    if not np.isfinite(min_pooling) or min_pooling < 0:
        raise ValueError(f"min_pooling must be a non-negative number, got {min_pooling!r}")
    return [TableSpec(f"{s.name}_d{int(d)}", s.rows, int(d), s.pooling_factor, s.reuse_hist)
            for s in specs if s.pooling_factor >= min_pooling
            for d in sorted(set(int(d) for d in dims)) if d != s.dim]
