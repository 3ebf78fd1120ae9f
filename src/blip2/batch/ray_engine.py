"""The Ray engine: the same captions as the local engine, from an actor pool on a Ray cluster (`--engine ray`).

    run = RayRun(["shards-{000..099}.tar"], "Salesforce/blip2-opt-2.7b", options, num_workers=8)
    summary = run.run()

The inputs are listed on the driver and cut into shards of `shard_size` images. Ray Data feeds them to an actor
pool, one model per actor (and one GPU per actor when the cluster has GPUs); each actor decodes its batch with a
few threads (PIL releases the GIL) and captions it with `generate_batch`, exactly as the local engine does.
Captions are small, so they stream back to the driver, which writes each shard once all its images are back:
`OUT/part-00012.parquet` (or `.jsonl`), to a temp file and `os.replace`d, so a shard file is either whole or absent.

Resume is by shard: a rerun reads the keys of the finished shard files and skips those images; the rest are cut
into new shards numbered after the last one. A run's settings are kept in `OUT/_run.json`; a rerun with other
settings is refused. Shard rows carry `error` (null when captioned); `errors.jsonl` beside OUT lists the failures.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..checkpoint.lavis import base_of
from ..defaults import BATCH_SIZE, RAY_DECODE_THREADS, RAY_NUM_WORKERS, RAY_SHARD_SIZE
from ..durable import atomic_path, atomic_write, check_settings
from ..errors import ConfigError
from ..imagemap import ImageMapActor, item_row, ray_map
from ..pipeline import GenerationOptions
from ..sources import Item, iter_items
from .engine import BatchOptions, Summary, now


class Captioner(ImageMapActor):
    """A Ray Data actor: one loaded model; a batch of item rows in, caption rows out."""

    def __init__(
        self,
        model: str,
        device: str,
        dtype: str,
        generation: dict,
        prompt: str | None,
        question: str | None,
        prefix: str,
        suffix: str,
        max_pixels: int,
        threads: int = RAY_DECODE_THREADS,
        compile: bool = False,
        engine: str = "ours",
    ) -> None:
        super().__init__(model, device, dtype, max_pixels, threads, compile, engine)
        self.opts = GenerationOptions(**generation)
        self.prompt, self.question, self.prefix, self.suffix = prompt, question, prefix, suffix

    def __call__(self, batch: Any) -> Any:
        """A pyarrow batch of item rows in, a pyarrow table of caption rows out (fixed schema: no type guessing)."""
        import pyarrow as pa

        from .engine import generate_batch

        b = self.decode(batch)
        prompts = []
        for i in b.good:
            q = b.items[i].question or self.question
            prompts.append(self.m.question_prompt(q) if q else self.m.caption_prompt(self.prompt))
        out = [
            {
                "key": it.key,
                "shard": row["shard"],
                "caption": None,
                "score": None,
                "prompt": None,
                "error": error,
                "time": now(),
            }
            for it, row, error in zip(b.items, b.rows, b.errors)
        ]
        if b.good:
            for i, prompt, g in zip(b.good, prompts, generate_batch(self.m, b.pixels, prompts, self.opts)):
                out[i].update(caption=self.prefix + g.text + self.suffix, score=g.score, prompt=prompt)
        return pa.Table.from_pylist(out, schema=OUT_SCHEMA())


def OUT_SCHEMA() -> Any:  # noqa: N802 - a constant, built lazily so pyarrow is imported only when used
    import pyarrow as pa

    return pa.schema(
        [
            ("key", pa.string()),
            ("shard", pa.int64()),
            ("caption", pa.string()),
            ("score", pa.float64()),
            ("prompt", pa.string()),
            ("error", pa.string()),
            ("time", pa.string()),
        ]
    )


class RayRun:
    """One resumable run over `inputs` on a Ray cluster; `run()` returns the `Summary`."""

    def __init__(
        self,
        inputs: Sequence[str],
        model: str,
        options: BatchOptions,
        address: str | None = None,
        num_workers: int = RAY_NUM_WORKERS,
        shard_size: int = RAY_SHARD_SIZE,
    ) -> None:
        if len(options.out) != 1:
            raise ConfigError(
                "--engine ray writes one output: --out DIR.parquet or --out DIR.jsonl (a folder of shards)"
            )
        if options.sidecar:
            raise ConfigError("--engine ray writes manifest shards only; for sidecar files use the local engine")
        if not isinstance(model, (str, os.PathLike)):
            raise ConfigError("--engine ray loads the model in each actor: pass a model name or folder, not an object")
        self.inputs = [os.fspath(i) for i in inputs]
        self.model = os.path.abspath(model) if os.path.isdir(model) else os.fspath(model)
        self.opts = options
        self.address = address
        self.num_workers = max(1, num_workers)
        self.shard_size = max(1, shard_size)
        self.out = Path(options.out[0])
        self.fmt = self.out.suffix.lower().lstrip(".")
        self.summary = Summary(outputs=[str(self.out)])

    def fingerprint(self) -> dict[str, Any]:
        o = self.opts
        keys = ("prompt", "question", "prefix", "suffix", "max_pixels")
        base = base_of(self.model)
        return {
            "model": self.model,
            **({"base": base} if base else {}),
            "options": asdict(o.generation),
            **{k: getattr(o, k) for k in keys},
            **o.engine_key(),
        }

    def _check_run_file(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "_run.json"
        wanted = self.fingerprint()
        if path.exists():
            check_settings(
                json.loads(path.read_text(encoding="utf-8")), wanted, path, "use another --out to start over"
            )
        else:
            atomic_write(path, json.dumps(wanted, indent=2))

    def _finished(self) -> tuple[dict[str, bool], int]:
        """Keys in finished shard files (True where the image failed), and the next free shard number."""
        keys: dict[str, bool] = {}
        last = -1
        for part in sorted(self.out.glob(f"part-*.{self.fmt}")):
            last = max(last, int(part.stem.split("-")[1]))
            keys.update((row["key"], row["error"] is not None) for row in _read_shard(part))
        return keys, last + 1

    def run(self) -> Summary:
        start = time.perf_counter()
        self._check_run_file()
        finished, first_shard = self._finished()
        items, seen, not_images = [], set(), []
        for item in iter_items(self.inputs, self.opts.recursive, not_images):
            if item.key not in seen:
                seen.add(item.key)
                items.append(item)
        todo = [it for it in items if it.key not in finished]
        self.summary.total = len(items) + len(not_images)
        self.summary.not_images = len(not_images)
        before = [finished[it.key] for it in items if it.key in finished]
        self.summary.resumed = before.count(False)
        self.summary.failed = before.count(True)  # failures of earlier runs still count, as in errors.jsonl
        if todo:
            self._run_ray(todo, first_shard)
        self._write_errors()
        self.summary.seconds = time.perf_counter() - start
        return self.summary

    def _run_ray(self, todo: list[Item], first_shard: int) -> None:
        rows = [{**item_row(it), "shard": first_shard + i // self.shard_size} for i, it in enumerate(todo)]
        sizes: dict[int, int] = {}
        for r in rows:
            sizes[r["shard"]] = sizes.get(r["shard"], 0) + 1
        bs = self.opts.batch_size or BATCH_SIZE
        tables = ray_map(
            rows, Captioner, self._actor_kwargs(), address=self.address, num_workers=self.num_workers, batch_size=bs
        )
        pending: dict[int, list[dict]] = {}
        for batch in tables:
            for row in batch.to_pylist():
                shard = row.pop("shard")
                pending.setdefault(shard, []).append(row)
                if len(pending[shard]) == sizes[shard]:
                    self._write_shard(shard, pending.pop(shard))

    def _actor_kwargs(self) -> dict[str, Any]:
        """The `Captioner`'s arguments; a device of "auto" becomes cuda when the cluster has GPUs (`ray_map`)."""
        o = self.opts
        return {
            "model": self.model,
            "device": o.device,
            "dtype": o.dtype,
            "compile": o.compile,
            "engine": o.engine,
            "generation": asdict(o.generation),
            "prompt": o.prompt,
            "question": o.question,
            "prefix": o.prefix,
            "suffix": o.suffix,
            "max_pixels": o.max_pixels,
        }

    def _write_shard(self, shard: int, rows: list[dict]) -> None:
        meta = {"model": self.model, "options": asdict(self.opts.generation)}
        rows = [
            {
                "path": r["key"],
                "caption": r["caption"],
                "score": r["score"],
                "prompt": r["prompt"],
                "error": r["error"],
                **meta,
                "time": r["time"],
            }
            for r in rows
        ]
        path = self.out / f"part-{shard:05d}.{self.fmt}"
        if self.fmt == "jsonl":
            atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            with atomic_path(path) as tmp:
                pq.write_table(pa.Table.from_pylist(rows), tmp)
        done = sum(r["error"] is None for r in rows)
        self.summary.done += done
        self.summary.failed += len(rows) - done

    def _write_errors(self) -> None:
        """`errors.jsonl` beside OUT, rebuilt from every shard, so it lists each failure once."""
        errors = self.opts.errors_path(self.inputs)  # errors.jsonl beside OUT unless --errors
        rows = [
            {"path": r["path"], "error": r["error"], "time": r["time"]}
            for part in sorted(self.out.glob(f"part-*.{self.fmt}"))
            for r in _read_shard(part)
            if r["error"]
        ]
        if rows:
            atomic_write(errors, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            self.summary.errors_file = str(errors)


def _read_shard(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        return [dict(r, key=r["path"]) for r in rows]
    import pyarrow.parquet as pq

    return [dict(r, key=r["path"]) for r in pq.read_table(path, columns=["path", "error", "time"]).to_pylist()]
