"""What raygpt keeps off a driver's console of Ray's own output (no cluster needed)."""

import logging

from raygpt.distributed import NO_CPU_WARNING, without_sigterm_tracebacks

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
    assert without_sigterm_tracebacks(lines) == ["before", "between", *other, "after"]
    assert without_sigterm_tracebacks(EXIT_NOISE) == []
    # A block cut off before its SystemExit line is kept whole: nothing is dropped on a guess.
    assert without_sigterm_tracebacks(EXIT_NOISE[:3]) == EXIT_NOISE[:3]


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
