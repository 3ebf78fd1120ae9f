"""`blip2 index` and `blip2 search`: embed a collection into an SQLite index, then search it by text or by image.

    blip2 index photos/ --db photos.sqlite --recursive
    blip2 search "a dog on a beach" --db photos.sqlite -k 10 --rerank 32
    blip2 search --image dog.jpg --texts "a dog" "a cat" captions.txt      # rank texts for an image
    blip2 search --like dog.jpg --db photos.sqlite                          # images like an image

Searching is two-stage, as LAVIS `compute_sim_matrix`: exact ITC similarity over the whole index, then, with
`--rerank K`, ITM + ITC for the top K; the functions behind it live in `blip2.retrieval.search`.

Exit codes: 0 done (`index` also when some files were skipped: they are listed on stderr and kept in the index's
error table); 2 bad input, e.g. a missing index file, named in one line.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from ..defaults import BATCH_SIZE, RAY_NUM_WORKERS, RETRIEVAL_MODEL, TOP_K
from .options import load_model, model_options

if TYPE_CHECKING:
    from ..retrieval import Index
    from ..retrieval.search import Ranked

F = TypeVar("F", bound=Callable[..., Any])


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
@click.option(
    "--batch-size", "-b", type=click.IntRange(min=1), default=BATCH_SIZE, show_default=True, help="Images per pass."
)
@click.option("--workers", type=click.IntRange(min=0), default=None, help="Decoding processes [cores - 1, at most 8].")
@click.option("--prune/--no-prune", default=True, show_default=True, help="Drop rows of files gone from folder inputs.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True)
@click.option("--address", default=None, help="--engine ray: the cluster to join [a local one].")
@click.option(
    "--num-workers",
    type=click.IntRange(min=1),
    default=RAY_NUM_WORKERS,
    show_default=True,
    help="--engine ray: actors.",
)
@click.option("--quiet", "--no-progress", "quiet", is_flag=True, help="No progress bar.")  # -q is --question
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


def _warn(message: str) -> None:
    click.echo(f"warning: {message}", err=True)


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
@click.option(
    "-k", "--top-k", "k", type=click.IntRange(min=1), default=TOP_K, show_default=True, help="Results to show."
)
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
    from ..retrieval.search import search_like, search_text, search_texts_for_image

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
            results = search_text(m, idx, query[0], k, rerank or 0, approximate, on_skip=_warn)
    _print(results, as_json, "path")
