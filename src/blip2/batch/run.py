"""`BatchRun`: one resumable pass of the local engine over a set of inputs; iterate it to get `Result`s."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..checkpoint.lavis import base_of
from ..durable import append_jsonl, atomic_write
from ..errors import ConfigError
from ..imagemap import Batch, default_workers, image_batches
from ..pipeline import Blip2
from ..pipeline import load as load_model
from ..sources import Item, iter_items
from . import ledger as L
from .engine import BatchOptions, Result, Summary, default_batch_size, generate_batch, now, split_options
from .sidecar import compose, read_text, sidecar_path


class BatchRun:
    """Caption `inputs` (folders, lists, tar shards, images) with `model` (a name, a folder or a loaded `Blip2`).

    Iterating yields a `Result` per image handled in this run; `summary` counts them, with the images an earlier
    interrupted run had finished (`resumed`).
    """

    def __init__(
        self,
        inputs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
        model: str | os.PathLike[str] | Blip2,
        options: BatchOptions,
    ) -> None:
        single = isinstance(inputs, (str, os.PathLike))
        self.inputs = [os.fspath(inputs)] if single else [os.fspath(i) for i in inputs]
        if not self.inputs:
            raise ConfigError("no inputs given: pass folders, list files, tar shards or images")
        self.model = model
        self.opts = options
        self.summary = Summary()
        self._m: Blip2 | None = None if isinstance(model, (str, os.PathLike)) else model  # a loaded engine

    # ---- identity of the run ---------------------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        if not isinstance(self.model, (str, os.PathLike)):
            return self.model.name
        name = os.fspath(self.model)
        return os.path.abspath(name) if os.path.isdir(name) else name

    def meta(self) -> dict[str, Any]:
        """The columns every manifest row shares: which model (and base, for a LAVIS file), with which options."""
        base = base_of(self.model)
        return {"model": self.model_name, **({"base": base} if base else {}), "options": asdict(self.opts.generation)}

    def fingerprint(self) -> dict[str, Any]:
        """Whatever changes the text a run writes; resuming with a different one would mix two runs."""
        o = self.opts
        sidecar_dir = os.path.abspath(o.sidecar_dir) if o.sidecar_dir is not None else None
        keys = ("prompt", "question", "prefix", "suffix", "separator", "existing", "ext", "sidecar", "max_pixels")
        return {**self.meta(), **{k: getattr(o, k) for k in keys}, "sidecar_dir": sidecar_dir, **o.engine_key()}

    # ---- the run ---------------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Result]:
        start = time.perf_counter()
        not_images: list[str] = []
        items = list(iter_items(self.inputs, self.opts.recursive, not_images))
        self.summary.total = len(items) + len(not_images)
        self.summary.not_images = len(not_images)
        ledger = self._open_ledger()
        try:
            todo, sidecars = yield from self._plan(items, ledger)
            if todo:
                yield from self._caption(todo, sidecars, ledger)
            self._finish(ledger)
        finally:
            if ledger is not None:
                ledger.close()
            self.summary.seconds = time.perf_counter() - start

    def _open_ledger(self) -> L.Ledger | None:
        """Open (or start) the ledger, finish the last run's interrupted writes, repair the JSONL files."""
        if not self.opts.persistent:
            return None
        path = self.opts.ledger_path(self.inputs)
        jsonl = [p for p in self.opts.out if p.suffix == ".jsonl"]
        if not path.exists():
            for p in jsonl:
                if p.exists() and p.stat().st_size > 0:
                    raise ConfigError(
                        f"{p} exists but its progress file {path} does not; move {p} away, or it would get "
                        f"a second copy of every caption"
                    )
        ledger = L.Ledger(path, self.fingerprint())
        self._write_sidecars(ledger.pending_sidecars(), ledger)
        for p in jsonl:
            L.reconcile_jsonl(p, ledger, "done", self.meta())
        L.reconcile_jsonl(self.opts.errors_path(self.inputs), ledger, "failed", {})
        self.summary.errors_file = str(self.opts.errors_path(self.inputs))
        return ledger

    def _plan(self, items: list[Item], ledger: L.Ledger | None):
        """Split the items into done before, skipped (sidecar exists), clashing sidecars and to do. A generator:
        it yields the skipped and clashing results and returns (to do, sidecar of each key)."""
        done = ledger.finished() if ledger is not None else {}
        seen: set[str] = set()
        claimed: dict[Path, str] = {}
        sidecars: dict[str, Path | None] = {}
        todo: list[Item] = []
        clashes: list[L.Record] = []
        for item in items:
            if item.key in seen:  # listed twice: captioned once
                continue
            seen.add(item.key)
            if item.key in done:  # finished by an earlier run: its failures still count as failures
                if done[item.key] == "done":
                    self.summary.resumed += 1
                else:
                    self.summary.failed += 1
                continue
            sc = sidecar_path(item, self.opts.ext, self.opts.sidecar_dir) if self.opts.sidecar else None
            if sc is not None and sc in claimed:
                error = f"{item.key}: its caption file {sc} is also that of {claimed[sc]}; rename one of them"
                clashes.append(L.Record(item.key, "failed", now(), error=error))
                continue
            if sc is not None:
                claimed[sc] = item.key
                if self.opts.existing == "skip" and sc.exists():
                    self.summary.skipped += 1
                    yield Result(item.key, "skipped", sidecar=str(sc))
                    continue
            sidecars[item.key] = sc
            todo.append(item)
        if clashes:
            yield from self._persist(clashes, ledger)
        return todo, sidecars

    def _load(self) -> Blip2:
        if self._m is None:
            o = self.opts
            self._m = load_model(self.model, device=o.device, dtype=o.dtype, compile=o.compile, engine=o.engine)
        return self._m

    def _caption(self, todo: list[Item], sidecars: dict[str, Path | None], ledger: L.Ledger | None):
        from tqdm.auto import tqdm

        m = self._load()
        start = time.perf_counter()
        bs = self.opts.batch_size or getattr(m, "default_batch_size", None) or default_batch_size(m.device)
        workers = default_workers() if self.opts.workers is None else self.opts.workers
        batches = image_batches(todo, m.transform, self.opts.max_pixels, bs, workers)
        with tqdm(total=len(todo), unit="img", disable=not self.opts.progress, dynamic_ncols=True) as bar:
            for batch in batches:
                yield from self._flush(m, batch, sidecars, ledger, bar)
        self.summary.caption_seconds = time.perf_counter() - start

    def _prompt(self, m: Blip2, item: Item) -> str:
        question = item.question or self.opts.question
        return m.question_prompt(question) if question else m.caption_prompt(self.opts.prompt)

    def _flush(self, m: Blip2, batch: Batch, sidecars: dict, ledger: L.Ledger | None, bar):
        """Caption one batch, then record it, with the failures decoded since the last batch."""
        records: list[L.Record] = []
        if batch.items:
            o = self.opts
            prompts = [self._prompt(m, item) for item in batch.items]
            gens = generate_batch(m, batch.pixels, prompts, o.generation)  # pixels: (B, 3, S, S) float32
            t = now()
            for item, prompt, g in zip(batch.items, prompts, gens):
                caption = o.prefix + g.text + o.suffix
                sc = sidecars.get(item.key)
                text = None
                if sc is not None:
                    old = read_text(sc) if o.existing in ("append", "prepend") else None
                    text = compose(old, caption, o.existing, o.separator)
                records.append(
                    L.Record(item.key, "done", t, caption, g.score, prompt, None, None if sc is None else str(sc), text)
                )
        records += [L.Record(item.key, "failed", now(), error=reason) for item, reason in batch.failures]
        yield from self._persist(records, ledger)
        bar.update(len(records))
        if self.summary.failed:
            bar.set_postfix(failed=self.summary.failed, refresh=False)

    def _persist(self, records: Sequence[L.Record], ledger: L.Ledger | None) -> Iterator[Result]:
        """Ledger first, then the files derived from it (see `ledger`), then tell the caller."""
        if ledger is not None:
            ledger.commit(records)
        self._write_sidecars([(r.key, r.sidecar, r.sidecar_text) for r in records if r.sidecar], ledger)
        done = [r for r in records if r.status == "done"]
        failed = [r for r in records if r.status == "failed"]
        for p in self.opts.out:
            if p.suffix == ".jsonl":
                append_jsonl(p, [L.manifest_row(r, self.meta()) for r in done])
        if ledger is not None:
            append_jsonl(self.opts.errors_path(self.inputs), [L.error_row(r) for r in failed])
        self.summary.done += len(done)
        self.summary.failed += len(failed)
        for r in records:
            yield Result(r.key, r.status, r.caption, r.error, r.score, r.prompt, r.sidecar)

    def _write_sidecars(self, writes: Sequence[tuple[str, str, str]], ledger: L.Ledger | None) -> None:
        for key, path, text in writes:
            try:
                atomic_write(path, text)  # a kill leaves the old caption or the new one; the rerun replays it
            except OSError as e:  # disk full, read-only folder: stopping beats losing captions silently
                raise ConfigError(f"{path}: cannot write the caption of {key} ({e})") from e
        if ledger is not None and writes:
            ledger.sidecars_written([key for key, _, _ in writes])

    def _finish(self, ledger: L.Ledger | None) -> None:
        for p in self.opts.out:
            if p.suffix == ".parquet" and ledger is not None:
                L.export_parquet(p, ledger, self.meta())
        self.summary.outputs = [str(p) for p in self.opts.out]


def caption_images(
    inputs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    model: str | os.PathLike[str] | Blip2 = "Salesforce/blip2-opt-2.7b",
    **options: Any,
) -> Iterator[Result]:
    """Caption (or, with `question=`, ask about) every image of `inputs`; yield one `Result` per image.

    `options` are `BatchOptions` fields (out, sidecar, sidecar_dir, ext, existing, prefix, suffix, prompt, question,
    recursive, batch_size, workers, device, dtype, max_pixels, errors, state, progress) and generation options
    (max_new_tokens, num_beams, ...). With `out` or a sidecar option the run is resumable.
    """
    return iter(BatchRun(inputs, model, split_options(dict(options))))
