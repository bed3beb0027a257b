"""raygpt: train and tune GPT language models on Ray.

The core (config, model, tokenizer, train, checkpoint, generate) is plain PyTorch and imports without
Ray; the Ray side wraps it.
"""

import time

IMPORTED_AT = time.time()  # before torch and Ray load: the start of the start-up line in raygpt.distributed

from raygpt.config import Config, ConfigError, load_config  # noqa: E402
from raygpt.generate import TextGenerator, load  # noqa: E402
from raygpt.model import GPT  # noqa: E402

__version__ = "0.1.0"
__all__ = ["load", "TextGenerator", "GPT", "Config", "ConfigError", "load_config", "__version__"]
