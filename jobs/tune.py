"""Tune a GPT: `python jobs/tune.py [TUNE_CONFIG] --samples N [--resume] [key=value ...]` (also under
`ray job submit -- ...`). With no config it searches configs/tune/default.yaml's space on the demo.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from raygpt.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
