"""The background prefetcher keeps order, applies `place`, and surfaces producer errors."""

import pytest

from autoshard_jax.train.prefetch import prefetch


def test_order_and_placement():
    assert list(prefetch(iter(range(10)), lambda x: x * 2, size=3)) == [2 * i for i in range(10)]


def test_producer_error_reaches_the_consumer_in_position():
    def batches():
        yield 1
        yield 2
        raise ValueError("train.txt:3: malformed line")

    got = []
    with pytest.raises(ValueError, match="train.txt:3"):
        for x in prefetch(batches(), lambda x: x):
            got.append(x)
    assert got == [1, 2]


def test_consumer_can_stop_early():
    it = prefetch(iter(range(1000)), lambda x: x, size=2)
    assert next(it) == 0
    it.close()  # must not hang on the producer blocked on a full queue
