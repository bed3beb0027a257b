"""What a raygpt command shows of Ray's own output. A driver's console gets Ray's warnings, its workers'
forwarded output and its raylet's errors; raygpt keeps there what helps someone running a job and says
once, in its own words, what Ray repeats. Ray's log files in the session folder keep everything.
Imported by raygpt.distributed (which every Ray-side command goes through) before it starts Ray.
"""

from __future__ import annotations

import logging
import os
import re
import sys

# Progress bars and per-report INFO lines drown the one progress line per log interval that rank 0 prints.
# Ray Data's usage statistics (telemetry for Ray's developers) poll Prometheus every 10 s in every process
# that runs a dataset (each Train worker here) and, with no Prometheus on localhost:9090, log a traceback
# each time: raygpt turns that collection off, in the driver and, through the job's runtime env, everywhere.
QUIET = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "PYTHONUNBUFFERED": "1", "RAY_DATA_USAGE_DISABLED": "1"}
for _key, _value in QUIET.items():
    os.environ.setdefault(_key, _value)


def _off_console(record: logging.LogRecord) -> bool:
    """Ray Data prints, on a console handler of its own (past ray.init's log level), a line per finished
    dataset and write, and that progress bars are off (raygpt turns them off); the start-up line and the
    prepare: lines say what matters. Its console handler skips records marked ``hide``; Ray Data's log files
    in the session directory still get them.

    Also hidden: Ray Data's "no available CPUs" warning. It reads the cluster's free CPUs once, as a dataset
    starts, and right after earlier tasks finished they can still read as 0 (the resource view lags their
    release): a false alarm that CI caught in a run's output (then from prepare, which ran two datasets one
    after the other). raygpt's own streams run in zero-CPU tasks, so they never wait for a CPU."""
    if (record.levelno < logging.WARNING or record.name == "ray.data._internal.progress"
            or str(record.msg).startswith(NO_CPU_WARNING)):
        record.hide = True
    return True


NO_CPU_WARNING = "Warning: The Ray cluster currently does not have any available CPUs"


for _name in ("ray.data._internal.execution.streaming_executor", "ray.data.dataset", "ray.data._internal.progress"):
    logging.getLogger(_name).addFilter(_off_console)


def quiet_forwarded_output() -> None:
    """Route what Ray forwards to this driver (workers' output, the raylet's errors) through
    `ForwardedOutput` before Ray's printer sees it. Ray has no public hook for it; without the private
    one Ray's output simply stays as it is."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
        handlers = dispatcher.handlers
    except (ImportError, AttributeError):
        return

    forwarded = ForwardedOutput()

    def quiet(handler):
        def handle(data):
            data = forwarded.filter(data)
            if data is not None:
                handler(data)
        handle.raygpt_quiet = True
        return handle

    with dispatcher._lock:
        dispatcher.handlers = [(name, h if getattr(h, "raygpt_quiet", False) else quiet(h)) for name, h in handlers]


class ForwardedOutput:
    """One batch of forwarded lines (Ray's dict: pid, is_err, lines) at a time: workers' exit tracebacks
    dropped (`ExitNoise`), the raylet's disk-full error said once (`DiskFull`), everything else as it came."""

    def __init__(self, stderr=None):
        self.exit_noise = ExitNoise()
        self.disk_full = DiskFull()
        self.stderr = stderr

    def filter(self, data: dict) -> dict | None:
        lines = data.get("lines", [])
        if data.get("pid") == "raylet":
            lines, notices = self.disk_full.filter(lines)
            for notice in notices:
                print(notice, file=self.stderr or sys.stderr, flush=True)
        elif data.get("is_err"):
            lines = self.exit_noise.filter(data.get("pid"), lines)
        if data.get("lines") and not lines:
            return None  # every line dropped: nothing to print
        return dict(data, lines=lines)


class DiskFull:
    """Past 95% full (Ray's local_fs_capacity_threshold), the disk that holds Ray's session folder makes the
    raylet log an ERROR every 10 s for as long as the cluster runs, and Ray forwards each one to the driver:
    on a crowded machine (CI's, at 97%) a training run's console fills with it. It matters (Ray cannot spill
    objects to it, and the run's checkpoints may share that disk), so raygpt says it once, with what to do."""

    LINE = re.compile(r"file_system_monitor\.cc:\d+: (?P<path>\S+) is over (?P<pct>[\d.]+)% full, "
                      r"available space: (?P<free>[\d.]+) GB; capacity: (?P<capacity>[\d.]+) GB")

    def __init__(self):
        self.said = False

    def filter(self, lines: list[str]) -> tuple[list[str], list[str]]:
        """The lines to keep, and raygpt's notices to print instead of the rest."""
        kept, notices = [], []
        for line in lines:
            m = self.LINE.search(line)
            if m is None:
                kept.append(line)
            elif not self.said:
                self.said = True
                notices.append(
                    f"ray: warning: the disk of Ray's session folder ({m['path']}) is over {m['pct']}% full "
                    f"({float(m['free']):.1f} of {float(m['capacity']):.0f} GB free): Ray cannot spill objects to it; "
                    "free some space, or point RAY_TMPDIR (or `ray start --temp-dir`) at a larger disk "
                    "(said once; Ray repeats it in raylet.err)")
        return kept, notices


class ExitNoise:
    """A Ray worker that gets the raylet's SIGTERM while its interpreter is already exiting (a trial's or a
    worker group's actor at its end) prints "Exception ignored in ... sigterm_handler ... SystemExit: 1", and
    Ray forwards it to the driver's stderr: noise after a run that went well (CI caught it at the end of a
    tune run).

    Drops from the stderr lines Ray forwards, process by process, every traceback block ("Exception
    ignored in" / "Traceback ..." to its "SystemExit" line) that passes through Ray's SIGTERM handler, and
    nothing else. Ray forwards what a log file holds when it looks, so a block can come split over two
    batches: one that opens with the WeakSet finalizer Python runs at exit (where the SIGTERM lands) is
    dropped to its SystemExit line wherever that comes; any other block unfinished at a batch's end is kept."""

    WEAKSET = "Exception ignored in: <function WeakSet.__init__.<locals>._remove"

    def __init__(self):
        self.dropping: set = set()  # processes inside a WeakSet exit traceback

    def filter(self, pid, lines: list[str]) -> list[str]:
        out, block = [], None
        for line in lines:
            if pid in self.dropping:
                if line.startswith("SystemExit"):
                    self.dropping.discard(pid)
                    continue
                if not line.strip() or line.startswith((" ", "Traceback", "File")):
                    continue
                self.dropping.discard(pid)  # not a traceback line: the block ended without its last line
            if block is None and line.startswith(self.WEAKSET):
                block = [line]
            elif block is None and line.startswith(("Exception ignored in", "Traceback (most recent call last)")):
                block = [line]
            elif block is not None:
                block.append(line)
                if line.startswith("SystemExit"):
                    if not any("sigterm_handler" in b for b in block):
                        out += block
                    block = None
            else:
                out.append(line)
        if block is not None and block[0].startswith(self.WEAKSET):
            self.dropping.add(pid)  # the rest comes in the next batch
            block = None
        return out + (block or [])
