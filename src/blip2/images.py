"""Image files in, upright RGB images out: the one decoder that the CLI, the pipeline, batch captioning, the server,
indexing, evaluation and training all use, so one file gets one answer, with one reason when it cannot be read.

What is decoded (`load_image`):
- **the frame Pillow shows on opening**, the one `Image.open(f).convert("RGB")` gives: the first frame of an
  animated GIF, APNG, WebP or FLI, the first page of a multi-page TIFF, the primary image of an MPO, the composite of
  a layered PSD, the largest size in an ICO or ICNS. Nothing is seeked: PSD layers count from 1, so seeking to 0
  fails on a valid file;
- EXIF orientation applied, then RGB as `transformers` converts (transparency composited onto white);
- fully, so a truncated file fails here, with its name, and not later inside a batch.

Why not (`ImageError.kind` and the start of its message): `missing`, `unreadable`, `empty`, `not an image`,
`unsupported format (...)` for a valid file that needs a program or codec this Pillow lacks (EPS without
Ghostscript, WMF/EMF, HDF5/GRIB/BUFR stubs, a BMP bitfield layout), `truncated`, `corrupt`, `too many pixels`.

Decoder libraries write warnings of their own (libjpeg and libtiff to the process's stderr, Pillow's plugins as
Python warnings). They are caught during the decode and never reach the terminal: a failed image's message ends with
them; a decoded image's go to the `blip2.images` logger at DEBUG level, with the file's name.

This module imports neither torch nor numpy: decoding workers and the server's threads only need Pillow.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from .defaults import MAX_PIXELS
from .errors import ImageError, one_line

__all__ = ["DEFAULT_MAX_PIXELS", "image_suffixes", "is_image_suffix", "load_image", "sniff_format", "to_rgb"]

log = logging.getLogger("blip2.images")

# 100 megapixels (e.g. 10000 x 10000) is far beyond any photo worth captioning at 224 px, and decoding it
# already costs ~300 MB of RGB; anything larger is treated as a decompression bomb.
DEFAULT_MAX_PIXELS = MAX_PIXELS

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | Image.Image

# What each "unsupported" failure needs, by a phrase of Pillow's message.
_NEEDS = (
    ("ghostscript", "EPS needs Ghostscript, which is not installed"),
    ("cannot find loader", "needs a handler or platform library that Pillow does not have here"),
    ("bitfields", "a BMP bitfield layout that Pillow does not read"),
    ("not available", "needs a codec that this Pillow was built without"),
)
_TRUNCATED = ("truncated", "premature end", "ran out of data", "unexpected end", "end of file")


@lru_cache(maxsize=1)
def image_suffixes() -> frozenset[str]:
    """Extensions of every format this Pillow can open, MPO (read by the JPEG plugin) included; not the write-only
    ones such as .pdf."""
    Image.init()
    readable = set(Image.OPEN) | {"MPO"}
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in readable)


def is_image_suffix(path: str | os.PathLike[str]) -> bool:
    return Path(path).suffix.lower() in image_suffixes()


def sniff_format(prefix: bytes) -> str | None:
    """The format whose signature `prefix` (the file's first bytes) carries, or None. Formats without a signature
    (TGA, for one) are never named: any bytes could be theirs."""
    Image.init()
    for fmt, (_, accept) in Image.OPEN.items():
        if accept is None:
            continue
        try:
            if accept(prefix):
                return fmt
        except Exception:  # noqa: BLE001, S112 - a plugin's check on odd bytes is not ours to fail on
            continue
    return None


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert to RGB exactly as `transformers.image_transforms.convert_to_rgb` does.

    Transparency (an "A" band, or a `transparency` entry as palette and tRNS images carry) is composited onto
    opaque white, so a transparent logo becomes a logo on white, not on black.
    """
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(src: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None) -> Image.Image:
    """An image from a path, bytes or a PIL image: upright (EXIF), fully decoded, RGB (see the module's rules).

    Raises `ImageError` with one line that starts with `name` (default: the path, "<bytes>" or "<PIL image>") and
    says why. PIL's own hard limit (`Image.MAX_IMAGE_PIXELS` x 2, ~179 MP) applies on top of `max_pixels`.
    """
    if isinstance(src, Image.Image):
        return _guarded(lambda: _decoded(src, max_pixels), name or "<PIL image>", max_pixels)
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        label = name or "<bytes>"
        if not data:
            raise ImageError(f"{label}: empty (0 bytes), not an image", kind="empty")
        return _open(io.BytesIO(data), label, max_pixels)
    if not isinstance(src, (str, os.PathLike)):
        raise TypeError(f"load_image expects a path, bytes or a PIL image, got {type(src).__name__}")
    path = Path(os.fspath(src))
    label = name or str(path)
    if path.is_dir():
        raise ImageError(f"{label}: is a directory, not an image file", kind="unreadable")
    try:
        fp = open(path, "rb")  # noqa: SIM115 - closed below; open() errors must be told apart from decode errors
    except FileNotFoundError as exc:
        raise ImageError(f"{label}: no such file", kind="missing") from exc
    except PermissionError as exc:
        raise ImageError(f"{label}: unreadable (permission denied)", kind="unreadable") from exc
    except OSError as exc:
        raise ImageError(f"{label}: unreadable ({one_line(exc)})", kind="unreadable") from exc
    with fp:
        if os.fstat(fp.fileno()).st_size == 0:
            raise ImageError(f"{label}: empty file (0 bytes), not an image", kind="empty")
        return _open(fp, label, max_pixels)


# ---- the decode -----------------------------------------------------------------------------------------------------


def _open(fp: io.IOBase, name: str, max_pixels: int) -> Image.Image:
    def decode() -> Image.Image:
        with Image.open(fp) as img:
            return _decoded(img, max_pixels)

    try:
        return _guarded(decode, name, max_pixels)
    except ImageError as exc:
        if exc.kind != "not_an_image":
            raise
        fp.seek(0)
        fmt = sniff_format(fp.read(64))
        if fmt is None:
            raise
        raise ImageError(
            f"{name}: truncated or corrupt {fmt} file (its header cannot be read)", kind="corrupt"
        ) from exc.__cause__


def _guarded(decode: Callable[[], Image.Image], name: str, max_pixels: int) -> Image.Image:
    """Run `decode` with the decoders' messages collected; every failure becomes one `ImageError` naming `name`."""
    with _quiet() as said:
        try:
            # max_pixels is checked by _decoded, so PIL's own warning (at 89 MP) says nothing new; its hard error does.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image, error = decode(), None
        except Exception as exc:  # noqa: BLE001 - PIL plugins raise OSError, SyntaxError, ValueError, struct.error, ...
            image, error = None, exc
    if error is None:
        if said:
            log.debug("%s: decoder messages: %s", name, " | ".join(said))
        return image
    raise _failure(name, error, said, max_pixels) from error


def _decoded(img: Image.Image, max_pixels: int) -> Image.Image:
    width, height = img.size
    if width * height > max_pixels:
        raise _TooMany(f"{width}x{height} = {width * height}")
    img.load()  # decode now: a truncated file fails here, not later inside a batch
    try:
        upright = ImageOps.exif_transpose(img)
    except Exception as exc:  # noqa: BLE001 - a damaged EXIF block: the pixels are fine, only the orientation is lost
        warnings.warn(f"EXIF orientation unreadable, image kept as stored ({one_line(exc)})", stacklevel=1)
        upright = img
    return to_rgb(upright)


class _TooMany(Exception):
    pass


def _failure(name: str, exc: BaseException, said: list[str], max_pixels: int) -> ImageError:
    text = one_line(exc)
    if isinstance(exc, (_TooMany, Image.DecompressionBombError)):
        return ImageError(
            f"{name}: too many pixels (limit {max_pixels}): too large to decode safely ({text})", kind="too_large"
        )
    if isinstance(exc, UnidentifiedImageError):
        return ImageError(f"{name}: not an image (no image format recognised)", kind="not_an_image")
    low = text.lower()
    kind, reason = "corrupt", f"corrupt ({text})"
    for phrase, needs in _NEEDS:
        if phrase in low:
            kind, reason = "unsupported", f"unsupported format ({needs}; {text})"
            break
    else:
        if isinstance(exc, EOFError) or any(p in low for p in _TRUNCATED):
            kind, reason = "truncated", f"truncated ({text})"
    if said:
        reason += f"; the decoder said: {' | '.join(said)[:300]}"
    return ImageError(f"{name}: {reason}", kind=kind)


_STDERR_LOCK = threading.Lock()


@contextlib.contextmanager
def _quiet() -> Iterator[list[str]]:
    """Collect what decoders say (Python warnings, and C libraries' writes to file descriptor 2) instead of letting
    it reach the terminal. Decodes in one process take turns: file descriptor 2 and the warning filters are shared by
    every thread. The list is filled when the block ends."""
    said: list[str] = []
    with _STDERR_LOCK, tempfile.TemporaryFile() as sink, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        saved = _redirect_stderr(sink)
        try:
            yield said
        finally:
            if saved is not None:
                os.dup2(saved, 2)
                os.close(saved)
                sink.seek(0)
                said.extend(line for line in sink.read().decode("utf-8", "replace").splitlines() if line.strip())
            said.extend(str(w.message) for w in caught if not issubclass(w.category, Image.DecompressionBombWarning))


def _redirect_stderr(sink: io.IOBase) -> int | None:
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all (a daemon): nothing to keep off the terminal
        return None
    with contextlib.suppress(ValueError, OSError, AttributeError):
        sys.stderr.flush()
    os.dup2(sink.fileno(), 2)
    return saved
