"""HTTP server: OpenAI-compatible chat completions with one image, caption/VQA routes, micro-batching, a web page.

Needs the `serve` extra (fastapi, uvicorn, python-multipart). Start it with `blip2 serve --model ...`.
"""

from .app import ServerSettings, create_app

__all__ = ["ServerSettings", "create_app"]
