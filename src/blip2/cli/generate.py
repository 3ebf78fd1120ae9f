"""`blip2 caption`, `blip2 ask`, `blip2 chat`, `blip2 models`: text from images, on the command line.

Exit codes: 0 all went well; 2 bad input. `caption` keeps going past a bad image (one `error: <path>: <why>` line
on stderr each), prints every good caption, and exits 2 at the end if any image failed, so a script notices.
A bad model, option or the image of `ask`/`chat` stops the command at once: one line on stderr, exit 2.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from typing import IO, Any

import click

from ..defaults import BATCH_SIZE
from .batch import batch_options, batch_requested, generator_engine, run_batch
from .options import (
    engine_option,
    generation_kwargs,
    generation_options,
    json_line,
    load_model,
    model_options,
    one_line,
)

CHAT_HELP = "commands: /reset (forget the conversation), /image PATH (talk about another image), /quit (or Ctrl-D)"


def _echo_error(message: object) -> None:
    click.echo(f"error: {message}", err=True)


def _batches(items: Sequence[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


# ---- caption ---------------------------------------------------------------------------------------------------------
@click.command()
@click.argument("images", nargs=-1, required=True, metavar="IMG...")
@click.option(
    "--prompt",
    "-p",
    default=None,
    help="BLIP-2: the caption starts with this text (prints the continuation). InstructBLIP: the instruction "
    "(default 'A short image caption.').",
)
@click.option("--json", "as_json", is_flag=True, help='JSON lines {"image": ..., "caption": ...} instead of TSV.')
@click.option(
    "--batch-size",
    "-b",
    type=click.IntRange(min=1),
    default=BATCH_SIZE,
    show_default=True,
    help="Images per forward pass.",
)
@model_options
@generation_options
@batch_options
def caption(
    images: tuple[str, ...],
    prompt: str | None,
    as_json: bool,
    batch_size: int,
    model: str,
    device: str,
    dtype: str,
    **gen: Any,
) -> None:
    """Caption each image: prints `path<TAB>caption` lines (or JSON lines with --json).

    A missing or unreadable image is reported on stderr and skipped; the exit code is then 2.
    """
    gen_kwargs = generation_kwargs(gen)
    # Folders, list files, tar shards, --out or sidecars: batch captioning (cli/batch.py: resumable, exit 0 when it
    # finished even with bad images), before the model loads.
    if batch_requested(images, gen):
        return run_batch(images, model, device, dtype, prompt, batch_size, gen_kwargs, gen, as_json)
    # Below is the direct path: a few files named on the command line, results on stdout.
    m = load_model(model, device, dtype, generator_engine(gen.get("engine")))
    failed = _caption_files(m, list(images), prompt, batch_size, as_json, gen_kwargs)
    if failed:
        sys.exit(2)  # each bad file has had its one line


def _caption_files(
    m: Any, paths: list[str], prompt: str | None, batch_size: int, as_json: bool, gen_kwargs: dict[str, Any]
) -> int:
    """Caption `paths` in batches, printing in input order; returns how many could not be read."""
    from ..errors import ImageError
    from ..processing import load_image

    failed = 0
    for batch in _batches(paths, batch_size):
        good: list[tuple[str, Any]] = []
        for path in batch:
            try:  # decode here, one image at a time, so one bad file does not sink its batch
                good.append((path, load_image(path)))
            except ImageError as e:
                _echo_error(e)
                failed += 1
        if not good:
            continue
        texts = m.caption([img for _, img in good], prompt=prompt, **gen_kwargs)
        for (path, _), text in zip(good, texts, strict=True):
            if as_json:
                click.echo(json_line({"image": path, "caption": text}))
            else:
                click.echo(f"{path}\t{one_line(text)}")
    return failed


# ---- ask -------------------------------------------------------------------------------------------------------------
@click.command()
@click.argument("image", metavar="IMG")
@click.argument("question")
@click.option("--json", "as_json", is_flag=True, help='One JSON line {"image", "question", "answer"}.')
@model_options
@engine_option
@generation_options
def ask(image: str, question: str, as_json: bool, model: str, device: str, dtype: str, engine: str, **gen: Any) -> None:
    """Answer QUESTION about IMG (visual question answering, "Question: {} Answer:"; InstructBLIP: "Question: {}
    Short Answer:")."""
    from ..processing import load_image

    gen_kwargs = generation_kwargs(gen)
    if not question.strip():
        raise click.BadParameter("the question is empty", param_hint="QUESTION")
    img = load_image(image)  # a bad image fails before the (slow) model load
    answer = load_model(model, device, dtype, engine).ask(img, question, **gen_kwargs)
    if as_json:
        click.echo(json_line({"image": image, "question": question, "answer": answer}))
    else:
        click.echo(answer)


# ---- chat ------------------------------------------------------------------------------------------------------------
@click.command()
@click.argument("image", metavar="IMG")
@model_options
@generation_options
def chat(image: str, model: str, device: str, dtype: str, **gen: Any) -> None:
    """Talk about IMG: one question per line on stdin, one answer per line on stdout, printed as it is generated.

    \b
    /reset        forget the conversation so far
    /image PATH   talk about another image (the conversation starts over)
    /quit         leave (so do Ctrl-D and Ctrl-C)
    Empty lines are ignored.
    """
    from ..errors import Blip2Error
    from ..processing import load_image

    gen_kwargs = generation_kwargs(gen)
    img = load_image(image)
    session = load_model(model, device, dtype).chat(img)
    stdin = sys.stdin  # click.testing.CliRunner swaps it for its input
    interactive = _isatty(stdin)
    if interactive:
        click.echo(f"chatting about {image}; {CHAT_HELP}", err=True)
    try:
        for line in _read_lines(stdin, interactive):
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if _chat_command(session, line) == "quit":
                    return
                continue
            try:
                _print_answer(session, line, gen_kwargs)
            except Blip2Error as e:  # e.g. options that do not fit: say so and keep the conversation
                _echo_error(e)
    except KeyboardInterrupt:  # Ctrl-C at the prompt leaves like Ctrl-D
        if interactive:
            click.echo(err=True)


def _print_answer(session: Any, question: str, gen_kwargs: dict[str, Any]) -> None:
    """The answer's words as they are generated (`Chat.stream`; beam search prints it when done), then a newline.
    Pieces never split a run of whitespace, so `one_line` on each piece is `one_line` on the answer."""
    with session.stream(question, **gen_kwargs) as pieces:
        try:
            for piece in pieces:
                click.echo(one_line(piece), nl=False)  # click.echo flushes
        finally:
            click.echo()


def _chat_command(session: Any, line: str) -> str | None:
    """Run a `/command`; returns "quit" to leave. Errors are reported and the chat goes on."""
    from ..errors import Blip2Error
    from ..processing import load_image

    command, _, arg = line.partition(" ")
    arg = arg.strip()
    if command in ("/quit", "/exit", "/q"):
        return "quit"
    if command == "/reset":
        session.reset()
    elif command == "/image":
        if not arg:
            _echo_error("/image needs a path: /image PATH")
            return None
        try:
            session.set_image(load_image(arg))
        except Blip2Error as e:
            _echo_error(e)
    elif command in ("/help", "/?"):
        click.echo(CHAT_HELP, err=True)
    else:
        _echo_error(f"unknown command {command!r}; {CHAT_HELP}")
    return None


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _read_lines(stream: IO[str], interactive: bool) -> Iterator[str]:
    """Lines until EOF; with a terminal, `input("> ")` gives line editing and a prompt (none when piped)."""
    if not interactive:
        yield from stream
        return
    while True:
        try:
            yield input("> ")
        except EOFError:
            click.echo(err=True)  # Ctrl-D: end the prompt's line
            return


# ---- models ----------------------------------------------------------------------------------------------------------
@click.command()
def models() -> None:
    """List the known BLIP-2 checkpoints and which are already in the Hugging Face cache."""
    from ..config import KNOWN_MODELS

    cached = _cached_repos()
    header = ("MODEL", "LM", "PARAMS", "TASK", "SIZE", "CACHED")
    rows = [header]
    for repo_id, info in KNOWN_MODELS.items():
        on_disk = "?" if cached is None else ("yes" if repo_id in cached else "no")
        rows.append((repo_id, info["lm"], info["params"], info["task"], info["size"], on_disk))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    if cached is None:
        click.echo("(the Hugging Face cache could not be read; CACHED is unknown)", err=True)


def _cached_repos() -> set[str] | None:
    """Model repo ids in the local Hugging Face cache (no network); an empty set if there is no cache yet."""
    try:
        from huggingface_hub import scan_cache_dir
        from huggingface_hub.errors import CacheNotFound
    except ImportError:
        return None
    try:
        info = scan_cache_dir()
    except CacheNotFound:
        return set()
    except Exception:  # noqa: BLE001 - a damaged cache must not break a listing
        return None
    return {repo.repo_id for repo in info.repos if repo.repo_type == "model" and repo.nb_files > 0}
