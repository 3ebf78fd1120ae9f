"""Request body size limit as a plain ASGI wrapper, so it also covers chunked bodies without a Content-Length.

It sits outside FastAPI on purpose: inside, a body that stops arriving mid-parse surfaces as a generic "error
parsing the body" 400 (or a 500). Here, once the limit is crossed, the app sees the client as disconnected,
whatever it tries to send is dropped, and the wrapper answers 413 itself.
"""

from __future__ import annotations

import json
from typing import Any

from .schema import error_body

Scope = dict[str, Any]


class BodyLimit:
    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def __getattr__(self, name: str) -> Any:  # expose the FastAPI app's attributes (state, routes) to callers
        return getattr(self.app, name)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(send)
            return
        seen = 0
        exceeded = False

        async def limited_receive() -> dict[str, Any]:
            nonlocal seen, exceeded
            if exceeded:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    exceeded = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict[str, Any]) -> None:
            if not exceeded:
                await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded:
            await self._too_large(send)

    async def _too_large(self, send: Any) -> None:
        limit_mb = self.max_bytes / (1024 * 1024)
        body = error_body(
            413, f"request body larger than the limit of {limit_mb:.3g} MB (--max-body-mb)", "body_too_large"
        )
        raw = json.dumps(body).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(raw)).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": raw})
