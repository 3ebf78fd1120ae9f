"""A folder of odd real-world files (tests/image_corpus.py: 55 files, many formats, modes, damaged files and non-images)
through every path a user has: `load_image`, `blip2 caption DIR`, the HTTP server and `blip2 index`.

If these fail, a user sees files silently left out of a folder's summary, a valid file (layered PSD, MPO, a JPEG with a
damaged EXIF block) refused, a reason that does not say what to do ("corrupt" for a file that needs Ghostscript), or
an image that gets one caption from the server and another from a batch run.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from image_corpus import write_corpus
from PIL import Image, ImageOps
from server_helpers import assert_error, data_uri, user_message

import blip2
from blip2.cli import main
from blip2.errors import ImageError
from blip2.images import load_image
from blip2.retrieval.build import index_images
from blip2.retrieval.index import Index

# What each failure's message says, by kind: the words a user acts on.
SAYS = {
    "truncated": "truncated",
    "corrupt": "corrupt",
    "unsupported": "unsupported format",
    "too_large": "too many pixels",
    "empty": "empty",
    "not_an_image": "not an image",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("corpus") / "odd files"
    return folder, write_corpus(folder)


@pytest.fixture(scope="module")
def alone(corpus: tuple[Path, dict[str, str]], opt_ckpt: Path) -> dict[str, str]:
    """Each image's caption, one image per call."""
    folder, expected = corpus
    m = blip2.load(opt_ckpt, device="cpu", dtype="fp32")
    return {name: m.caption(folder / name) for name, outcome in expected.items() if outcome == "image"}


def _images(expected: dict[str, str]) -> set[str]:
    return {n for n, o in expected.items() if o == "image"}


def _failures(expected: dict[str, str]) -> dict[str, str]:
    return {n: o for n, o in expected.items() if o in SAYS}


def test_the_corpus_is_big_and_varied(corpus: tuple[Path, dict[str, str]]) -> None:
    _, expected = corpus
    assert len(expected) >= 40
    assert len(_images(expected)) >= 30 and set(_failures(expected).values()) >= set(SAYS) - {"unsupported"}


def test_load_image_gives_the_frame_pillow_shows_and_a_reason_for_the_rest(corpus: tuple[Path, dict[str, str]]) -> None:
    folder, expected = corpus
    for name, outcome in expected.items():
        path = folder / name
        if outcome == "image":
            got = load_image(path)
            with Image.open(path) as shown:  # the frame a viewer shows: what Pillow opens on, upright
                want = ImageOps.exif_transpose(shown)
                assert got.size == want.size, name
                if "A" not in want.getbands() and want.info.get("transparency") is None:
                    assert np.array_equal(np.asarray(got), np.asarray(want.convert("RGB"))), name
            continue
        with pytest.raises(ImageError) as info:
            load_image(path)
        message = str(info.value)
        assert message.startswith(f"{path}: ") and "\n" not in message, message
        if outcome in SAYS:
            assert info.value.kind == outcome and SAYS[outcome] in message, message
        else:  # not an image file: no image content, no image extension
            assert info.value.kind in ("not_an_image", "empty"), message


def test_caption_dir_accounts_for_every_file(
    corpus: tuple[Path, dict[str, str]], alone: dict[str, str], opt_ckpt: Path, tmp_path: Path
) -> None:
    folder, expected = corpus
    out = tmp_path / "captions.jsonl"
    args = ["caption", folder, "--out", out, "--model", opt_ckpt, "--dtype", "fp32", "--workers", "1", "-b", "8"]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {Path(r["path"]).name: r["caption"] for r in rows} == alone  # every image, and as it is captioned alone
    errors = {Path(e["path"]).name: e["error"] for e in map(json.loads, (tmp_path / "errors.jsonl").open())}
    assert set(errors) == set(_failures(expected))
    for name, outcome in _failures(expected).items():
        assert SAYS[outcome] in errors[name], errors[name]
    not_images = len(expected) - len(alone) - len(errors)
    assert not_images == 3
    done = next(line for line in result.stderr.splitlines() if line.startswith("done: "))
    assert f"{len(alone)} captioned" in done and f"{len(errors)} failed, 3 not image files of {len(expected)}" in done
    assert "no image content and no image extension" in done  # the rule, stated
    assert "Traceback" not in result.stderr and "TIFF" not in result.stderr.replace("TIFF file", "")


def test_server_answers_each_file_as_captioned_alone(
    corpus: tuple[Path, dict[str, str]], alone: dict[str, str], opt_ckpt: Path, start_server
) -> None:
    folder, expected = corpus
    server = start_server(opt_ckpt, "--max-batch-size", "8")

    def post(name: str) -> httpx.Response:
        files = {"file": (name, (folder / name).read_bytes())}
        return httpx.post(f"{server.url}/v1/caption", files=files, timeout=120)

    names = sorted(set(alone) | set(_failures(expected)))
    with ThreadPoolExecutor(8) as pool:  # concurrent: the server batches them
        answers = dict(zip(names, pool.map(post, names)))
    for name in alone:
        assert answers[name].status_code == 200, (name, answers[name].text)
        assert answers[name].json()["text"] == alone[name], name
    for name, outcome in _failures(expected).items():
        error = assert_error(answers[name], 400, "invalid_image", SAYS[outcome])
        assert error["message"].startswith(f"file ({name}): "), error
    # A chat request's bad image is named by its place in the request.
    bad = data_uri(folder / "cut_half.jpg")
    chat = {"model": "m", "messages": [user_message(bad, "what is it?")]}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=chat, timeout=120)
    assert_error(r, 400, "invalid_image", "messages[0].content[0].image_url: truncated")
    assert server.health_seen  # the server really ran; and nothing above was a 5xx
    assert "Traceback" not in server.log.read_text()


def test_index_accounts_for_every_file(corpus: tuple[Path, dict[str, str]], itm_ckpt: Path, tmp_path: Path) -> None:
    folder, expected = corpus
    m = blip2.load(itm_ckpt, device="cpu", dtype="fp32")
    db = tmp_path / "odd.sqlite"
    summary = index_images(m, [folder], db, workers=1, batch_size=8)
    images, failures = _images(expected), _failures(expected)
    assert (summary.embedded, summary.failed, summary.not_images) == (len(images), len(failures), 3)
    assert "3 not image files skipped" in summary.line()
    with Index(db) as idx:
        assert {Path(p).name for p in idx.paths()} == images
        reasons = {Path(p).name: r for p, r, _ in idx.errors()}
    assert {n: SAYS[o] in reasons[n] for n, o in failures.items()} == dict.fromkeys(failures, True)
