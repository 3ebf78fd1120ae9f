"""A corpus of odd real-world image files, written by code: many formats and modes, multi-frame and layered files,
files that need a program the running machine may lack, damaged files, and files that are not images at all.

`write_corpus(folder)` writes it and returns what a user should see for each file name:
- `"image"`: decoded and captioned (its frame: the one `Image.open(f).convert("RGB")` gives);
- `"not_image_file"`: a folder scan counts it as "skipped: not an image file" (no image content, no image extension);
- an `ImageError.kind` (`"truncated"`, `"corrupt"`, ...): listed with that reason.
"""

from __future__ import annotations

import io
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

Maker = Callable[[], bytes]


def _rgb(w: int = 40, h: int = 30, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h // 5 + 1, w // 5 + 1, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((w, h), Image.Resampling.NEAREST)  # blocky: compresses, survives JPEG


def _save(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _frames(n: int, mode: str = "RGB", size: tuple[int, int] = (32, 24)) -> list[Image.Image]:
    return [_rgb(*size, seed=10 + i).convert(mode) for i in range(n)]


def psd(layers: int = 2, size: tuple[int, int] = (24, 16)) -> bytes:
    """A layered RGB Photoshop file with a composite image (Pillow reads PSD but cannot write it)."""
    w, h = size
    comp = np.asarray(_rgb(w, h, seed=3))
    records, channel_data = b"", b""
    for i in range(layers):
        layer = np.asarray(_rgb(w, h, seed=20 + i))
        planes = [layer[..., c].tobytes() for c in range(3)]
        records += struct.pack(">4iH", 0, 0, h, w, 3)
        records += b"".join(struct.pack(">hI", c, 2 + len(planes[c])) for c in range(3))
        name = f"layer {i}".encode()
        pascal = bytes([len(name)]) + name
        pascal += b"\0" * (-len(pascal) % 4)
        extra = struct.pack(">II", 0, 0) + pascal
        records += b"8BIMnorm" + bytes([255, 0, 0, 0]) + struct.pack(">I", len(extra)) + extra
        channel_data += b"".join(struct.pack(">H", 0) + p for p in planes)
    layer_info = struct.pack(">h", layers) + records + channel_data
    layer_info += b"\0" * (len(layer_info) % 2)
    layer_and_mask = struct.pack(">I", len(layer_info)) + layer_info + struct.pack(">I", 0)
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, h, w, 8, 3)
    image = struct.pack(">H", 0) + b"".join(comp[..., c].tobytes() for c in range(3))
    return (
        header
        + struct.pack(">I", 0)
        + struct.pack(">I", 0)
        + struct.pack(">I", len(layer_and_mask))
        + (layer_and_mask + image)
    )


def _exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    return _save(_rgb(40, 20), "JPEG", exif=exif.tobytes())


def _jpeg_with_truncated_exif() -> bytes:
    """A JPEG whose APP1 EXIF segment claims an IFD entry pointing past its end (seen in phone and camera files)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010E] = "a description long enough to be stored out of line"
    raw = bytearray(exif.tobytes())
    raw = raw[: len(raw) - 20]  # the out-of-line string is cut off
    return _save(_rgb(40, 20, seed=5), "JPEG", exif=bytes(raw))


def _bmp_bad_bitfields() -> bytes:
    """A valid-looking 32-bit BI_BITFIELDS BMP with masks Pillow has no raw mode for."""
    w, h = 4, 2
    masks = struct.pack("<4I", 0x3FF00000, 0x000FFC00, 0x000003FF, 0)  # 10-10-10 bits, no alpha
    info = struct.pack("<IiiHHIIiiII", 56, w, h, 1, 32, 3, w * h * 4, 2835, 2835, 0, 0) + masks
    pixels = b"\x7f" * (w * h * 4)
    offset = 14 + len(info)
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + info + pixels


def _huge_header_png() -> bytes:
    """A PNG header declaring 60000 x 60000 pixels (3.6 gigapixels): must be refused before any allocation."""
    data = bytearray(_save(Image.new("L", (1, 1)), "PNG"))
    data[16:24] = struct.pack(">II", 60000, 60000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # a valid IHDR chunk: only the size is odd
    return bytes(data)


def _wmf() -> bytes:
    """A placeable Windows metafile header (Pillow reads its size; drawing it needs Windows)."""
    placeable = b"\xd7\xcd\xc6\x9a\0\0" + struct.pack("<4hH4xH", 0, 0, 1000, 500, 1000, 0)
    return placeable + b"\x01\x00\x09\x00\x00\x03" + bytes(40)


def _corrupt_png() -> bytes:
    data = bytearray(_save(_rgb(64, 48, seed=7), "PNG"))
    mid = len(data) // 2
    data[mid : mid + 40] = bytes(40)
    return bytes(data)


def _cut(maker: Maker, at: float | int) -> Maker:
    def cut() -> bytes:
        data = maker()
        n = int(len(data) * at) if isinstance(at, float) else at
        return data[:n]

    return cut


def corpus() -> dict[str, tuple[Maker, str]]:
    """file name -> (bytes maker, expected outcome)."""
    png = lambda: _save(_rgb(), "PNG")  # noqa: E731
    jpeg = lambda: _save(_rgb(64, 48, seed=1), "JPEG", quality=90)  # noqa: E731
    gif = lambda: _save(_frames(3, "P")[0], "GIF", save_all=True, append_images=_frames(3, "P")[1:])  # noqa: E731
    tiff_lzw = lambda: _save(_rgb(64, 48, seed=2), "TIFF", compression="tiff_lzw")  # noqa: E731
    has_gs = shutil.which("gs") is not None
    files: dict[str, tuple[Maker, str]] = {
        # ---- images, in many formats and modes
        "rgb.png": (png, "image"),
        "rgba.png": (lambda: _save(_rgb().convert("RGBA"), "PNG"), "image"),
        "la.png": (lambda: _save(_rgb().convert("LA"), "PNG"), "image"),
        "palette_transparent.png": (lambda: _save(_rgb().convert("P"), "PNG", transparency=0), "image"),
        "sixteen_bit.png": (lambda: _save(_rgb().convert("I;16"), "PNG"), "image"),
        "one_bit.png": (lambda: _save(_rgb().convert("1"), "PNG"), "image"),
        "gray.png": (lambda: _save(_rgb().convert("L"), "PNG"), "image"),
        "animated.png": (lambda: _save(_frames(3)[0], "PNG", save_all=True, append_images=_frames(3)[1:]), "image"),
        "photo.jpg": (jpeg, "image"),
        "cmyk.jpg": (lambda: _save(_rgb().convert("CMYK"), "JPEG"), "image"),
        "exif_rotated.jpg": (_exif_rotated_jpeg, "image"),
        "truncated_exif.jpg": (_jpeg_with_truncated_exif, "image"),
        "gray.jpeg": (lambda: _save(_rgb().convert("L"), "JPEG"), "image"),
        "progressive.jpg": (lambda: _save(_rgb(64, 48), "JPEG", progressive=True), "image"),
        "animated.gif": (gif, "image"),
        "still.gif": (lambda: _save(_rgb().convert("P"), "GIF"), "image"),
        "lossy.webp": (lambda: _save(_rgb(), "WEBP", quality=80), "image"),
        "animated.webp": (lambda: _save(_frames(3)[0], "WEBP", save_all=True, append_images=_frames(3)[1:]), "image"),
        "lossless_alpha.webp": (lambda: _save(_rgb().convert("RGBA"), "WEBP", lossless=True), "image"),
        "pages.tif": (lambda: _save(_frames(3)[0], "TIFF", save_all=True, append_images=_frames(3)[1:]), "image"),
        "lzw.tiff": (tiff_lzw, "image"),
        "sixteen_bit.tif": (lambda: _save(_rgb().convert("I;16"), "TIFF"), "image"),
        "cmyk.tif": (lambda: _save(_rgb().convert("CMYK"), "TIFF"), "image"),
        "rgb.bmp": (lambda: _save(_rgb(), "BMP"), "image"),
        "palette.bmp": (lambda: _save(_rgb().convert("P"), "BMP"), "image"),
        "sizes.ico": (lambda: _save(_rgb(48, 48), "ICO", sizes=[(16, 16), (32, 32), (48, 48)]), "image"),
        "layered.psd": (psd, "image"),
        "stereo.mpo": (lambda: _save(_frames(2)[0], "MPO", save_all=True, append_images=_frames(2)[1:]), "image"),
        "stereo_named_jpeg.jpg": (
            lambda: _save(_frames(2, size=(20, 20))[0], "MPO", save_all=True, append_images=_frames(2)[1:]),
            "image",
        ),
        "portable.ppm": (lambda: _save(_rgb(), "PPM"), "image"),
        "targa.tga": (lambda: _save(_rgb(), "TGA"), "image"),
        "paintbrush.pcx": (lambda: _save(_rgb(), "PCX"), "image"),
        "silicon.sgi": (lambda: _save(_rgb(), "SGI"), "image"),
        "apple.icns": (lambda: _save(_rgb(32, 32), "ICNS"), "image"),
        "quite_ok.qoi": (lambda: _save(_rgb(), "QOI"), "image"),
        "png_named.dat": (png, "image"),  # content decides, not the extension
        # ---- valid files this Pillow cannot decode without a program or platform library
        "vector.eps": (
            lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\n",
            "image" if has_gs else "unsupported",
        ),
        "drawing.wmf": (_wmf, "unsupported"),
        "science.h5": (lambda: b"\x89HDF\r\n\x1a\n" + bytes(200), "unsupported"),
        "bitfields.bmp": (_bmp_bad_bitfields, "unsupported"),
        # ---- damaged files
        "huge_header.png": (_huge_header_png, "too_large"),
        "cut_header.png": (_cut(png, 30), "corrupt"),  # "truncated or corrupt": only the signature is left
        "cut_half.png": (_cut(png, 0.5), "truncated"),
        "cut_end.png": (_cut(png, -20), "image"),  # only the end marker is lost: Pillow reads it, so must we
        "cut_half.jpg": (_cut(jpeg, 0.5), "truncated"),
        "cut_end.jpg": (_cut(jpeg, -10), "truncated"),
        "cut_half.gif": (_cut(gif, 0.5), "image"),  # the first frame is whole
        "cut_first_frame.gif": (_cut(gif, 0.2), "truncated"),
        "cut_half.tif": (_cut(tiff_lzw, 0.5), "corrupt"),  # its directory sits at the end: unreadable header
        "corrupt_middle.png": (_corrupt_png, "corrupt"),
        "empty.jpg": (lambda: b"", "empty"),
        "notes.jpg": (lambda: b"these are my notes, not a photo\n", "not_an_image"),
        # ---- not images at all: counted, not listed, by a folder scan
        "readme.txt": (lambda: b"captions for the holiday photos\n", "not_image_file"),
        "meta.json": (lambda: b'{"album": "holiday"}\n', "not_image_file"),
        "empty_notes.md": (lambda: b"", "not_image_file"),
    }
    return files


def write_corpus(folder: Path) -> dict[str, str]:
    """Write every corpus file into `folder`; return file name -> expected outcome."""
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}
    for name, (make, outcome) in corpus().items():
        (folder / name).write_bytes(make())
        expected[name] = outcome
    return expected
