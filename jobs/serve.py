"""Serve a checkpoint on Ray Serve: `python jobs/serve.py CHECKPOINT_OR_RUN [--port 8000] [--follow] ...`
(what `raygpt serve` does; also `ray job submit -- python jobs/serve.py ...` on a cluster)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from raygpt.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
