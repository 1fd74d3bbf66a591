"""Build host batches ahead of the training step in a background thread.

Batches are a pure function of the step, so the thread can run `depth` steps ahead
without any shared state; an exception in the thread surfaces at the step that needed it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")
_DONE = object()


def prefetch(make: Callable[[int], T], start: int, stop: int, depth: int = 2) -> Iterator[tuple[int, T]]:
    """Yield (step, make(step)) for start <= step < stop, computed up to `depth` steps ahead."""
    if depth <= 0:
        for step in range(start, stop):
            yield step, make(step)
        return
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stopped = threading.Event()

    def worker() -> None:
        for step in range(start, stop):
            try:
                item = (step, make(step), None)
            except BaseException as e:  # handed to the consumer, raised there
                item = (step, None, e)
            while not stopped.is_set():
                try:
                    slots.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if stopped.is_set() or item[2] is not None:
                return
        slots.put((None, _DONE, None))

    thread = threading.Thread(target=worker, name="flaxgpt-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            step, value, error = slots.get()
            if error is not None:
                raise error
            if value is _DONE:
                return
            yield step, value
    finally:
        stopped.set()
