"""Readers: folders, list files, tar shards and brace patterns all give the same keyed items."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from batch_helpers import make_good, make_tar

from blip2.errors import ConfigError
from blip2.processing import load_image
from blip2.sources import expand_braces, iter_items, read_item


def test_expand_braces() -> None:
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_folder_sorted_recursive_and_images_only(tmp_path: Path) -> None:
    top = make_good(tmp_path, 2)
    sub = make_good(tmp_path / "sub", 1, fmt="jpg")
    (tmp_path / "notes.txt").write_text("a caption file, not an image")
    flat = [it.key for it in iter_items([tmp_path])]
    assert flat == [str(p) for p in top]
    deep = list(iter_items([tmp_path], recursive=True))
    assert [it.key for it in deep] == [str(p) for p in top] + [str(sub[0])]
    assert deep[-1].relpath == os.path.join("sub", sub[0].name)


def test_lists_resolve_relative_to_list_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    imgs = make_good(tmp_path / "data", 3)
    (tmp_path / "data" / "a.txt").write_text("# comment\nimg000.png\n\nimg001.png\n")
    (tmp_path / "data" / "b.jsonl").write_text(
        json.dumps({"image": "img001.png", "question": "what is it?"}) + "\n" + json.dumps("img002.png") + "\n"
    )
    (tmp_path / "data" / "c.csv").write_text("id,path\n1,img002.png\n2,/abs/missing.png\n")
    monkeypatch.chdir(tmp_path)  # another working directory: the keys must not change
    items = list(iter_items(["data/a.txt", "data/b.jsonl", "data/c.csv"]))
    assert [it.key for it in items] == [
        str(imgs[0]),
        str(imgs[1]),
        str(imgs[1]),
        str(imgs[2]),
        str(imgs[2]),
        "/abs/missing.png",
    ]
    assert items[2].question == "what is it?" and items[0].question is None


def test_list_without_path_column_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "bad.csv").write_text("id,caption\n1,x\n")
    with pytest.raises(ConfigError, match="bad.csv"):
        list(iter_items([tmp_path / "bad.csv"]))


@pytest.mark.parametrize("compress", [False, True])
def test_tar_shards_by_brace_pattern(tmp_path: Path, compress: bool) -> None:
    imgs = make_good(tmp_path / "src", 4)
    suffix = ".tar.gz" if compress else ".tar"
    make_tar(tmp_path / f"shard-000{suffix}", imgs[:2], compress)
    make_tar(tmp_path / f"shard-001{suffix}", imgs[2:], compress)
    items = list(iter_items([str(tmp_path / f"shard-{{000..001}}{suffix}")]))
    assert [it.member for it in items] == [p.name for p in imgs]  # the .txt members are not images
    assert items[0].key == f"{tmp_path}/shard-000{suffix}/img000.png"
    for it, p in zip(items, imgs):
        assert read_item(it).tobytes() == load_image(p).tobytes()
