"""Helpers of the batch tests: folders of good and broken images, tar shards."""

from __future__ import annotations

import io
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

GEN = {"max_new_tokens": 6}  # short: the tiny model's text is gibberish anyway, only equality matters


def make_good(folder: Path, n: int, seed: int = 0, fmt: str = "png") -> list[Path]:
    """`n` distinct small images (varied sizes, so batches mix shapes before the resize)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = 20 + (i * 7) % 30, 24 + (i * 11) % 40
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        path = folder / f"img{i:03d}.{fmt}"
        Image.fromarray(arr, "RGB").save(path)
        out.append(path)
    return out


def make_bad(folder: Path) -> dict[str, Path]:
    """One file per way an input can be broken; each must be skipped with its reason."""
    folder.mkdir(parents=True, exist_ok=True)
    good = io.BytesIO()
    Image.fromarray(np.full((40, 40, 3), 120, np.uint8)).save(good, format="JPEG")
    data = good.getvalue()
    files = {
        "empty": ("zero.jpg", b""),
        "truncated": ("half.jpg", data[: len(data) // 2]),
        "corrupt": ("garbage.jpg", data[:20] + bytes(range(256)) * 4),
        "not_image": ("text.png", b"hello, I am not a picture\n"),
    }
    out = {}
    for key, (name, content) in files.items():
        (folder / name).write_bytes(content)
        out[key] = folder / name
    # Decompression bomb: 12000 x 12000 = 144 MP, above the 100 MP limit, yet a few kB on disk (1-bit PNG).
    Image.new("1", (12000, 12000)).save(folder / "bomb.png")
    out["bomb"] = folder / "bomb.png"
    # Animated GIF: not broken, its first frame is captioned.
    frames = [Image.new("RGB", (30, 30), c) for c in ((200, 0, 0), (0, 200, 0))]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    return out


def make_tar(path: Path, images: list[Path], compress: bool = False) -> Path:
    """A WebDataset-style shard: `key.jpg`/`key.png` plus a `key.txt` that is not an image."""
    with tarfile.open(path, "w:gz" if compress else "w") as tar:
        for p in images:
            tar.add(p, arcname=p.name)
            info = tarfile.TarInfo(p.stem + ".txt")
            text = b"not an image"
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text))
    return path


def vllm_servers(folder: Path, but_url: str) -> list[int]:
    """Pids of vLLM servers of `folder` running on this machine, but the one at `but_url` (the session's)."""
    port = but_url.rsplit(":", 1)[1]
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue  # ended meanwhile
        if b"vllm.entrypoints.openai.api_server" in args and str(folder).encode() in args:
            if port.encode() not in args:
                pids.append(int(cmdline.parent.name))
    return pids


def assert_no_vllm_server_left(folder: Path, but_url: str) -> None:
    """Within a minute (a server stopping takes a few seconds), no vLLM server of `folder` but the session's."""
    deadline = time.monotonic() + 60  # a server stopping takes a few seconds
    while vllm_servers(folder, but_url) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert vllm_servers(folder, but_url) == [], "a vLLM server outlived the process that started it"
