"""`blip2 index` / `blip2 search` and `retrieval.build` on the tiny retrieval checkpoint (Nq=8, E=16).

Embeddings are stored as float16, so stored values and ITC scores are compared with a float16 tolerance.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import blip2
from blip2.cli import main
from blip2.retrieval import Index
from blip2.retrieval import build as build_module
from blip2.retrieval.build import index_images
from blip2.retrieval.search import search_like, search_text, search_texts_for_image

try:
    import faiss  # noqa: F401

    HAVE_FAISS = True
except ImportError:
    HAVE_FAISS = False

TOL = 2e-3  # float16 storage of unit vectors: ~5e-4 per value, a little more on a 16-term dot product
QUERIES = ["a red cat sitting on a table", "a dog running on the beach", "two birds"]


@pytest.fixture(scope="module")
def m(itm_ckpt: Path) -> blip2.Blip2:
    return blip2.load(itm_ckpt, device="cpu", dtype="fp32")


def make_images(folder: Path, n: int = 6, seed: int = 0) -> list[Path]:
    """`n` distinct small RGB images of varied sizes, plus two bad files (empty, not an image) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        arr = rng.integers(0, 256, (20 + 5 * i, 30 + 3 * i, 3), dtype=np.uint8)
        arr[..., i % 3] //= 4  # a colour cast per image, so the tiny model tells them apart
        paths.append(folder / f"img{i}.png")
        Image.fromarray(arr, "RGB").save(paths[-1])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "bad.png").write_bytes(b"not an image at all\n")
    return paths


def make_tar(path: Path, images: list[Path]) -> Path:
    with tarfile.open(path, "w") as tar:
        for p in images:
            tar.add(p, arcname=f"t_{p.name}")
    return path


def stored(db: Path) -> dict[str, np.ndarray]:
    """path -> stored float16 (Nq, E) embedding."""
    with Index(db) as idx:
        rows = dict(sqlite3.connect(db).execute("SELECT path, id FROM images").fetchall())
        return dict(zip(rows, idx.embeddings(list(rows.values())), strict=True))


def run_cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def indexed(m: blip2.Blip2, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """An index of a folder (6 good, 2 bad) and a tar of 2 more images, built through the CLI."""
    tmp = tmp_path_factory.mktemp("indexed")
    paths = make_images(tmp / "photos")
    shard = make_tar(tmp / "more.tar", make_images(tmp / "for_tar", n=2, seed=7))
    db = tmp / "photos.sqlite"
    args = ["--db", db, "-m", m.name, "--dtype", "fp32", "--device", "cpu", "--workers", "1", "-b", "3", "--quiet"]
    code, out, err = run_cli("index", tmp / "photos", shard, *args)
    assert code == 0, err
    assert "8 embedded, 0 unchanged, 2 failed" in out
    assert err.count("skipped: ") == 2 and "empty.jpg" in err and "bad.png" in err
    keys = [str(p) for p in paths] + [f"{shard}/t_img0.png", f"{shard}/t_img1.png"]
    return db, keys


def _image_of(key: str) -> str | bytes:
    if ".tar/" not in key:
        return key
    shard, member = key.split(".tar/")
    with tarfile.open(shard + ".tar") as tar:
        return tar.extractfile(member).read()


# ---- indexing ------------------------------------------------------------------------------------------------------


def test_index_rows_errors_and_embeddings(m: blip2.Blip2, indexed: tuple[Path, list[str]]) -> None:
    db, keys = indexed
    rows = stored(db)
    assert sorted(rows) == sorted(keys)
    want = m.embed_images([_image_of(k) for k in keys]).numpy()  # (n, Nq, E) float32
    got = np.stack([rows[k].astype(np.float32) for k in keys])
    assert got.shape == (len(keys), m.config.num_query_tokens, m.config.image_text_hidden_size)
    np.testing.assert_allclose(got, want, atol=TOL)
    with Index(db) as idx:
        assert idx.model == m.name
        errors = {p: reason for p, reason, _ in idx.errors()}
    assert set(errors) == {str(Path(keys[0]).parent / n) for n in ("empty.jpg", "bad.png")}
    assert all(p in reason for p, reason in errors.items())  # each reason names its file
    con = sqlite3.connect(db)
    sha, size = con.execute("SELECT sha256, size FROM images WHERE path = ?", (keys[0],)).fetchone()
    data = Path(keys[0]).read_bytes()
    assert (sha, size) == (hashlib.sha256(data).hexdigest(), len(data))
    tar_sha = con.execute("SELECT sha256 FROM images WHERE path = ?", (keys[-1],)).fetchone()[0]
    assert tar_sha == hashlib.sha256(_image_of(keys[-1])).hexdigest()


def test_incremental_update_and_prune(m: blip2.Blip2, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = make_images(tmp_path / "photos")
    db = tmp_path / "i.sqlite"
    embedded: list[int] = []
    real = build_module.embed_pixels
    monkeypatch.setattr(build_module, "embed_pixels", lambda m, px: embedded.append(len(px)) or real(m, px))
    run = lambda: index_images(m, [tmp_path / "photos"], db, workers=0, batch_size=4)  # noqa: E731

    first = run()
    assert (first.total, first.embedded, first.failed, first.unchanged) == (8, 6, 2, 0)
    assert sum(embedded) == 6
    embedded.clear()
    again = run()
    assert (again.embedded, again.unchanged, again.failed, again.pruned) == (0, 6, 2, 0)
    assert embedded == []  # no model call at all

    Image.fromarray(np.full((24, 24, 3), 200, np.uint8)).save(paths[1])  # new content
    os.utime(paths[2], (time.time() + 10, time.time() + 10))  # touched only
    paths[3].unlink()
    (tmp_path / "photos" / "bad.png").unlink()
    third = run()
    assert (third.embedded, third.unchanged, third.failed, third.pruned) == (2, 3, 1, 1)
    assert sum(embedded) == 2
    rows = stored(db)
    assert sorted(rows) == sorted(str(p) for i, p in enumerate(paths) if i != 3)
    np.testing.assert_allclose(rows[str(paths[1])].astype(np.float32), m.embed_images([paths[1]])[0], atol=TOL)
    with Index(db) as idx:
        assert [p for p, _, _ in idx.errors()] == [str(tmp_path / "photos" / "empty.jpg")]


def test_list_inputs_are_not_pruned(m: blip2.Blip2, tmp_path: Path) -> None:
    paths = make_images(tmp_path / "photos", n=3)
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(p) for p in paths) + "\n")
    db = tmp_path / "l.sqlite"
    assert index_images(m, [listing], db, workers=0).embedded == 3
    listing.write_text(f"{paths[0]}\n")
    summary = index_images(m, [listing], db, workers=0)
    assert (summary.total, summary.unchanged, summary.pruned) == (1, 1, 0)
    with Index(db) as idx:
        assert len(idx) == 3


# ---- searching -----------------------------------------------------------------------------------------------------


def assert_ranked(got: list, truth: dict[str, float], tol: float = TOL) -> None:
    """`got` holds exactly the keys of `truth`, each with its true score within `tol`, best first. Two keys whose
    true scores are within 2 * tol may come in either order: the index scores its float16 copy, and a batch of
    another size rounds the last bits differently (a check of the exact order failed on CI for such a pair)."""
    assert sorted(r.target for r in got) == sorted(truth)
    for r in got:
        assert abs(r.score - truth[r.target]) <= tol, r.target
    assert all(a.score >= b.score for a, b in zip(got, got[1:]))


def test_text_search_matches_brute_force(m: blip2.Blip2, indexed: tuple[Path, list[str]]) -> None:
    db, keys = indexed
    sims = m.similarity([_image_of(k) for k in keys], QUERIES)  # (Ni, Nt) float32
    with Index(db) as idx:
        for j, query in enumerate(QUERIES):
            got = search_text(m, idx, query, k=len(keys))
            assert_ranked(got, {key: float(sims[i, j]) for i, key in enumerate(keys)})
            if HAVE_FAISS:  # the approximate path is optional; its own test skips without faiss
                approx = search_text(m, idx, query, k=3, approximate=True)  # faiss over a tiny index: every row
                assert [r.target for r in approx] == [r.target for r in got[:3]]
    code, out, _ = run_cli("search", QUERIES[0], "--db", db, "-k", "3", "--device", "cpu", "--dtype", "fp32")
    assert code == 0  # no --model: the model the index was built with
    lines = out.splitlines()
    assert lines[0].split() == ["rank", "score", "path"] and len(lines) == 4
    first = lines[1].split()
    assert first[0] == "1" and float(first[1]) >= float(sims[:, 0].max()) - TOL
    assert abs(float(first[1]) - float(sims[keys.index(first[2]), 0])) <= TOL


def _itm_plus_itc(m: blip2.Blip2, images: list, query: str, itc: torch.Tensor) -> list[float]:
    """ITM positive logit (itm_head logit[:, 1], averaged over queries) + ITC, computed directly."""
    with torch.no_grad():
        image_embeds = m.model.encode_image(m.pixel_values(images))
        ids, mask = m.text_ids([query] * len(images))
        logits = m.model.itm_logits(image_embeds, ids, mask)[:, 1]
    return (logits.float() + itc).tolist()


def test_rerank_orders_by_itm_plus_itc(m: blip2.Blip2, indexed: tuple[Path, list[str]]) -> None:
    db, keys = indexed
    query, top = QUERIES[1], 5
    with Index(db) as idx:
        plain = search_text(m, idx, query, k=len(keys))  # ITC order (checked against brute force above)
        got = search_text(m, idx, query, k=len(keys), rerank=top)
    cand = [r.target for r in plain[:top]]
    scores = _itm_plus_itc(m, [_image_of(k) for k in cand], query, torch.tensor([r.score for r in plain[:top]]))
    assert_ranked(got[:top], dict(zip(cand, scores)))
    assert all(r.itm is not None for r in got[:top]) and all(r.itm is None for r in got[top:])
    assert [r.target for r in got[top:]] == [r.target for r in plain[top:]]  # the rest: ITC order, untouched
    code, out, _ = run_cli(
        "search", query, "--db", db, "-k", "2", "--rerank", str(top), "--json", "--device", "cpu", "--dtype", "fp32"
    )
    assert code == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["path"] for r in records] == [r.target for r in got[:2]]
    assert records[0]["rank"] == 1 and abs(records[0]["score"] - records[0]["itm"] - records[0]["itc"]) < 1e-5


def test_image_to_text_and_image_to_image(m: blip2.Blip2, indexed: tuple[Path, list[str]], tmp_path: Path) -> None:
    db, keys = indexed
    texts_file = tmp_path / "texts.txt"
    texts_file.write_text("a blue car\n\nthree horses eating\n")
    texts = [QUERIES[0], "a blue car", "three horses eating", QUERIES[2]]
    sims = m.similarity([keys[0]], texts)[0]
    want = sorted(range(len(texts)), key=lambda i: -float(sims[i]))
    got = search_texts_for_image(m, keys[0], texts, k=4)
    assert [r.target for r in got] == [texts[i] for i in want]
    np.testing.assert_allclose([r.score for r in got], [float(sims[i]) for i in want], atol=1e-5)
    reranked = search_texts_for_image(m, keys[0], texts, k=4, rerank=4)
    with torch.no_grad():
        image_embeds = m.model.encode_image(m.pixel_values([keys[0]])).expand(4, -1, -1)
        itm = m.model.itm_logits(image_embeds, *m.text_ids(texts))[:, 1]
    assert [r.target for r in reranked] == [texts[i] for i in sorted(range(4), key=lambda i: -float(itm[i] + sims[i]))]

    args = ["search", "--image", keys[0], "--texts", QUERIES[0], "--texts", texts_file, QUERIES[2], "--json"]
    code, out, _ = run_cli(*args, "-m", m.name, "--device", "cpu", "--dtype", "fp32")
    assert code == 0
    assert [json.loads(line)["text"] for line in out.splitlines()] == [texts[i] for i in want]

    with Index(db) as idx:
        like = search_like(m, idx, keys[2], k=3)
    assert like[0].target == keys[2] and like[0].score > 0.99  # the image itself is its own best match
    code, out, _ = run_cli("search", "--like", keys[2], "--db", db, "-k", "2", "--device", "cpu", "--dtype", "fp32")
    assert code == 0 and out.splitlines()[1].split()[2] == keys[2]


def test_missing_or_bad_db_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "nope.sqlite"
    code, out, err = run_cli("search", "a dog", "--db", missing)
    assert code == 2 and out == ""
    assert err.strip().count("\n") == 0 and str(missing) in err
    assert not missing.exists()  # not created by a failed search
    notdb = tmp_path / "junk.sqlite"
    notdb.write_bytes(b"this is not a database" * 100)
    code, _, err = run_cli("search", "a dog", "--db", notdb)
    assert code == 2 and str(notdb) in err and err.strip().count("\n") == 0
    code, _, err = run_cli("search", "a dog")
    assert code == 2 and "--db" in err


# ---- kill and resume -----------------------------------------------------------------------------------------------

CHILD = """
import json, sys, time
import blip2
from blip2.retrieval import build

real = build.embed_pixels
def slow(m, pixels):  # slow the tiny model down so that the parent can kill us mid-run
    time.sleep(0.4)
    return real(m, pixels)
build.embed_pixels = slow
ckpt, folder, db = sys.argv[1:]
s = build.index_images(blip2.load(ckpt, device="cpu", dtype="fp32"), [folder], db, batch_size=1, workers=0)
print(json.dumps({"embedded": s.embedded, "unchanged": s.unchanged, "failed": s.failed}))
"""


def _rows(db: Path) -> int:
    try:
        with sqlite3.connect(db, timeout=30) as con:
            return con.execute("SELECT COUNT(*) FROM images").fetchone()[0]
    except sqlite3.Error:  # not created yet
        return 0


def test_sigkill_then_rerun_completes(m: blip2.Blip2, itm_ckpt: Path, tmp_path: Path) -> None:
    paths = make_images(tmp_path / "photos", n=6)
    db = tmp_path / "k.sqlite"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, str(script), str(itm_ckpt), str(tmp_path / "photos"), str(db)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while _rows(db) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, f"ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = _rows(db)
    assert 2 <= done_before < 6

    out = subprocess.run(cmd, env=env, capture_output=True, timeout=300, check=True).stdout
    summary = json.loads(out.decode().splitlines()[-1])
    assert summary == {"embedded": 6 - done_before, "unchanged": done_before, "failed": 2}
    rows = stored(db)
    assert sorted(rows) == sorted(str(p) for p in paths)
    want = m.embed_images(paths).numpy()
    np.testing.assert_allclose(np.stack([rows[str(p)].astype(np.float32) for p in paths]), want, atol=TOL)


# ---- Ray -----------------------------------------------------------------------------------------------------------


def test_ray_engine_equals_local(m: blip2.Blip2, itm_ckpt: Path, tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    pytest.importorskip("pyarrow")
    make_images(tmp_path / "photos", n=5)
    shard = make_tar(tmp_path / "s.tar", make_images(tmp_path / "for_tar", n=2, seed=3)[:2])
    inputs = [tmp_path / "photos", shard]
    local = index_images(m, inputs, tmp_path / "local.sqlite", workers=0)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        summary = build_module.index_images_ray(
            str(itm_ckpt), inputs, tmp_path / "ray.sqlite", batch_size=2, num_workers=2, device="cpu", dtype="fp32"
        )
    finally:
        ray.shutdown()
    assert (summary.total, summary.embedded, summary.failed) == (local.total, local.embedded, local.failed) == (9, 7, 2)
    a, b = stored(tmp_path / "local.sqlite"), stored(tmp_path / "ray.sqlite")
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_allclose(a[key].astype(np.float32), b[key].astype(np.float32), atol=TOL)
    con_a, con_b = sqlite3.connect(tmp_path / "local.sqlite"), sqlite3.connect(tmp_path / "ray.sqlite")
    q = "SELECT path, sha256, size, mtime FROM images ORDER BY path"
    assert con_a.execute(q).fetchall() == con_b.execute(q).fetchall()
    q = "SELECT path FROM errors ORDER BY path"
    assert con_a.execute(q).fetchall() == con_b.execute(q).fetchall()


def test_import_parquet_shards(m: blip2.Blip2, tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    make_images(tmp_path / "photos", n=3)
    src = tmp_path / "src.sqlite"
    index_images(m, [tmp_path / "photos"], src, workers=0)
    con = sqlite3.connect(src)
    rows = [
        {"path": p, "sha256": h, "size": s, "mtime": t, "embedding": e, "error": None}
        for p, h, s, t, e in con.execute("SELECT path, sha256, size, mtime, embedding FROM images")
    ]
    rows.append({"path": "/x/broken.jpg", "sha256": None, "size": 1, "mtime": 0.0, "embedding": None, "error": "bad"})
    pq.write_table(pa.Table.from_pylist(rows, schema=build_module.row_schema()), tmp_path / "part-00000.parquet")
    with Index(tmp_path / "dst.sqlite", dim=16, num_query=8) as dst:
        summary = build_module.import_parquet(dst, [tmp_path / "part-00000.parquet"])
        assert (summary.embedded, summary.failed) == (3, 1)
        assert [p for p, _, _ in dst.errors()] == ["/x/broken.jpg"]
    a, b = stored(src), stored(tmp_path / "dst.sqlite")
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
