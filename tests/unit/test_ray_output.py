"""What raygpt keeps off a driver's console of Ray's own output (no cluster needed)."""

import logging

from raygpt.ray_output import NO_CPU_WARNING, DiskFull, ExitNoise, ForwardedOutput

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


DISK = ("[2026-11-30 09:27:25,158 E 5927 5937] (raylet) file_system_monitor.cc:116: /tmp/ray/session_x is over 95% "
        "full, available space: 6.46872 GB; capacity: 251.972 GB. Object creation will fail if spilling is required.")


def test_the_raylets_disk_full_error_is_said_once_in_raygpts_words():
    """As CI's runs printed it: the raylet's ERROR every 10 s, forwarded to the driver's stderr."""
    import io
    err = io.StringIO()
    forwarded = ForwardedOutput(stderr=err)
    other = "[2026-11-30 09:27:26,000 E 5927 5937] (raylet) node_manager.cc:1: something else"
    assert forwarded.filter({"pid": "raylet", "is_err": True, "lines": [DISK]}) is None
    assert forwarded.filter({"pid": "raylet", "is_err": True, "lines": [DISK, other, DISK]})["lines"] == [other]
    said = err.getvalue().splitlines()
    assert len(said) == 1 and said[0].startswith("ray: warning: the disk of Ray's session folder (/tmp/ray/session_x)")
    assert "over 95% full (6.5 of 252 GB free)" in said[0] and "RAY_TMPDIR" in said[0]
    # A worker's line that happens to read the same is the worker's, kept as it came.
    assert forwarded.filter({"pid": 42, "is_err": True, "lines": [DISK]})["lines"] == [DISK]
    assert DiskFull().filter(["a", DISK, "b"])[0] == ["a", "b"]


def test_forwarded_worker_output_keeps_all_but_the_exit_tracebacks():
    forwarded = ForwardedOutput()
    assert forwarded.filter({"pid": 7, "is_err": True, "lines": ["x", *EXIT_NOISE]})["lines"] == ["x"]
    assert forwarded.filter({"pid": 7, "is_err": True, "lines": EXIT_NOISE}) is None
    assert forwarded.filter({"pid": 7, "is_err": False, "lines": EXIT_NOISE})["lines"] == EXIT_NOISE
