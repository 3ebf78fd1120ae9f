"""The progress ledger: a SQLite file that is the single source of truth of a batch run.

Why a ledger and not just the JSONL manifest: a run writes to several places (sidecar files, a JSONL manifest, a
Parquet file, the error log) and no two of them can be committed together. So each batch is first committed to the
ledger in one SQLite transaction (atomic and durable whatever kills the process), and everything else is derived
from it, in an order that makes a replay safe:

1. ledger commit: the batch's captions and errors, and for each sidecar the *complete* text it is to hold
   (computed from its old content for `append`/`prepend`, so replaying the write cannot append twice);
2. sidecars: written atomically (`durable.atomic_write`: temp file, fsync, `os.replace`); then marked done;
3. JSONL manifest and error log: appended, flushed, fsynced (`durable.append_jsonl`).

On restart the ledger's finished keys are skipped, unfinished sidecar writes are replayed, and each JSONL file is
reconciled: a torn last line (killed mid-write) is truncated and the ledger rows the file lacks are appended, so the
file holds every image exactly once. Parquet cannot be appended to, so it is exported from the ledger, atomically,
when a run completes; until then the ledger holds the progress.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..durable import append_jsonl, atomic_path, canonical, check_settings
from ..durable import repair_jsonl as durable_repair

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,           -- 'done' or 'failed'
    caption TEXT, score REAL, prompt TEXT, error TEXT, time TEXT NOT NULL,
    sidecar TEXT, sidecar_text TEXT, sidecar_done INTEGER NOT NULL DEFAULT 1
);
"""


@dataclass
class Record:
    """One finished image, as the ledger stores it."""

    key: str
    status: str  # "done" | "failed"
    time: str  # ISO 8601, UTC
    caption: str | None = None
    score: float | None = None
    prompt: str | None = None
    error: str | None = None
    sidecar: str | None = None  # the sidecar file to write, if any
    sidecar_text: str | None = None  # its complete new content


class Ledger:
    """Finished images of one run configuration. `fingerprint` holds whatever changes a caption's text."""

    def __init__(self, path: str | os.PathLike[str], fingerprint: dict) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, isolation_level=None)  # explicit transactions below
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a committed batch survives a power cut, not just kill -9
        self.db.executescript(SCHEMA)
        self.fingerprint = fingerprint
        self._check_fingerprint(fingerprint)

    def _check_fingerprint(self, fingerprint: dict) -> None:
        row = self.db.execute("SELECT v FROM meta WHERE k = 'fingerprint'").fetchone()
        if row is None:
            self.db.execute("INSERT INTO meta VALUES ('fingerprint', ?)", (canonical(fingerprint),))
            return
        check_settings(
            json.loads(row[0]),
            fingerprint,
            self.path,
            "rerun with the same settings to resume, or move the outputs and this file away to start over",
        )

    def close(self) -> None:
        self.db.close()

    def finished(self) -> dict[str, str]:
        """Every finished key with its status ("done" or "failed")."""
        return dict(self.db.execute("SELECT key, status FROM items"))

    def commit(self, records: Sequence[Record]) -> None:
        """Record a batch in one transaction: all of it is finished, or none of it."""
        rows = [
            (
                r.key,
                r.status,
                r.caption,
                r.score,
                r.prompt,
                r.error,
                r.time,
                r.sidecar,
                r.sidecar_text,
                int(r.sidecar is None),
            )
            for r in records
        ]
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany(
                "INSERT INTO items (key, status, caption, score, prompt, error, time, sidecar, sidecar_text, "
                "sidecar_done) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

    def pending_sidecars(self) -> list[tuple[str, str, str]]:
        """(key, sidecar path, text) of sidecar writes committed but not known to have happened."""
        return list(self.db.execute("SELECT key, sidecar, sidecar_text FROM items WHERE sidecar_done = 0 ORDER BY seq"))

    def sidecars_written(self, keys: Sequence[str]) -> None:
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany(
                "UPDATE items SET sidecar_done = 1, sidecar_text = NULL WHERE key = ?", [(k,) for k in keys]
            )

    def records(self, status: str) -> Iterator[Record]:
        cur = self.db.execute(
            "SELECT key, status, time, caption, score, prompt, error, sidecar FROM items WHERE status = ? ORDER BY seq",
            (status,),
        )
        for row in cur:
            yield Record(*row)

    def count(self, status: str) -> int:
        return self.db.execute("SELECT COUNT(*) FROM items WHERE status = ?", (status,)).fetchone()[0]


# ---------------------------------------------------------------------------------------------------------------------
# Files derived from the ledger


def manifest_row(r: Record, meta: dict) -> dict:
    """A manifest line: the image, its caption and how it was made."""
    return {"path": r.key, "caption": r.caption, "score": r.score, "prompt": r.prompt, **meta, "time": r.time}


def error_row(r: Record) -> dict:
    return {"path": r.key, "error": r.error, "time": r.time}


def repair_jsonl(path: Path) -> set[str]:
    """Truncate a torn tail (`durable.repair_jsonl`: from the first line that is not whole, valid JSON with a
    "path"); return the paths kept."""
    return {r["path"] for r in durable_repair(path, lambda r: isinstance(r, dict) and "path" in r)}


def reconcile_jsonl(path: Path, ledger: Ledger, status: str, meta: dict) -> None:
    """Make the JSONL file hold exactly the ledger's rows of `status`: repair it, then append what it lacks."""
    path.parent.mkdir(parents=True, exist_ok=True)
    present = repair_jsonl(path)
    missing = [r for r in ledger.records(status) if r.key not in present]
    to_row = (lambda r: manifest_row(r, meta)) if status == "done" else error_row
    for start in range(0, len(missing), 10_000):
        append_jsonl(path, [to_row(r) for r in missing[start : start + 10_000]])


def export_parquet(path: Path, ledger: Ledger, meta: dict, chunk: int = 50_000) -> None:
    """Write every captioned image to Parquet, atomically (`durable.atomic_path`: temp file, fsync, `os.replace`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        writer = None
        batch: list[dict] = []

        def flush() -> None:
            nonlocal writer
            table = pa.Table.from_pylist(batch, schema=writer.schema if writer else None)
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
            batch.clear()

        for r in ledger.records("done"):
            batch.append(manifest_row(r, meta))
            if len(batch) >= chunk:
                flush()
        if batch:
            flush()
        if writer is None:  # an empty run still gets a readable (empty) file, with a manifest row's columns
            empty = pa.Table.from_pylist([manifest_row(Record("", "done", ""), meta)]).slice(0, 0)
            writer = pq.ParquetWriter(tmp, empty.schema)
        writer.close()
