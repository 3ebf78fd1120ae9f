"""Kill a real captioning process with SIGKILL mid-run, twice, then finish it: every image exactly once everywhere,
the same captions as an uninterrupted run, and no sidecar appended to twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from batch_helpers import GEN, assert_no_vllm_server_left, make_good


@pytest.fixture
def model(ours_model):
    """The run here is on `opt_ckpt` with our engine (a subprocess or Ray actors): ours is its reference."""
    return ours_model


CHILD = """
import sys, time
import blip2.batch.run as run_module

real = run_module.generate_batch
def slow(*args, **kwargs):  # slow the tiny model down so that the parent can kill us mid-run
    time.sleep(0.2)
    return real(*args, **kwargs)
run_module.generate_batch = slow

from blip2.batch import caption_images
ckpt, folder, out, caps, workers = sys.argv[1:6]
engine = sys.argv[6] if len(sys.argv) > 6 else "ours"
for _ in caption_images([folder], model=ckpt, out=[out, out[:-6] + ".parquet"], sidecar_dir=caps, existing="append",
                        batch_size=2, workers=int(workers), device="cpu", dtype="fp32", max_new_tokens=MAX_NEW,
                        engine=engine):
    pass
""".replace("MAX_NEW", str(GEN["max_new_tokens"]))


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _start(script: Path, args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, str(script), *args], env=env, stderr=subprocess.PIPE)


def test_sigkill_and_rerun_exactly_once(model, opt_ckpt: Path, tmp_path: Path) -> None:
    imgs = make_good(tmp_path / "in", 10)
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    caps = tmp_path / "caps"
    caps.mkdir()
    for p in imgs[::3]:  # some images already have tags: --existing append must add the caption exactly once
        (caps / f"{p.stem}.txt").write_text("old tags\n", encoding="utf-8")
    out = tmp_path / "out" / "run.jsonl"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    args = [str(opt_ckpt), str(tmp_path / "in"), str(out), str(caps)]

    for kill_after, workers in ((2, "1"), (6, "0")):
        proc = _start(script, [*args, workers])
        deadline = time.monotonic() + 120
        while _lines(out) < kill_after and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert _lines(out) < len(imgs)  # killed mid-run, with work left
    assert not (tmp_path / "out" / "run.parquet").exists()  # Parquet only appears when a run completes

    proc = _start(script, [*args, "0"])
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]

    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in imgs)  # each image once
    want = {str(p): model.caption(str(p), **GEN) for p in imgs}  # uninterrupted, one by one
    assert {r["path"]: r["caption"] for r in rows} == want
    assert sorted(pq.read_table(out.with_suffix(".parquet")).to_pylist(), key=lambda r: r["path"]) == sorted(
        rows, key=lambda r: r["path"]
    )
    errors = [json.loads(line) for line in (out.parent / "errors.jsonl").read_text().splitlines()]
    assert [e["path"] for e in errors] == [str(tmp_path / "in" / "broken.png")]
    for i, p in enumerate(imgs):
        text = (caps / f"{p.stem}.txt").read_text(encoding="utf-8")
        assert text == (f"old tags, {want[str(p)]}\n" if i % 3 == 0 else f"{want[str(p)]}\n")
    assert not list(caps.glob(".*.blip2tmp"))  # no temp file left over once every write has been redone


@pytest.mark.vllm
def test_sigkill_with_the_vllm_engine_then_rerun_exactly_once(vllm_model, vllm_ckpt: Path, tmp_path: Path) -> None:
    """Otherwise `--engine vllm` would lose or repeat captions when its process is killed, or leave the killed run's
    vLLM server running."""
    imgs = make_good(tmp_path / "in", 8)
    out = tmp_path / "out" / "run.jsonl"
    caps = tmp_path / "caps"
    caps.mkdir()
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    args = [str(vllm_ckpt), str(tmp_path / "in"), str(out), str(caps), "0", "vllm"]

    proc = _start(script, args)
    deadline = time.monotonic() + 600  # the child starts its own vLLM first
    while _lines(out) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _lines(out) < len(imgs)
    assert_no_vllm_server_left(vllm_ckpt, vllm_model.url)  # the watchdog stops it when its parent dies

    proc = _start(script, args)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err.decode()[-2000:]
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in imgs)  # each image once
    want = {str(p): vllm_model.caption(str(p), **GEN) for p in imgs}  # uninterrupted, on the session's vLLM
    assert {r["path"]: r["caption"] for r in rows} == want
    for p in imgs:
        assert (caps / f"{p.stem}.txt").read_text(encoding="utf-8") == f"{want[str(p)]}\n"
    assert_no_vllm_server_left(vllm_ckpt, vllm_model.url)
