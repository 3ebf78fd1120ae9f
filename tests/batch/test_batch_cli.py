"""`blip2 caption DIR_OR_LIST ...`: the batch branch of the caption command, its exit codes and SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from batch_helpers import GEN, make_bad, make_good
from click.testing import CliRunner

from blip2.cli import main


@pytest.fixture
def model(ours_model):
    """The run here is on `opt_ckpt` with our engine (a subprocess or Ray actors): ours is its reference."""
    return ours_model


def _base(ckpt: Path) -> list[str]:
    return ["-m", str(ckpt), "--device", "cpu", "--dtype", "fp32", "--workers", "0",
            "--max-new-tokens", str(GEN["max_new_tokens"])]  # fmt: skip


def test_folder_to_sidecars_and_manifest(model, opt_ckpt: Path, tmp_path: Path) -> None:
    imgs = make_good(tmp_path / "in", 3)
    (tmp_path / "in" / "broken.jpg").write_bytes(b"")
    out = tmp_path / "caps.jsonl"
    args = ["caption", str(tmp_path / "in"), "--out", str(out), "--sidecar", "--ext", "caption", "--prefix", "sks, "]
    result = CliRunner().invoke(main, [*args, *_base(opt_ckpt)])
    assert result.exit_code == 0, result.output
    assert "3 captioned" in result.stderr and "1 failed" in result.stderr and "errors.jsonl" in result.stderr
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    want = ["sks, " + model.caption(str(p), **GEN) for p in imgs]
    assert [r["caption"] for r in rows] == want
    sidecars = [(tmp_path / "in" / f"{p.stem}.caption").read_text(encoding="utf-8") for p in imgs]
    assert sidecars == [w + "\n" for w in want]
    again = CliRunner().invoke(main, [*args, *_base(opt_ckpt)])  # resumed: nothing left to do
    assert again.exit_code == 0 and "0 captioned, 3 captioned before, 0 skipped, 1 failed" in again.stderr


def test_folder_without_outputs_prints_captions(model, opt_ckpt: Path, tmp_path: Path) -> None:
    imgs = make_good(tmp_path / "in", 2)
    result = CliRunner().invoke(main, ["caption", str(tmp_path / "in"), *_base(opt_ckpt)])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [f"{p}\t{model.caption(str(p), **GEN)}" for p in imgs]


def test_nothing_captionable_exits_2(opt_ckpt: Path, tmp_path: Path) -> None:
    bad = make_bad(tmp_path / "in")
    (tmp_path / "in" / "anim.gif").unlink()
    result = CliRunner().invoke(main, ["caption", str(tmp_path / "in"), "--out", str(tmp_path / "r.jsonl"),
                                       *_base(opt_ckpt)])  # fmt: skip
    assert result.exit_code == 2 and "no image could be captioned" in result.stderr
    logged = [json.loads(line)["path"] for line in (tmp_path / "errors.jsonl").read_text().splitlines()]
    assert sorted(logged) == sorted(str(p) for k, p in bad.items())
    empty = CliRunner().invoke(main, ["caption", str(tmp_path / "nothing"), "--out", str(tmp_path / "e.jsonl"),
                                      *_base(opt_ckpt)])  # fmt: skip
    assert empty.exit_code == 2


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_then_rerun(model, opt_ckpt: Path, tmp_path: Path) -> None:
    imgs = make_good(tmp_path / "in", 10)
    out = tmp_path / "caps.jsonl"
    cmd = [sys.executable, "-m", "blip2", "caption", str(tmp_path / "in"), "--out", str(out), "--batch-size", "1",
           *_base(opt_ckpt)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while (not out.exists() or out.read_bytes().count(b"\n") < 2) and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the run finished before SIGTERM arrived")
    assert proc.returncode == 143, err.decode()[-2000:]
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=300).returncode == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in imgs)
    assert {r["path"]: r["caption"] for r in rows} == {str(p): model.caption(str(p), **GEN) for p in imgs}


def test_compile_flag_captions_a_folder_as_without_it(model, opt_ckpt: Path, tmp_path: Path) -> None:
    """If this fails, `blip2 caption DIR --compile` does not reach the model (no compiled step) or changes captions."""
    imgs = make_good(tmp_path / "in", 3)
    out = tmp_path / "caps.jsonl"
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    args = ["caption", str(tmp_path / "in"), "--out", str(out), "--compile", *_base(opt_ckpt)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["caption"] for r in rows] == [model.caption(str(p), **GEN) for p in imgs]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # the flag was not dropped on the way
