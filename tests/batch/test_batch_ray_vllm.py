"""The Ray engine with one vLLM per actor (`--engine ray --engine vllm`) on a local Ray cluster on CPU: the captions
are the local vLLM engine's, every image once, and a rerun redoes only what is missing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from batch_helpers import GEN, assert_no_vllm_server_left, make_good

ray = pytest.importorskip("ray")

from blip2.batch import caption_images  # noqa: E402
from blip2.batch.engine import split_options  # noqa: E402
from blip2.batch.ray_engine import RayRun  # noqa: E402

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def cluster():
    """A local cluster of 2 CPUs; its workers inherit this process's environment (where vLLM's Python is), with a
    KV cache of 1 GiB for the actor's vLLM, which runs beside the session's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for part in sorted(out.glob("part-*.jsonl")) for line in part.read_text().splitlines()]


def test_ray_vllm_actor_matches_local_vllm_and_resumes(cluster, vllm_model, vllm_ckpt: Path, tmp_path: Path) -> None:
    """Otherwise `--engine ray --engine vllm` would write other captions than `--engine vllm` alone, caption an
    image twice or not at all, redo finished shards after an interruption, or leave vLLM servers running."""
    make_good(tmp_path / "in", 5)
    (tmp_path / "in" / "bad.png").write_bytes(b"not a png")
    inputs = [str(tmp_path / "in")]
    out = tmp_path / "caps.jsonl"
    opts = lambda: split_options({"out": [out], "engine": "vllm", "dtype": "fp32", "batch_size": 2, **GEN})  # noqa: E731
    local = {r.path: r for r in caption_images(inputs, model=vllm_model, workers=0, **GEN)}
    captions = {k: r.caption for k, r in local.items()}

    summary = RayRun(inputs, str(vllm_ckpt), opts(), num_workers=1, shard_size=2).run()
    rows = _rows(out)
    assert sorted(r["path"] for r in rows) == sorted(local)  # every image exactly once
    assert {r["path"]: r["caption"] for r in rows} == captions
    assert (summary.done, summary.failed) == (5, 1)
    assert_no_vllm_server_left(vllm_ckpt, vllm_model.url)  # else each run would leave a vLLM running

    # Lose one shard (as if the run died before writing it): a rerun redoes only its images.
    parts = sorted(out.glob("part-*"))
    lost = [json.loads(line) for line in parts[-1].read_text().splitlines()]
    parts[-1].unlink()
    good_lost = sum(r["error"] is None for r in lost)
    again = RayRun(inputs, str(vllm_ckpt), opts(), num_workers=1, shard_size=2).run()
    assert (again.resumed, again.done, again.failed) == (5 - good_lost, good_lost, 1)
    rows = _rows(out)
    assert sorted(r["path"] for r in rows) == sorted(local)
    assert {r["path"]: r["caption"] for r in rows} == captions

    # Nothing left: a third run does no work (Ray is not even asked).
    third = RayRun(inputs, str(vllm_ckpt), opts(), num_workers=1, shard_size=2).run()
    assert (third.resumed, third.done, third.failed) == (5, 0, 1)
