"""BLIP-2: caption, question, chat about and search images; train your own Q-Former.

The public names load on first use (a module `__getattr__`), so `import blip2` and `blip2 --help` import neither
torch nor transformers: `blip2.load` or `blip2.Blip2` does.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

_ERRORS = {"Blip2Error", "CheckpointError", "ConfigError", "GenerationError", "ImageError"}
# Submodules load on first access too, so `blip2.pipeline.Blip2` works after a bare `import blip2`.
_SUBMODULES = set("checkpoint config errors language model pipeline processing qformer quant vision".split())


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(".errors" if name in _ERRORS else ".pipeline", __name__)
    value = getattr(module, name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
