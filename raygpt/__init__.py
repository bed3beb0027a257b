"""raygpt: train and tune GPT language models on Ray.

The core (config, model, tokenizer, train, checkpoint, generate) is plain PyTorch and imports without
Ray; the Ray side wraps it.
"""

from raygpt.config import Config, ConfigError, load_config
from raygpt.generate import TextGenerator, load
from raygpt.model import GPT

__version__ = "0.1.0"
__all__ = ["load", "TextGenerator", "GPT", "Config", "ConfigError", "load_config", "__version__"]
