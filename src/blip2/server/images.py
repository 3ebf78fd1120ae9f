"""Image bytes from requests: base64, data: URIs and (only when allowed) remote http(s) URLs, safely.

A remote URL is a server-side request forgery risk: a caller could make the server fetch `http://127.0.0.1:...`
or a cloud metadata address. So remote fetching is off by default, and when on, the host must resolve only to
public addresses, the address actually connected to is checked again (DNS may answer differently the second time),
redirects are followed by hand so each hop is checked, proxies from the environment are not used (the connected
address would be the proxy's), and size and total time are capped.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import socket
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urljoin

import httpx
from PIL import Image

from ..errors import ImageError
from ..images import load_image
from .schema import ApiError

MAX_REDIRECTS = 3
_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,", re.I)


def bad_image(message: str, code: str = "invalid_image") -> ApiError:
    return ApiError(400, message, code)


def decode_base64(text: str, what: str = "image") -> bytes:
    """Strict base64 (standard or URL-safe alphabet, whitespace allowed); a data: URI prefix is accepted too."""
    if text.startswith("data:"):
        return decode_data_uri(text, what)
    cleaned = re.sub(r"\s+", "", text)
    if "-" in cleaned or "_" in cleaned:
        cleaned = cleaned.replace("-", "+").replace("_", "/")
    cleaned += "=" * (-len(cleaned) % 4)  # tolerate stripped padding, a common client shortcut
    try:
        data = base64.b64decode(cleaned, validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad_image(f"{what}: invalid base64 ({e})", "invalid_base64") from e
    if not data:
        raise bad_image(f"{what}: empty after base64 decoding", "invalid_base64")
    return data


def decode_data_uri(url: str, field: str = "image_url") -> bytes:
    """`data:[<mime>][;base64],<payload>`; any media type, since the image decoder, not the label, decides."""
    match = _DATA_URI.match(url)
    if match is None:
        raise bad_image(f"{field}: malformed data: URI (expected data:image/...;base64,...)", "invalid_image_url")
    payload = url[match.end() :]
    if not match.group("b64"):
        raise bad_image(f"{field}: data: URI must be base64-encoded (;base64,)", "invalid_image_url")
    return decode_base64(payload, f"{field} data: URI")


def image_pixels(data: bytes, field: str, max_pixels: int, transform: Callable[[list[Image.Image]], Any]) -> Any:
    """The request's image decoded once and prepared: (3, S, S) pixels, which the batcher batches and the model's
    cache keys on. A bad image is a 400 naming the request field (`messages[0].content[1].image_url`, `file`)."""
    try:
        return transform([load_image(data, max_pixels=max_pixels, name=field)])[0]
    except ImageError as e:
        raise bad_image(str(e)) from e


# ---- remote URLs ----------------------------------------------------------------------------------------------------


def is_public(address: str) -> bool:
    """True only for globally routable unicast addresses (no loopback, private, link-local, reserved, multicast)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is loopback
    blocked = (
        ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved or ip.is_unspecified
    )
    return ip.is_global and not blocked


def resolve(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise bad_image(f"image_url: cannot resolve host {host!r} ({e})", "invalid_image_url") from e
    return sorted({info[4][0] for info in infos})


def check_url(url: str, resolver: Callable[[str, int], list[str]] = resolve) -> httpx.URL:
    """The URL if it is http(s) and its host resolves only to public addresses; else a 400."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as e:
        raise bad_image(f"image_url: invalid URL ({e})", "invalid_image_url") from e
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise bad_image(
            f"image_url: only data:, http: and https: URLs are accepted, got {url[:60]!r}", "invalid_image_url"
        )
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    addresses = resolver(parsed.host, port)
    unsafe = [a for a in addresses if not is_public(a)]
    if not addresses or unsafe:
        raise bad_image(
            f"image_url: host {parsed.host!r} resolves to a non-public address {unsafe or addresses}; refused",
            "unsafe_image_url",
        )
    return parsed


def fetch(url: str, max_bytes: int, timeout_s: float, resolver: Callable[[str, int], list[str]] = resolve) -> bytes:
    """GET an image over http(s) with every safety check of this module. Blocking: run it in a worker thread."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=timeout_s, follow_redirects=False, trust_env=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            target = check_url(url, resolver)
            try:
                with client.stream("GET", target) as response:
                    _check_peer(response, target.host)
                    if response.is_redirect and "location" in response.headers:
                        url = urljoin(str(target), response.headers["location"])
                        continue
                    return _read_body(response, str(target), max_bytes, deadline)
            except httpx.HTTPError as e:
                raise bad_image(
                    f"image_url: cannot fetch {str(target)[:80]} ({type(e).__name__}: {e})", "image_fetch_failed"
                ) from e
    raise bad_image(f"image_url: more than {MAX_REDIRECTS} redirects", "image_fetch_failed")


def _check_peer(response: httpx.Response, host: str) -> None:
    stream = response.extensions.get("network_stream")
    peer = stream.get_extra_info("server_addr") if stream is not None else None
    if not peer or not is_public(str(peer[0])):
        raise bad_image(
            f"image_url: host {host!r} connected to non-public address {peer and peer[0]}; refused", "unsafe_image_url"
        )


def _read_body(response: httpx.Response, url: str, max_bytes: int, deadline: float) -> bytes:
    if response.status_code != 200:
        raise bad_image(f"image_url: {url[:80]} answered HTTP {response.status_code}", "image_fetch_failed")
    declared = response.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise bad_image(f"image_url: image is {declared} bytes, more than the limit {max_bytes}", "image_too_large")
    chunks, total = [], 0
    for chunk in response.iter_bytes():
        total += len(chunk)
        if total > max_bytes:
            raise bad_image(f"image_url: image is more than the limit {max_bytes} bytes", "image_too_large")
        if time.monotonic() > deadline:  # per-read timeouts alone let a slow trickle go on forever
            raise bad_image("image_url: download took longer than the time limit", "image_fetch_failed")
        chunks.append(chunk)
    return b"".join(chunks)
