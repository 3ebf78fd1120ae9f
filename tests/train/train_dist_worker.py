"""Run by test_train_distributed: ITC in two gloo processes; each saves its loss and gradients to OUT/rank{r}.pt.

Usage: python train_dist_worker.py OUT. This process is rank 0 and starts rank 1.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from blip2.train import losses

B, NQ, E = 3, 2, 8  # per process


def full_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """The same 2B pairs in every process (and in the test): (2B, Nq, E) images and (2B, E) texts."""
    gen = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(2 * B, NQ, E, generator=gen), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(2 * B, E, generator=gen), dim=-1)
    return image, text


def worker(rank: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=2)
    image, text = full_batch()
    results = {}
    for with_grad in (False, True):
        img = image[rank * B : (rank + 1) * B].clone().requires_grad_()
        txt = text[rank * B : (rank + 1) * B].clone().requires_grad_()
        temp = torch.tensor(0.07, requires_grad=True)
        loss = losses.itc_loss(img, txt, temp, gather_with_grad=with_grad).loss
        loss.backward()
        results[with_grad] = {"loss": loss.detach(), "image": img.grad, "text": txt.grad, "temp": temp.grad}
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    other = mp.get_context("spawn").Process(target=worker, args=(1, sys.argv[1]))
    other.start()
    worker(0, sys.argv[1])
    other.join()
    sys.exit(other.exitcode)
