"""Benchmark of the retrieval index: write throughput and text-to-image ITC top-k search latency.

Builds an index of random L2-normalised float16 embeddings (default 100,000 images, Nq=32, D=256, as the
released BLIP-2 retrieval models), then times:
  - writing: rows/s of `Index.add_many` in batches (one transaction each);
  - the search cache: the first search after the writes rebuilds the memory-mapped `.emb` file ("cold");
  - a fresh process-like open (new `Index` object, cache file present, pages likely still in the OS cache);
  - warm queries: median, p90 and min over several random texts after a warm-up.

Search is exact either way; with faiss installed (the `search` extra) it goes through the int8 pre-filter
(`<db>.i8`, built on the first search), else through the blocked float16 scan; `--no-faiss` times the latter.

    PYTHONPATH=src python bench/search.py                 # writes bench/results/search.json
    PYTHONPATH=src python bench/search.py --images 20000 --queries 10
    PYTHONPATH=src python bench/search.py --no-faiss      # writes bench/results/search_no_faiss.json

With `--rerank`, it instead times the two-stage search of `blip2 search --rerank 16` end to end on a real model:
index a folder of synthetic images with `index_images` (images/s), then per text query the ITC stage alone (text
embedding + exact index search) and ITC + ITM re-ranking of the top 16 (re-open, preprocess and encode 16 images,
16 ITM passes). The model is the tests' tiny retrieval checkpoint (Nq=8, E=16), or with `--full` the full-size
blip2-itm-vit-g architecture (ViT-g, Q-Former, E=256, Nq=32) with random weights. Results go to search_rerank.json.

    PYTHONPATH=src python bench/search.py --rerank                # tiny model
    PYTHONPATH=src python bench/search.py --rerank --full         # full-size architecture, random weights
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from blip2.retrieval import Index, IndexRow

RESULTS = Path(__file__).resolve().parent / "results" / "search.json"
RERANK_RESULTS = RESULTS.with_name("search_rerank.json")
RERANK_QUERIES = ["a dog running on the beach", "a red car parked near a house", "two people riding horses", "a cake"]


def _random_embeddings(rng: np.random.Generator, n: int, num_query: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, num_query, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    return x.astype(np.float16)  # (n, Nq, D)


def build(index: Index, n: int, batch: int, seed: int) -> dict[str, float]:
    """Fill the index in batches; time only the writes, not the random number generation."""
    rng = np.random.default_rng(seed)
    spent = 0.0
    for start in range(0, n, batch):
        emb = _random_embeddings(rng, min(batch, n - start), index.num_query, index.dim)
        rows = [IndexRow(f"/images/{start + i:07d}.jpg", e, f"{start + i:064x}", 1000, 0.0) for i, e in enumerate(emb)]
        t0 = time.perf_counter()
        index.add_many(rows)
        spent += time.perf_counter() - t0
    return {"rows": n, "batch": batch, "seconds": spent, "rows_per_s": n / spent}


def _texts(rng: np.random.Generator, n: int, dim: int) -> list[np.ndarray]:
    t = rng.standard_normal((n, dim), dtype=np.float32)
    return list(t / np.linalg.norm(t, axis=1, keepdims=True))


def time_queries(index: Index, texts: list[np.ndarray], k: int, warmup: int = 2) -> dict[str, float]:
    for text in texts[:warmup]:
        index.search(text, k=k)
    times = []
    for text in texts[warmup:]:
        t0 = time.perf_counter()
        hits = index.search(text, k=k)
        times.append(time.perf_counter() - t0)
        assert len(hits[0]) == k
    times.sort()
    return {
        "queries": len(times),
        "median_ms": 1e3 * statistics.median(times),
        "p90_ms": 1e3 * times[int(0.9 * (len(times) - 1))],
        "min_ms": 1e3 * times[0],
    }


def build_phase(db: Path, args: argparse.Namespace, text: np.ndarray) -> dict[str, object]:
    """Write the index and time the first search, which builds the memory-mapped cache (and the int8 pre-filter)."""
    with Index(db, dim=args.dim, num_query=args.num_query, model="bench-random") as index:
        write = build(index, args.images, args.batch, seed=0)
        print(f"write: {write['rows_per_s']:.0f} rows/s ({write['seconds']:.1f} s)", flush=True)
        t0 = time.perf_counter()
        index.search(text, k=args.k)
        rebuild = time.perf_counter() - t0
    print(f"first query incl. cache rebuild: {rebuild:.2f} s", flush=True)
    return {"write": write, "first_query_with_cache_rebuild_s": rebuild}


def search_phase(db: Path, args: argparse.Namespace, texts: list[np.ndarray]) -> dict[str, object]:
    with Index(db) as index:  # what a new process sees: the cache file exists, nothing is mapped yet
        t0 = time.perf_counter()
        index.search(texts[1], k=args.k)
        cold_open = time.perf_counter() - t0
        warm = time_queries(index, texts, args.k)
        t0 = time.perf_counter()
        index.search(np.stack(texts[:8]), k=args.k)
        batch8 = time.perf_counter() - t0
        images = len(index)
    print(f"first query, fresh Index: {1e3 * cold_open:.0f} ms; warm median {warm['median_ms']:.0f} ms", flush=True)
    int8 = Path(str(db) + ".i8")
    return {
        "images": images,
        "db_bytes": db.stat().st_size,
        "cache_bytes": Path(str(db) + ".emb").stat().st_size,
        "int8_prefilter_bytes": int8.stat().st_size if int8.exists() else None,
        "first_query_fresh_open_ms": 1e3 * cold_open,
        "warm_query": warm,
        "batch_of_8_texts_ms": 1e3 * batch8,
    }


def exact_search_path() -> str:
    try:
        import faiss
    except ImportError:
        return "blocked float16 scan (faiss not installed)"
    return f"int8 pre-filter on faiss {faiss.__version__}, exact re-scoring from float16"


def machine() -> dict[str, object]:
    return {
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15": os.getloadavg(),  # other work on the machine skews the timings
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
    }


def _synthetic_images(folder: Path, n: int, size: int = 256) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB").save(folder / f"{i:05d}.png")


def _median_ms(fn, repeat: int) -> dict[str, float]:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "runs": repeat}


def rerank_phase(args: argparse.Namespace, tmp: Path) -> dict[str, object]:
    """Index synthetic images with a real (tiny or full-size) model, then time ITC search and ITC + ITM re-ranking."""
    import blip2
    from blip2.retrieval.build import index_images
    from blip2.retrieval.search import search_text

    if args.full:
        from itm_common import make_full_itm_checkpoint

        ckpt = make_full_itm_checkpoint(args.checkpoint or tmp / "full_itm")
    else:
        import common  # noqa: F401 - puts tests/ on sys.path
        from fixtures import make_itm_checkpoint

        ckpt = make_itm_checkpoint(tmp / "tiny_itm")
    m = blip2.load(ckpt, device="cpu", dtype="fp32")
    _synthetic_images(tmp / "images", args.rerank_images)
    summary = index_images(m, [tmp / "images"], tmp / "rerank.sqlite", batch_size=8)
    print(summary.line(), flush=True)
    out: dict[str, object] = {
        "model": "blip2-itm-vit-g architecture, random weights" if args.full else "tests' tiny itm checkpoint",
        "num_query": m.config.num_query_tokens,
        "dim": m.config.image_text_hidden_size,
        "images": summary.total,
        "index_images_per_s": summary.embedded / summary.seconds,
        "k": 10,
        "rerank": args.rerank_k,
    }
    with Index(tmp / "rerank.sqlite") as index:
        # warm-up (search cache, thread pools); the full model's ITM warm-up would cost as much as a timed run
        search_text(m, index, RERANK_QUERIES[-1], k=10, rerank=0 if args.full else args.rerank_k)
        queries = RERANK_QUERIES[: args.rerank_queries]
        itc = [_median_ms(lambda q=q: search_text(m, index, q, k=10), 3) for q in queries]
        both = [_median_ms(lambda q=q: search_text(m, index, q, k=10, rerank=args.rerank_k), 1) for q in queries]
    out["itc_only_ms"] = statistics.median(r["median_ms"] for r in itc)
    out["itc_plus_itm_rerank_ms"] = statistics.median(r["median_ms"] for r in both)
    out["queries"] = len(queries)
    print(f"ITC: {out['itc_only_ms']:.1f} ms; ITC + ITM top {args.rerank_k}: {out['itc_plus_itm_rerank_ms']:.1f} ms")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--num-query", type=int, default=32)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1000, help="rows per add_many transaction")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--no-faiss", action="store_true", help="time the exact search without faiss")
    parser.add_argument(
        "--index", type=Path, default=None, help="keep the index here; reuse it (no write timing) if it exists"
    )
    parser.add_argument("--out", type=Path, default=None, help=f"[{RESULTS.name}, or {RERANK_RESULTS.name}]")
    parser.add_argument("--rerank", action="store_true", help="time ITC + ITM re-ranking on a model instead")
    parser.add_argument("--full", action="store_true", help="--rerank: full-size architecture, random weights")
    parser.add_argument("--checkpoint", type=Path, default=None, help="--full: keep/reuse the checkpoint here")
    parser.add_argument("--rerank-images", type=int, default=64)
    parser.add_argument("--rerank-k", type=int, default=16)
    parser.add_argument("--rerank-queries", type=int, default=4)
    args = parser.parse_args()
    if args.rerank:
        with tempfile.TemporaryDirectory() as tmp:
            result = {"bench": "text-to-image search with ITM re-ranking", **rerank_phase(args, Path(tmp))}
        _write(result, args.out or RERANK_RESULTS)
        return

    if args.no_faiss:
        sys.modules["faiss"] = None  # import faiss now raises ImportError
    texts = _texts(np.random.default_rng(1), args.queries + 2, args.dim)
    result: dict[str, object] = {"bench": "retrieval index search", "num_query": args.num_query, "dim": args.dim}
    result["k"] = args.k
    result["exact_search"] = exact_search_path()
    result["load_average_at_start"] = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        db = args.index or Path(tmp) / "images.sqlite"
        db.parent.mkdir(parents=True, exist_ok=True)
        if db.exists():
            result["write"] = None  # reused index: writes not timed this run
        else:
            result.update(build_phase(db, args, texts[0]))
        result.update(search_phase(db, args, texts))
    _write(result, args.out or (RESULTS.with_name("search_no_faiss.json") if args.no_faiss else RESULTS))


def _write(result: dict[str, object], out: Path) -> None:
    result["machine"] = machine()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
