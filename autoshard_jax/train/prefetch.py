"""Background host-side batch preparation, so data generation overlaps the train step."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

_END = object()
# How long closing waits for the producer to finish its batch and see the stop (a daemon thread:
# past this it is left to end on its own).
_JOIN_TIMEOUT_S = 10.0


def prefetch(batches: Iterator[Any], place: Callable[[Any], Any], size: int = 2) -> Iterator[Any]:
    """Yields `place(batch)` for each batch, computed up to `size` batches ahead in a thread.

    Exceptions raised by the producer (a malformed input line, say) are re-raised in the consumer
    at the position where they happened, so nothing is silently lost.

    Close it when done (`contextlib.closing`), do not leave it to the garbage collector: a
    generator caught in a reference cycle is finalized by the cyclic GC at an arbitrary point,
    e.g. inside a JAX call of the main thread, where waiting for a producer that is itself in
    `place` can deadlock (seen under Python 3.13 after a checkpoint fallback). The wait for the
    producer is bounded as well, so even then the process does not hang.
    """
    q: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

    def produce():
        try:
            for batch in batches:
                if stop.is_set():
                    return
                q.put(place(batch))
            q.put(_END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put(e)

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        deadline = time.monotonic() + _JOIN_TIMEOUT_S
        while thread.is_alive() and time.monotonic() < deadline:
            try:  # unblock a producer waiting on a full queue
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)
