"""Two processes on the CPU (gloo): the gathered ITC equals one process over the concatenated batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from blip2.train import train
from blip2.train.losses import itc_loss

HERE = Path(__file__).resolve().parent
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def _env() -> dict[str, str]:
    src = str(HERE.parents[1] / "src")
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([src, str(HERE)])}


def test_gathered_itc_equals_one_process_over_the_whole_batch(tmp_path):
    """If this fails, negatives from other GPUs are missing or misaligned (wrong targets) in multi-GPU training."""
    subprocess.run([sys.executable, str(HERE / "train_dist_worker.py"), str(tmp_path)], check=True, env=_env())
    sys.path.insert(0, str(HERE))
    from train_dist_worker import B, full_batch

    image, text = full_batch()
    image.requires_grad_()
    text.requires_grad_()
    temp = torch.tensor(0.07, requires_grad=True)
    single = itc_loss(image, text, temp)
    single.loss.backward()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for with_grad in (False, True):
        mean = (ranks[0][with_grad]["loss"] + ranks[1][with_grad]["loss"]) / 2
        torch.testing.assert_close(mean, single.loss.detach(), atol=1e-6, rtol=0)
        torch.testing.assert_close((ranks[0][with_grad]["temp"] + ranks[1][with_grad]["temp"]) / 2, temp.grad)
    # with gradients through the gather, averaging the processes' gradients (what DDP does) gives the
    # single-process gradient exactly: each process' features get the gradient of every process' loss
    for r in range(2):
        rows = slice(r * B, (r + 1) * B)
        torch.testing.assert_close(ranks[r][True]["image"] / 2, image.grad[rows], atol=1e-6, rtol=0)
        torch.testing.assert_close(ranks[r][True]["text"] / 2, text.grad[rows], atol=1e-6, rtol=0)


def test_two_process_training_run(tiny, tmp_path):
    """If this fails, `torchrun`/`accelerate launch` training breaks, or its ITC is not over the whole batch."""
    cfg = tiny.stage1(tmp_path / "two", steps=1, batch_size=3, augment=False, qformer={**tiny_qformer(), **NO_DROPOUT})
    (tmp_path / "run.yaml").write_text(json.dumps(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "blip2"]
    subprocess.run([*cmd, "train", str(tmp_path / "run.yaml")], check=True, env=_env(), timeout=300)
    two = json.loads((tmp_path / "two" / "log.jsonl").read_text().splitlines()[0])
    one_cfg = {**cfg, "out": str(tmp_path / "one"), "batch_size": 6}
    train(one_cfg)
    one = json.loads((tmp_path / "one" / "log.jsonl").read_text().splitlines()[0])
    assert abs(two["itc"] - one["itc"]) < 1e-5
    assert (tmp_path / "two" / "model" / "model.safetensors").is_file()


def tiny_qformer() -> dict:
    from conftest import QFORMER

    return QFORMER
