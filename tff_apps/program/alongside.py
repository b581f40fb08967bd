"""Work that shares nothing with training, run beside it: an app's Keras baselines train in a
thread of this process while TFF's worker process runs the rounds (each about one core)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

Background = TypeVar("Background")
Foreground = TypeVar("Foreground")


def alongside(background: Callable[[], Background], foreground: Callable[[], Foreground]) -> tuple[Foreground, Background]:
    """(foreground(), background()), the background in a thread started first. If the foreground
    raises, its error is reported at once; the thread finishes before the process exits."""
    pool = ThreadPoolExecutor(1)
    try:
        started = pool.submit(background)
        return foreground(), started.result()
    finally:
        pool.shutdown(wait=False)
