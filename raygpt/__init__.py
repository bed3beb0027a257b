"""raygpt: train and tune GPT language models on Ray.

The core (config, model, tokenizer, train, checkpoint, generate) is plain PyTorch and imports without
Ray; the Ray side wraps it.
"""

import time

IMPORTED_AT = time.time()  # before torch and Ray load: the start of the start-up line in raygpt.distributed

from raygpt.config import Config, ConfigError, load_config  # noqa: E402

# The model and generation load torch: imported on first use (raygpt.load, raygpt.GPT), so a process that only
# prepares data (a prepare task in a fresh Ray worker) does not pay torch's import.
_LAZY = {"load": "raygpt.generate", "TextGenerator": "raygpt.generate", "GPT": "raygpt.model"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'raygpt' has no attribute {name!r}")


__version__ = "0.1.0"
__all__ = ["load", "TextGenerator", "GPT", "Config", "ConfigError", "load_config", "__version__"]
