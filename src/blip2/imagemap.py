"""The image-map engine: items -> decoded pixels -> batches -> the caller's model -> the caller's flush.

Batch captioning (`blip2.batch`) and indexing (`blip2.retrieval.build`) run the same loop, locally or on Ray; this
module is that loop once, and the callers keep only what they do with a batch.

Local (`image_batches`): worker processes decode and preprocess the items (`decoded`), running ahead of the model
with a bounded window; the items come back in input order, cut into `Batch`es of stacked (B, 3, S, S) pixels, each
with the failures decoded since the previous batch. The caller runs its model on the batch and flushes its results.

On Linux workers are forked, as torch's DataLoader does: a spawned worker would first import torch and transformers
(seconds per run, which is most of a small run); the workers only run PIL and numpy, not torch's thread pools.
Elsewhere they are spawned. Each worker ignores SIGINT (Ctrl-C is the parent's to handle, once) and on Linux asks
the kernel to kill it when the parent dies, so a `kill -9` of the run leaves no orphans behind.

Ray (`ray_map`): the driver turns items into rows (`item_row`), Ray Data feeds batches of rows to a pool of actors
(subclasses of `ImageMapActor`: one model each, one GPU each when the cluster has GPUs), which decode their batch
in a thread pool (`decode_rows`; the decodes of one process take turns, since `blip2.images` keeps what decoder
libraries print off the terminal through the process's one stderr, while the reading and preprocessing around
them overlap) and return an Arrow table; the driver writes the tables.
Nothing here imports Ray or pyarrow until a Ray function runs.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import signal
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .defaults import BATCH_SIZE, MAX_DECODE_WORKERS, RAY_DECODE_THREADS, RAY_NUM_WORKERS
from .errors import ImageError
from .processing import ImageTransform
from .sources import Item, read_item

if TYPE_CHECKING:
    from .pipeline import Blip2

__all__ = [
    "ITEM_FIELDS",
    "Batch",
    "ImageMapActor",
    "RowBatch",
    "decode_rows",
    "decoded",
    "default_workers",
    "image_batches",
    "item_row",
    "prepare",
    "ray_map",
    "row_item",
]

ITEM_FIELDS = tuple(f.name for f in dataclasses.fields(Item))


# ---- decoding ----------------------------------------------------------------------------------------------------
def prepare(item: Item, transform: ImageTransform, max_pixels: int) -> np.ndarray | str:
    """Worker job: (3, S, S) float32 pixels, or the one-line reason it failed. Plain types: cheap to pickle."""
    try:
        return transform([read_item(item, max_pixels)])[0].numpy()
    except ImageError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - a worker must answer for every item, whatever went wrong
        return f"{item.key}: unexpected error while decoding ({type(e).__name__}: {e})"


def default_workers() -> int:
    """One core is left to the model's own threads; beyond MAX_DECODE_WORKERS decoders the model is the bottleneck."""
    return max(0, min(MAX_DECODE_WORKERS, (os.cpu_count() or 1) - 1))


def _worker_init() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass  # best effort: the pool still stops its workers on a normal exit


def decoded(
    items: Iterable[Item], transform: ImageTransform, max_pixels: int, workers: int, window: int
) -> Iterator[tuple[Item, np.ndarray | str]]:
    """(item, (3, S, S) float32 pixels or the reason it failed), in input order.

    With `workers` > 0 at most `window` items are in flight, so memory stays bounded however slow the model is,
    while the workers keep decoding the next batches during generation.
    """
    if workers <= 0:
        for item in items:
            yield item, prepare(item, transform, max_pixels)
        return
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ctx.Pool(workers, initializer=_worker_init) as pool:
        pending: deque = deque()
        for item in items:
            pending.append((item, pool.apply_async(prepare, (item, transform, max_pixels))))
            if len(pending) >= window:
                first, result = pending.popleft()
                yield first, result.get()
        while pending:
            first, result = pending.popleft()
            yield first, result.get()


# ---- local engine ------------------------------------------------------------------------------------------------
@dataclass
class Batch:
    """What the model gets next: decoded `items` with their `pixels`, and the `failures` decoded since the last batch.

    `pixels` is (len(items), 3, S, S) float32, None when no item decoded (a batch of failures only).
    """

    items: list[Item] = field(default_factory=list)
    pixels: torch.Tensor | None = None
    failures: list[tuple[Item, str]] = field(default_factory=list)  # (item, the one-line reason)

    def __len__(self) -> int:
        return len(self.items) + len(self.failures)


def image_batches(
    items: Iterable[Item],
    transform: ImageTransform,
    max_pixels: int,
    batch_size: int,
    workers: int,
    *,
    short_batches: bool = True,
) -> Iterator[Batch]:
    """`Batch`es of `batch_size` decoded items, in input order, decoded by `workers` processes (0: in this one).

    Once `batch_size` failures wait they are yielded too, so a run of bad files is recorded as it goes: with
    `short_batches` together with the items decoded so far (a short batch: results stay in input order), otherwise
    alone (every model batch but the last is full). The last batch holds whatever is left.
    """
    bs = max(1, batch_size)
    window = max(2 * bs, 2 * workers * bs)  # enough decoded images for the next batch or two, per worker
    good: list[tuple[Item, np.ndarray]] = []
    bad: list[tuple[Item, str]] = []
    for item, pixels in decoded(items, transform, max_pixels, workers, window):
        if isinstance(pixels, str):
            bad.append((item, pixels))
        else:
            good.append((item, pixels))
        if len(good) >= bs or (short_batches and len(bad) >= bs):
            yield _batch(good, bad)
            good, bad = [], []
        elif len(bad) >= bs:
            yield Batch(failures=bad)
            bad = []
    if good or bad:
        yield _batch(good, bad)


def _batch(good: list[tuple[Item, np.ndarray]], bad: list[tuple[Item, str]]) -> Batch:
    pixels = torch.from_numpy(np.stack([px for _, px in good])) if good else None  # (B, 3, S, S) float32
    return Batch([item for item, _ in good], pixels, bad)


# ---- Ray engine --------------------------------------------------------------------------------------------------
def item_row(item: Item) -> dict[str, Any]:
    """An item as a row of plain values, which Ray Data carries to the actors."""
    return {f: getattr(item, f) for f in ITEM_FIELDS}


def row_item(row: dict[str, Any]) -> Item:
    return Item(**{f: row[f] for f in ITEM_FIELDS})


@dataclass
class RowBatch:
    """An actor's batch, decoded: every row's item and error (None when decoded), and the pixels of the decoded."""

    rows: list[dict[str, Any]]
    items: list[Item]
    errors: list[str | None]
    good: list[int]  # indices of the decoded items
    pixels: torch.Tensor | None  # (len(good), 3, S, S) float32; None when none decoded


def decode_rows(
    rows: list[dict[str, Any]], transform: ImageTransform, max_pixels: int, pool: ThreadPoolExecutor
) -> RowBatch:
    """Decode the items of `rows` in the threads of `pool`; failures are kept, with their reason, in `errors`."""
    items = [row_item(row) for row in rows]
    prepared = list(pool.map(lambda it: prepare(it, transform, max_pixels), items))
    errors = [px if isinstance(px, str) else None for px in prepared]
    good = [i for i, e in enumerate(errors) if e is None]
    pixels = torch.from_numpy(np.stack([prepared[i] for i in good])) if good else None  # (B, 3, S, S)
    return RowBatch(rows, items, errors, good, pixels)


class ImageMapActor:
    """Base of the Ray Data actors: one loaded model and a decoding thread pool; `decode` a pyarrow batch of rows."""

    def __init__(
        self,
        model: str,
        device: str,
        dtype: str,
        max_pixels: int,
        threads: int = RAY_DECODE_THREADS,
        compile: bool = False,
        engine: str = "ours",
    ) -> None:
        from .pipeline import load

        self.m: Blip2 = load(model, device=device, dtype=dtype, compile=compile, engine=engine)  # vllm: one per actor
        self.max_pixels = max_pixels
        self.pool = ThreadPoolExecutor(max(1, threads))  # file reads and preprocessing overlap; decodes take turns

    def decode(self, batch: Any) -> RowBatch:
        return decode_rows(batch.to_pylist(), self.m.transform, self.max_pixels, self.pool)


def ray_map(
    rows: list[dict[str, Any]],
    actor: type[ImageMapActor],
    actor_kwargs: dict[str, Any],
    *,
    address: str | None = None,
    num_workers: int = RAY_NUM_WORKERS,
    batch_size: int = BATCH_SIZE,
) -> Iterator[Any]:
    """Run `actor` (built with `actor_kwargs`; a "device" of "auto" becomes cuda when the cluster has GPUs) over
    `rows` in batches of `batch_size`, with a pool of `num_workers` actors; yield the pyarrow tables they return.

    Joins the cluster at `address` (or starts a local one) unless Ray is already initialised.
    """
    import ray

    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    bs = max(1, batch_size)
    gpus = ray.cluster_resources().get("GPU", 0)
    if actor_kwargs.get("device") == "auto":
        actor_kwargs = {**actor_kwargs, "device": "cuda" if gpus >= 1 else "cpu"}
    ds = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // bs)))
    ds = ds.map_batches(
        actor,
        fn_constructor_kwargs=actor_kwargs,
        batch_size=bs,
        compute=ray.data.ActorPoolStrategy(size=max(1, num_workers)),
        num_gpus=1 if gpus >= 1 else 0,
        num_cpus=1,
        batch_format="pyarrow",
    )
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")
