"""What raygpt keeps off a driver's console of Ray's own output (no cluster needed)."""

import logging

from raygpt.distributed import NO_CPU_WARNING, ExitNoise

EXIT_NOISE = [
    "Exception ignored in: <function WeakSet.__init__.<locals>._remove at 0x7f3a2c1b9e40>",
    "Traceback (most recent call last):",
    '  File "/usr/lib/python3.11/_weakrefset.py", line 39, in _remove',
    '  File "/x/ray/_private/worker.py", line 1063, in sigterm_handler',
    '  File "/x/ray/_private/utils.py", line 1410, in raise_sys_exit_with_custom_error_message',
    "SystemExit: 1",
]


def test_only_tracebacks_through_rays_sigterm_handler_are_dropped():
    other = ["Traceback (most recent call last):", '  File "train.py", line 3, in f', "SystemExit: 2"]
    lines = ["before", *EXIT_NOISE, "between", *other, "after"]
    assert ExitNoise().filter(1, lines) == ["before", "between", *other, "after"]
    assert ExitNoise().filter(1, EXIT_NOISE) == []
    # A block other than the exit's WeakSet one, cut off before its SystemExit line, is kept whole.
    cut = ["Exception ignored in: <function Foo.__del__>", *EXIT_NOISE[1:3]]
    assert ExitNoise().filter(1, cut) == cut


def test_the_exit_traceback_split_over_two_batches_is_dropped_and_only_for_its_process():
    """As CI's tune run printed it: the block in two forwarded batches, a blank line at the cut."""
    noise = ExitNoise()
    assert noise.filter(7, ["last progress line", *EXIT_NOISE[:3], "    def _remove(item, selfref=ref(self)):"]) == [
        "last progress line"]
    assert noise.filter(8, ["another process's line"]) == ["another process's line"]
    assert noise.filter(7, ["", *EXIT_NOISE[3:], "a later line"]) == ["a later line"]
    assert noise.filter(7, ["Traceback (most recent call last):"]) == ["Traceback (most recent call last):"]


def test_ray_datas_no_cpu_warning_is_hidden_from_the_console_and_nothing_else():
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append((record.getMessage()[:20], getattr(record, "hide", False)))

    log = logging.getLogger("ray.data.dataset")
    handler = Keep()
    log.addHandler(handler)
    try:
        log.warning(NO_CPU_WARNING + ". The Dataset job will hang unless more CPUs are freed up.")
        log.warning("Some other warning")
    finally:
        log.removeHandler(handler)
    assert seen == [(NO_CPU_WARNING[:20], True), ("Some other warning", False)]
