"""BLIP-2: caption, question, chat about and search images; train your own Q-Former."""

from .errors import Blip2Error, CheckpointError, ConfigError, GenerationError, ImageError
from .pipeline import Blip2, Chat, Generation, GenerationOptions, load

__version__ = "0.1.0"
__all__ = [
    "Blip2",
    "Blip2Error",
    "Chat",
    "CheckpointError",
    "ConfigError",
    "Generation",
    "GenerationError",
    "GenerationOptions",
    "ImageError",
    "load",
]
