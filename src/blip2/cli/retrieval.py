"""`blip2 index` and `blip2 search`: embed a collection into an SQLite index, then search it by text or by image.

    blip2 index photos/ --db photos.sqlite --recursive
    blip2 search "a dog on a beach" --db photos.sqlite -k 10 --rerank 32
    blip2 search --image dog.jpg --texts "a dog" "a cat" captions.txt      # rank texts for an image
    blip2 search --like dog.jpg --db photos.sqlite                          # images like an image

Searching is two-stage, as LAVIS `compute_sim_matrix`: ITC similarity (cosine, max over the query vectors) over the
whole index, then, with `--rerank K`, the top K candidates are re-scored with the ITM head:
`score = ITM + ITC`, where ITM is the **positive-class logit** of `itm_head` (`logit[:, 1]`, averaged over the query
rows, not a probability) and ITC is the similarity. Re-ranked results come first; candidates beyond K (and images
that cannot be opened any more) follow in ITC order with their ITC score. Re-ranking re-opens the images from the
paths stored in the index (tar members from their shard).

Exit codes: 0 done (`index` also when some files were skipped: they are listed on stderr and kept in the index's
error table); 2 bad input, e.g. a missing index file, named in one line.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from .options import load_model, model_options

if TYPE_CHECKING:
    import torch

    from ..pipeline import Blip2, ImageInput
    from ..retrieval import Index

F = TypeVar("F", bound=Callable[..., Any])

RETRIEVAL_MODEL = "Salesforce/blip2-itm-vit-g"
ITM_CHUNK = 16  # image-text pairs per ITM forward pass


def retrieval_model_options(f: F) -> F:
    """The shared `model_options`, with a retrieval checkpoint as the default model."""
    f = model_options(f)
    for param in getattr(f, "__click_params__", []):
        if param.name == "model":
            param.default = RETRIEVAL_MODEL
    return f


# ---- index -----------------------------------------------------------------------------------------------------------
@click.command("index")
@click.argument("inputs", nargs=-1, required=True, metavar="DIR_OR_LIST...")
@click.option("--db", required=True, type=click.Path(dir_okay=False), help="The index file (SQLite); created if new.")
@click.option("--recursive", "-r", is_flag=True, help="Also index images in sub-folders of folder inputs.")
@click.option("--batch-size", "-b", type=click.IntRange(min=1), default=8, show_default=True, help="Images per pass.")
@click.option("--workers", type=click.IntRange(min=0), default=None, help="Decoding processes [cores - 1, at most 8].")
@click.option("--prune/--no-prune", default=True, show_default=True, help="Drop rows of files gone from folder inputs.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True)
@click.option("--address", default=None, help="--engine ray: the cluster to join [a local one].")
@click.option("--num-workers", type=click.IntRange(min=1), default=1, show_default=True, help="--engine ray: actors.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@retrieval_model_options
def index(
    inputs: tuple[str, ...],
    db: str,
    recursive: bool,
    batch_size: int,
    workers: int | None,
    prune: bool,
    engine: str,
    address: str | None,
    num_workers: int,
    quiet: bool,
    model: str,
    device: str,
    dtype: str,
) -> None:
    """Embed the images of folders, path lists (txt, JSONL, CSV) and tar shards into the index DB.

    Incremental: only new files and files whose size or mtime changed are embedded; rows of files deleted from a
    folder input are pruned (list and tar inputs are never pruned). Every batch is committed, so a killed run
    continues where it stopped when run again. Unreadable files are skipped, listed on stderr and recorded.
    """
    from ..retrieval.build import index_images, index_images_ray

    common = {"recursive": recursive, "batch_size": batch_size, "prune": prune, "progress": not quiet}
    if engine == "ray":
        kw = {"address": address, "num_workers": num_workers, "device": device, "dtype": dtype}
        summary = index_images_ray(model, list(inputs), db, **common, **kw)
    else:
        summary = index_images(load_model(model, device, dtype), list(inputs), db, workers=workers, **common)
    for _, reason in summary.errors:
        click.echo(f"skipped: {reason}", err=True)
    click.echo(summary.line())


# ---- search: the Python side -----------------------------------------------------------------------------------------
@dataclass
class Ranked:
    """One result: an image path (text-to-image, image-to-image) or a text (image-to-text), best first."""

    target: str
    score: float  # ITM + ITC when re-ranked, else ITC (or the image-image cosine)
    itc: float
    itm: float | None = None  # positive-class ITM logit; None when not re-ranked
    id: int | None = None  # the index row id of an image


def open_indexed(key: str) -> ImageInput:
    """What the index stored as a path, ready for `load_image`: the file, or a tar member's bytes."""
    from ..batch.inputs import TAR_SUFFIXES
    from ..errors import ImageError

    if os.path.isfile(key):
        return key
    low = key.lower()
    for suffix in TAR_SUFFIXES:
        cut = low.find(suffix + "/")
        if cut >= 0 and os.path.isfile(key[: cut + len(suffix)]):
            shard, member = key[: cut + len(suffix)], key[cut + len(suffix) + 1 :]
            try:
                with tarfile.open(shard, "r:*") as tar:
                    fp = tar.extractfile(member)
                    if fp is not None:
                        return fp.read()
            except (tarfile.TarError, KeyError, OSError) as e:
                raise ImageError(f"{key}: cannot read the member from {shard} ({e})") from e
    raise ImageError(f"{key}: no such file (indexed, but moved or deleted since)")


def itm_logits(m: Blip2, image_embeds: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
    """Positive-class ITM logit of the pairs (image_embeds[i] (N, Dv), texts[i]) -> float32 (B,), as LAVIS."""
    import torch

    ids, mask = m._text_ids(texts)
    with torch.no_grad():
        out = [
            m.model.itm_logits(image_embeds[s : s + ITM_CHUNK], ids[s : s + ITM_CHUNK], mask[s : s + ITM_CHUNK])
            for s in range(0, len(texts), ITM_CHUNK)
        ]
    return torch.cat(out).float()[:, 1].cpu()


def _rerank(ranked: list[Ranked], itm: Sequence[float | None], top: int) -> list[Ranked]:
    """Re-score the first `top` results that have an ITM logit; they come first, the rest follow in ITC order."""
    head, tail = [], []
    for i, r in enumerate(ranked):
        logit = itm[i] if i < len(itm) else None
        if i < top and logit is not None:
            head.append(Ranked(r.target, logit + r.itc, r.itc, logit, r.id))
        else:
            tail.append(r)
    return sorted(head, key=lambda r: -r.score) + tail


def search_text(
    m: Blip2, index: Index, query: str, k: int = 10, rerank: int = 0, approximate: bool = False
) -> list[Ranked]:
    """Text-to-image: ITC top-max(k, rerank) from the index, the top `rerank` re-scored with ITM; k results."""
    import torch

    from ..errors import ImageError
    from ..processing import load_image

    hits = index.search(m.embed_texts([query])[0], max(k, rerank), approximate=approximate)[0]
    ranked = [Ranked(h.path, h.score, h.score, None, h.id) for h in hits]
    if not rerank:
        return ranked[:k]
    pixels, ok = [], []
    for i, h in enumerate(hits[:rerank]):
        try:
            pixels.append(m.transform([load_image(open_indexed(h.path))])[0])
            ok.append(i)
        except ImageError as e:
            click.echo(f"warning: not re-ranked: {e}", err=True)
    itm: list[float | None] = [None] * len(hits)
    for s in range(0, len(ok), ITM_CHUNK):
        px = torch.stack(pixels[s : s + ITM_CHUNK]).to(m.device, m.dtype)
        with torch.no_grad():
            image_embeds = m.model.encode_image(px)  # (b, N, Dv)
        for i, logit in zip(ok[s : s + ITM_CHUNK], itm_logits(m, image_embeds, [query] * len(px)).tolist()):
            itm[i] = logit
    return _rerank(ranked, itm, rerank)[:k]


def search_texts_for_image(m: Blip2, image: ImageInput, texts: Sequence[str], k: int = 10, rerank: int = 0) -> list:
    """Image-to-text: rank `texts` for one image by ITC, the top `rerank` re-scored with ITM; k results."""
    import torch

    with torch.no_grad():
        image_embeds = m.model.encode_image(m.pixel_values([image]))  # (1, N, Dv)
        img = m.model.image_embeddings(image_embeds).float()[0]  # (Nq, E)
    itc = (img @ m.embed_texts(texts).T).amax(dim=0)  # (Nt,)
    order = sorted(range(len(texts)), key=lambda i: (-float(itc[i]), i))[: max(k, rerank)]
    ranked = [Ranked(texts[i], float(itc[i]), float(itc[i])) for i in order]
    if not rerank:
        return ranked[:k]
    top = [r.target for r in ranked[:rerank]]
    logits = itm_logits(m, image_embeds.expand(len(top), -1, -1), top).tolist()
    return _rerank(ranked, logits, rerank)[:k]


def search_like(m: Blip2, index: Index, image: ImageInput, k: int = 10) -> list[Ranked]:
    """Image-to-image: cosine of the mean-pooled query embeddings (`Index.search_by_image`)."""
    hits = index.search_by_image(m.embed_images([image])[0], k)
    return [Ranked(h.path, h.score, h.score, None, h.id) for h in hits]


# ---- search: the command ---------------------------------------------------------------------------------------------
def read_texts(values: Sequence[str]) -> list[str]:
    """Each value is a file of texts (one per non-empty line) if such a file exists, else a text itself."""
    texts: list[str] = []
    for value in values:
        path = Path(value)
        if path.is_file():
            try:
                texts.extend(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
            except (OSError, UnicodeDecodeError) as e:
                raise click.UsageError(f"{path}: cannot read texts ({e})") from e
        elif value.strip():
            texts.append(value)
    return texts


def _open_db(db: str | None, mode: str) -> Index:
    """The existing index file; never creates one (a typo must not leave an empty index behind)."""
    from ..retrieval import Index, IndexFileError

    if db is None:
        raise click.UsageError(f"{mode} search needs --db INDEX (built with `blip2 index`)")
    if not Path(db).is_file():
        raise IndexFileError(f"{db}: no such index file; build it with `blip2 index DIR --db {db}`")
    return Index(db)


def _print(results: list[Ranked], as_json: bool, kind: str) -> None:
    if as_json:
        for rank, r in enumerate(results, start=1):
            record = {"rank": rank, "score": r.score, "itc": r.itc, "itm": r.itm, kind: r.target}
            if r.id is not None:
                record["id"] = r.id
            click.echo(json.dumps(record, ensure_ascii=False))
        return
    click.echo(f"{'rank':>4}  {'score':>9}  {kind}")
    for rank, r in enumerate(results, start=1):
        click.echo(f"{rank:>4}  {r.score:>9.4f}  {r.target}")


@click.command("search")
@click.argument("query", nargs=-1, metavar="[QUERY | TEXT...]")
@click.option("--db", type=click.Path(dir_okay=False), default=None, help="Index built by `blip2 index`.")
@click.option("-k", "--top-k", "k", type=click.IntRange(min=1), default=10, show_default=True, help="Results to show.")
@click.option("--rerank", type=click.IntRange(min=1), default=None, metavar="K", help="Re-rank the ITC top K with ITM.")
@click.option("--image", type=click.Path(), default=None, help="Image-to-text: rank the texts for this image.")
@click.option("--texts", multiple=True, help="With --image: a text, or a file of texts (one per line); repeatable.")
@click.option("--like", type=click.Path(), default=None, help="Image-to-image: images of the index like this one.")
@click.option("--approximate", is_flag=True, help="Text search through a faiss index (needs faiss-cpu).")
@click.option("--json", "as_json", is_flag=True, help="JSON lines instead of a table.")
@retrieval_model_options
@click.pass_context
def search(
    ctx: click.Context,
    query: tuple[str, ...],
    db: str | None,
    k: int,
    rerank: int | None,
    image: str | None,
    texts: tuple[str, ...],
    like: str | None,
    approximate: bool,
    as_json: bool,
    model: str,
    device: str,
    dtype: str,
) -> None:
    """Search the index DB for images matching QUERY (ITC, then ITM re-ranking with --rerank K).

    With --image, rank texts (the arguments and --texts: strings, or files with one text per line) for an image;
    no index is needed. With --like, find the images of the index most like an image. Without --model, the model
    the index was built with is used.
    """
    if image is not None and like is not None:
        raise click.UsageError("give --image (image-to-text) or --like (image-to-image), not both")
    if image is not None:
        candidates = read_texts([*texts, *query])
        if not candidates:
            raise click.UsageError("--image needs texts to rank: TEXT... or --texts FILE_OR_TEXT")
        m = load_model(model, device, dtype)
        _print(search_texts_for_image(m, image, candidates, k, rerank or 0), as_json, "text")
        return
    if texts:
        raise click.UsageError("--texts goes with --image")
    if like is not None and (query or rerank):
        raise click.UsageError("--like takes no QUERY and no --rerank (ITM scores image-text pairs)")
    if like is None and len(query) != 1:
        raise click.UsageError('give one QUERY (quote it: blip2 search "a dog on a beach" --db ...)')
    with _open_db(db, "image-to-image" if like else "text-to-image") as idx:
        if ctx.get_parameter_source("model") == click.core.ParameterSource.DEFAULT and idx.model:
            model = idx.model  # the model the embeddings come from
        m = load_model(model, device, dtype)
        if like is not None:
            results = search_like(m, idx, like, k)
        else:
            results = search_text(m, idx, query[0], k, rerank or 0, approximate)
    _print(results, as_json, "path")
