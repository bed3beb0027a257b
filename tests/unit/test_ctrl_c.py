"""Ctrl-C in a run that trains in the driver (Ray Train's local mode) stops it at the next step, even where
the KeyboardInterrupt itself is lost between two steps (no cluster needed)."""

import signal
import threading
import time

import pytest

from raygpt.distributed import _ctrl_c_stops_the_loop, _stop_on_ctrl_c


def ctrl_c() -> None:
    """SIGINT to the main thread, and time for Python to run its handler there: it runs between bytecodes, so
    a sleep of one piece could end before it does (a signal taken by another thread does not cut it short)."""
    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        time.sleep(0.01)


def test_ctrl_c_stops_the_loop_at_the_next_step_though_its_exception_was_swallowed():
    steps = []
    with pytest.raises(KeyboardInterrupt):
        with _ctrl_c_stops_the_loop():
            for step in _stop_on_ctrl_c(iter(range(100))):
                steps.append(step)
                if step == 3:
                    try:  # a library between two steps that swallows the KeyboardInterrupt
                        ctrl_c()
                    except KeyboardInterrupt:
                        pass
    assert steps == [0, 1, 2, 3]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Python's own handler is back


def test_a_handler_someone_else_installed_is_left_alone():
    calls = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))
    try:
        with _ctrl_c_stops_the_loop():
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            deadline = time.monotonic() + 5
            while not calls and time.monotonic() < deadline:
                time.sleep(0.01)
            assert list(_stop_on_ctrl_c(iter(range(3)))) == [0, 1, 2]
        assert calls == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, previous)
