"""Baselines beside the rounds (`alongside`): results of both sides, and a stopped foreground
that does not wait for the background's whole run."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from tff_apps.program.alongside import Cancelled, alongside, stop_callbacks


def test_both_results_come_back_and_the_background_runs_while_the_foreground_does():
    seen = []

    def background(stop):
        seen.append(threading.current_thread() is not threading.main_thread())
        return "baselines"

    assert alongside(background, lambda: "rounds") == ("rounds", "baselines")
    assert seen == [True]


def test_a_stopped_foreground_sets_stop_and_its_error_goes_on_at_once():
    stopped = threading.Event()

    def background(stop):
        while not stop.wait(0.01):  # a fit that would run for hours
            pass
        stopped.set()

    def foreground():
        raise KeyboardInterrupt

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        alongside(background, foreground)
    assert stopped.wait(5) and time.monotonic() - started < 5


def test_a_keras_fit_with_the_stop_callback_ends_at_its_next_epoch():
    import tensorflow as tf

    model = tf.keras.Sequential([tf.keras.Input((2,)), tf.keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    started = time.monotonic()
    with pytest.raises(Cancelled):
        model.fit(np.zeros((8, 2)), np.zeros(8), epochs=10**7, verbose=0, callbacks=stop_callbacks(stop))
    assert time.monotonic() - started < 30
    assert stop_callbacks(None) == []
