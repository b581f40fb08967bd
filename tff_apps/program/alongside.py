"""Work that shares nothing with training, run beside it: an app's Keras baselines train in a
thread of this process while TFF's worker process runs the rounds (each about one core)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

Background = TypeVar("Background")
Foreground = TypeVar("Foreground")


class Cancelled(Exception):
    """Raised in the background's fits once the foreground has failed or was stopped."""

    def __init__(self, message: str = "the rounds ended before the baselines"):
        super().__init__(message)


def alongside(
    background: Callable[[threading.Event], Background], foreground: Callable[[], Foreground]
) -> tuple[Foreground, Background]:
    """(foreground(), background(stop)), the background in a thread started first. If the
    foreground raises (Ctrl-C and SIGTERM included), `stop` is set and its error goes on at once;
    the background must then end soon (its Keras fits take `stop_callbacks(stop)`), because the
    process waits for the thread before it exits."""
    stop = threading.Event()
    pool = ThreadPoolExecutor(1)
    try:
        started = pool.submit(background, stop)
        try:
            done = foreground()
        except BaseException:
            stop.set()
            raise
        return done, started.result()
    finally:
        pool.shutdown(wait=False)


def stop_callbacks(stop: threading.Event | None) -> list:
    """Keras callbacks that end a fit at its next batch call or epoch once `stop` is set (a
    job stopped in its first round would otherwise wait for the whole run's baselines)."""
    if stop is None:
        return []
    import tensorflow as tf

    class StopWhenSet(tf.keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            self._check()

        def on_epoch_end(self, epoch, logs=None):
            self._check()

        @staticmethod
        def _check():
            if stop.is_set():
                raise Cancelled()

    return [StopWhenSet()]
