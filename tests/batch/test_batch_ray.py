"""The Ray engine on a real local cluster with two actors: every image once, the local engine's captions, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from batch_helpers import GEN, make_good, make_tar

ray = pytest.importorskip("ray")

from blip2.batch import caption_images  # noqa: E402
from blip2.batch.engine import split_options  # noqa: E402
from blip2.batch.ray_engine import RayRun  # noqa: E402


@pytest.fixture
def model(ours_model):
    """The run here is on `opt_ckpt` with our engine (a subprocess or Ray actors): ours is its reference."""
    return ours_model


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _read(part: Path) -> list[dict]:
    if part.suffix == ".parquet":
        return pq.read_table(part).to_pylist()
    return [json.loads(line) for line in part.read_text().splitlines()]


def _parts(out: Path) -> list[dict]:
    return [row for part in sorted(out.glob("part-*")) for row in _read(part)]


def test_ray_two_actors_match_local_and_resume(cluster, model, opt_ckpt: Path, tmp_path: Path) -> None:
    make_good(tmp_path / "in", 7)
    shard = make_tar(tmp_path / "s-000.tar", make_good(tmp_path / "tar", 3, seed=5))
    (tmp_path / "in" / "bad.png").write_bytes(b"not a png")
    inputs = [str(tmp_path / "in"), str(tmp_path / "s-{000..000}.tar")]
    out = tmp_path / "caps.parquet"
    opts = lambda: split_options({"out": [out], "batch_size": 2, "dtype": "fp32", **GEN})  # noqa: E731

    summary = RayRun(inputs, str(opt_ckpt), opts(), num_workers=2, shard_size=4).run()
    rows = _parts(out)
    local = {r.path: r for r in caption_images(inputs, model=model, workers=0, **GEN)}
    assert sorted(r["path"] for r in rows) == sorted(local)  # every image exactly once
    assert {r["path"]: r["caption"] for r in rows} == {k: r.caption for k, r in local.items()}
    # total counts every file: 11 images and the shard's 3 text members, counted as not image files
    assert (summary.done, summary.failed, summary.not_images, summary.total) == (10, 1, 3, 14)
    assert [json.loads(line)["path"] for line in (tmp_path / "errors.jsonl").read_text().splitlines()] == [
        str(tmp_path / "in" / "bad.png")
    ]
    assert f"{shard}/img000.png" in local

    # Lose one shard (as if the run died before writing it): a rerun redoes only its images.
    parts = sorted(out.glob("part-*"))
    assert len(parts) == 3
    lost = {r["path"] for r in _read(parts[0])}
    parts[0].unlink()
    again = RayRun(inputs, str(opt_ckpt), opts(), num_workers=2, shard_size=4).run()
    assert again.resumed == 11 - len(lost) and again.done + again.failed == len(lost)
    rows = _parts(out)
    assert sorted(r["path"] for r in rows) == sorted(local)
    assert {r["path"]: r["caption"] for r in rows} == {k: r.caption for k, r in local.items()}


def test_jsonl_shards_resume_without_ray_work(opt_ckpt: Path, tmp_path: Path) -> None:
    """A finished JSONL shard's images are not sent to Ray again; with all done, Ray is not even started."""
    make_good(tmp_path / "in", 2)
    out = tmp_path / "caps.jsonl"
    make = lambda: RayRun([str(tmp_path / "in")], str(opt_ckpt), split_options({"out": [out], **GEN}))  # noqa: E731
    run = make()
    run._check_run_file()
    rows = [
        {
            "key": str(tmp_path / "in" / f"img00{i}.png"),
            "caption": "x",
            "score": 0.0,
            "prompt": "",
            "error": None,
            "time": "t",
        }
        for i in range(2)
    ]
    run._write_shard(0, rows)
    summary = make().run()
    assert (summary.resumed, summary.done) == (2, 0)
    assert [r["path"] for r in _parts(out)] == [r["key"] for r in rows]
