"""The local engine: the API's captions, batch-invariant; sidecars; manifests; bad inputs; resume bookkeeping."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from batch_helpers import GEN, make_bad, make_good, make_tar

from blip2.batch import BatchRun, caption_images
from blip2.batch.engine import split_options
from blip2.batch.ledger import repair_jsonl
from blip2.errors import ConfigError


def _opts(**kw):
    return split_options({"workers": 0, **GEN, **kw})


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("workers", [0, 1])
def test_captions_equal_one_by_one_api(model, tmp_path: Path, workers: int) -> None:
    imgs = make_good(tmp_path / "in", 7)
    results = list(caption_images([tmp_path / "in"], model=model, batch_size=3, workers=workers, **GEN))
    assert [r.path for r in results] == [str(p) for p in imgs]
    assert [r.caption for r in results] == [model.caption(str(p), **GEN) for p in imgs]  # batch of one each
    assert all(r.status == "done" for r in results)


def test_prompt_and_question_match_api(model, tmp_path: Path) -> None:
    imgs = make_good(tmp_path / "in", 3)
    prompted = [r.caption for r in caption_images(imgs, model=model, prompt="a photo of", workers=0, **GEN)]
    assert prompted == [model.caption(str(p), prompt="a photo of", **GEN) for p in imgs]
    answers = [r.caption for r in caption_images(imgs, model=model, question="what is it?", workers=0)]
    assert answers == [model.ask(str(p), "what is it?") for p in imgs]


def test_bad_inputs_are_logged_and_skipped(model, tmp_path: Path) -> None:
    good = make_good(tmp_path / "in", 2)
    bad = make_bad(tmp_path / "in")
    listing = tmp_path / "list.txt"
    names = [p.name for p in good + list(bad.values())] + ["missing.png", "anim.gif", "."]
    listing.write_text("\n".join(f"in/{n}" for n in names) + "\n")
    out = tmp_path / "out" / "caps.jsonl"
    run = BatchRun([listing], model, _opts(out=[out], batch_size=2))
    results = {Path(r.path).name: r for r in run}
    reasons = {Path(e["path"]).name: e["error"] for e in _jsonl(out.parent / "errors.jsonl")}
    assert set(reasons) == {"zero.jpg", "half.jpg", "garbage.jpg", "text.png", "bomb.png", "missing.png", "in"}
    for word, name in [
        ("empty", "zero.jpg"),
        ("truncated", "half.jpg"),
        ("not an image", "text.png"),
        ("too large", "bomb.png"),
        ("no such file", "missing.png"),
        ("directory", "in"),
    ]:
        assert word in reasons[name].lower() and results[name].status == "failed"
    assert "garbage.jpg" in reasons["garbage.jpg"]  # the message names the file
    assert results["anim.gif"].status == "done"  # first frame
    assert {Path(r["path"]).name for r in _jsonl(out)} == {p.name for p in good} | {"anim.gif"}
    s = run.summary
    assert (s.total, s.done, s.failed) == (10, 3, 7)


def test_sidecars_beside_and_mirrored(model, tmp_path: Path) -> None:
    make_good(tmp_path / "in", 2)
    make_good(tmp_path / "in" / "sub", 1, seed=1)
    list(
        caption_images(
            [tmp_path / "in"],
            model=model,
            sidecar=True,
            ext="caption",
            recursive=True,
            prefix="sks, ",
            suffix=".",
            workers=0,
            **GEN,
        )
    )
    text = (tmp_path / "in" / "sub" / "img000.caption").read_text(encoding="utf-8")
    assert text == "sks, " + model.caption(str(tmp_path / "in" / "sub" / "img000.png"), **GEN) + ".\n"
    list(
        caption_images(
            [tmp_path / "in"],
            model=model,
            sidecar_dir=tmp_path / "caps",
            recursive=True,
            out=[tmp_path / "m.jsonl"],
            workers=0,
            **GEN,
        )
    )
    assert sorted(p.relative_to(tmp_path / "caps").as_posix() for p in (tmp_path / "caps").rglob("*.txt")) == [
        "img000.txt",
        "img001.txt",
        "sub/img000.txt",
    ]


@pytest.mark.parametrize("existing", ["skip", "overwrite", "append", "prepend"])
def test_existing_policy(model, tmp_path: Path, existing: str) -> None:
    imgs = make_good(tmp_path / "in", 2)
    (tmp_path / "in" / "img000.txt").write_text("old tags\n", encoding="utf-8")
    results = list(caption_images([tmp_path / "in"], model=model, sidecar=True, existing=existing, workers=0, **GEN))
    cap = model.caption(str(imgs[0]), **GEN)
    want = {
        "skip": "old tags\n",
        "overwrite": f"{cap}\n",
        "append": f"old tags, {cap}\n",
        "prepend": f"{cap}, old tags\n",
    }[existing]
    assert (tmp_path / "in" / "img000.txt").read_text(encoding="utf-8") == want
    assert [r.status for r in results] == (["skipped", "done"] if existing == "skip" else ["done", "done"])
    # A second run finds both done (or skipped) and changes nothing: appending twice would be a bug.
    again = BatchRun([tmp_path / "in"], model, _opts(sidecar=True, existing=existing))
    assert [r.status for r in again if r.status != "skipped"] == []
    assert (tmp_path / "in" / "img000.txt").read_text(encoding="utf-8") == want


def test_tar_member_sidecars_need_a_folder(model, tmp_path: Path) -> None:
    shard = make_tar(tmp_path / "s.tar", make_good(tmp_path / "src", 2))
    with pytest.raises(ConfigError, match="--sidecar-dir"):
        list(caption_images([shard], model=model, sidecar=True, workers=0))
    list(caption_images([shard], model=model, sidecar_dir=tmp_path / "caps", workers=0, **GEN))
    assert (tmp_path / "caps" / "s.tar" / "img001.txt").is_file()


def test_jsonl_and_parquet_manifests_and_resume(model, tmp_path: Path) -> None:
    make_good(tmp_path / "in", 5)
    outs = [tmp_path / "o" / "r.jsonl", tmp_path / "o" / "r.parquet"]
    first = BatchRun([tmp_path / "in"], model, _opts(out=outs, batch_size=2))
    done = list(first)
    rows = _jsonl(outs[0])
    assert [r["caption"] for r in rows] == [r.caption for r in done]
    assert (
        rows[0]["model"] == model.name
        and rows[0]["options"]["max_new_tokens"] == GEN["max_new_tokens"]
        and rows[0]["time"]
    )
    assert pq.read_table(outs[1]).to_pylist() == rows
    # Same command again: nothing to do, nothing duplicated.
    second = BatchRun([tmp_path / "in"], model, _opts(out=outs))
    assert list(second) == [] and second.summary.resumed == 5
    assert len(_jsonl(outs[0])) == 5 and pq.read_table(outs[1]).num_rows == 5
    with pytest.raises(ConfigError, match="r.progress.sqlite"):  # other settings: refuse to mix two runs
        list(caption_images([tmp_path / "in"], model=model, out=outs, prompt="a photo of", workers=0))


def test_parquet_output_without_pyarrow_is_refused_before_any_work(monkeypatch, tmp_path: Path) -> None:
    """Otherwise a core install (pyarrow comes with the ray extra) would caption a whole folder, then fail to write."""
    import importlib.util

    from blip2.batch import BatchOptions

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pyarrow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"r\.parquet: Parquet output needs pyarrow"):
        BatchOptions(out=[tmp_path / "r.parquet"])
    BatchOptions(out=[tmp_path / "r.jsonl"])  # JSONL needs nothing more


def test_torn_jsonl_tail_is_repaired(model, tmp_path: Path) -> None:
    make_good(tmp_path / "in", 4)
    out = tmp_path / "r.jsonl"
    list(caption_images([tmp_path / "in"], model=model, out=[out], workers=0, **GEN))
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:2]) + lines[2][:17])  # as if killed while writing the third line
    assert len(repair_jsonl(out)) == 2 and out.read_bytes() == b"".join(lines[:2])
    out.write_bytes(b"".join(lines[:1]) + lines[1][:9])
    list(caption_images([tmp_path / "in"], model=model, out=[out], workers=0, **GEN))  # the ledger refills it
    assert sorted(out.read_bytes().splitlines(keepends=True)) == sorted(lines)


def test_existing_manifest_without_ledger_is_refused(model, tmp_path: Path) -> None:
    make_good(tmp_path / "in", 1)
    (tmp_path / "r.jsonl").write_text('{"path": "x"}\n')
    with pytest.raises(ConfigError, match="r.progress.sqlite"):
        list(caption_images([tmp_path / "in"], model=model, out=[tmp_path / "r.jsonl"], workers=0))
