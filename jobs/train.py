"""Train a GPT: `python jobs/train.py [CONFIG] [key=value ...]` (also under `ray job submit -- ...`).

With no arguments it trains the demo model on the embedded corpus (the Python standard library's
sources), prints samples and where the checkpoint is.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from raygpt.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
