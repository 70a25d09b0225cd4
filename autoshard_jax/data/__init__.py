"""Click data: the batch contract, a synthetic Criteo-shaped stream and a Criteo TSV reader."""

from autoshard_jax.data.batch import Batch, check_batch
from autoshard_jax.data.criteo_tsv import CriteoTSVReader, MalformedLineError, ReadStats
from autoshard_jax.data.source import DataSource, pad_batch
from autoshard_jax.data.synthetic import SyntheticClickStream

__all__ = [
    "Batch",
    "CriteoTSVReader",
    "DataSource",
    "MalformedLineError",
    "ReadStats",
    "SyntheticClickStream",
    "check_batch",
    "pad_batch",
]
