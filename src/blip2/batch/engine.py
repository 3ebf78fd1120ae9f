"""The local batch engine: caption many images on one machine, resumably.

    for r in caption_images(["photos/"], model="Salesforce/blip2-opt-2.7b", out=["captions.jsonl"]):
        print(r.path, r.caption or r.error)

Images are decoded and preprocessed by worker processes (`blip2.imagemap`) while the model captions the previous batch.
The model side is the same computation as `Blip2.generate` (same pixels, prompts, padding and options), so a
caption does not depend on the batch it landed in. Progress goes to a SQLite ledger first (see `ledger`), so a run
killed at any moment resumes where it stopped, and every image is in the outputs exactly once.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ..defaults import MAX_PIXELS, SIDECAR_EXISTING, SIDECAR_EXT, SIDECAR_SEPARATOR
from ..engines import check_engine
from ..engines.vllm import check_options
from ..errors import ConfigError
from ..pipeline import VQA_OPTIONS, Blip2, Generation, GenerationOptions
from .sidecar import EXISTING

MANIFEST_SUFFIXES = (".jsonl", ".parquet")


@dataclass
class BatchOptions:
    """Everything about a batch run but the inputs and the model. Generation options are in `generation`."""

    out: Sequence[str | os.PathLike[str]] = ()  # manifests: .jsonl and/or .parquet
    sidecar: bool = False  # a caption file beside each image
    sidecar_dir: str | os.PathLike[str] | None = None  # ... or under this folder, mirroring the inputs
    ext: str = SIDECAR_EXT
    existing: str = SIDECAR_EXISTING[0]  # for sidecars: skip | overwrite | append | prepend
    separator: str = SIDECAR_SEPARATOR  # between the old text and the caption for append / prepend
    prefix: str = ""
    suffix: str = ""
    prompt: str | None = None
    question: str | None = None
    recursive: bool = False
    batch_size: int | None = None  # None: by device
    workers: int | None = None  # None: cores - 1
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False  # decode with a static KV cache and a compiled step (pipeline.load): long runs only
    engine: str = "ours"  # what generates: ours or vllm (blip2.engines)
    max_pixels: int = MAX_PIXELS
    errors: str | os.PathLike[str] | None = None  # default: errors.jsonl beside the output
    state: str | os.PathLike[str] | None = None  # the progress ledger; default: beside the output
    progress: bool = False
    generation: GenerationOptions | None = None

    def __post_init__(self) -> None:
        self.out = [Path(p) for p in self.out]
        for p in self.out:
            if p.suffix.lower() not in MANIFEST_SUFFIXES:
                raise ConfigError(f"{p}: output must end in {' or '.join(MANIFEST_SUFFIXES)}")
            if p.suffix.lower() == ".parquet" and importlib.util.find_spec("pyarrow") is None:
                # said before the model loads and the images are captioned, not when the run ends
                raise ConfigError(f"{p}: Parquet output needs pyarrow (pip install pyarrow, or the ray extra)")
        if self.existing not in EXISTING:
            raise ConfigError(f"existing must be one of {', '.join(EXISTING)}; got {self.existing!r}")
        if self.prompt and self.question:
            raise ConfigError("give either a prompt (captioning) or a question (VQA), not both")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1; got {self.batch_size}")
        if not self.ext.strip(".") or "/" in self.ext:
            raise ConfigError(f"ext must be a file extension such as txt or caption; got {self.ext!r}")
        if self.sidecar_dir is not None:
            self.sidecar = True
        if self.generation is None:
            self.generation = VQA_OPTIONS if self.question else GenerationOptions()
        if check_engine(self.engine) == "vllm":
            check_options(self.generation)  # refused now, not after vLLM has started
        if self.generation.num_return_sequences != 1:
            raise ConfigError("batch captioning writes one caption per image; num_return_sequences must be 1")

    def engine_key(self) -> dict[str, str]:
        """The engine, for run fingerprints: absent for ours, so runs fingerprinted before engines existed resume."""
        return {} if self.engine == "ours" else {"engine": self.engine}

    @property
    def persistent(self) -> bool:
        return bool(self.out) or self.sidecar

    def state_dir(self, inputs: Sequence[str]) -> Path:
        """Where the ledger and the error log go: beside the first output, else the sidecar folder or inputs."""
        if self.out:
            return Path(self.out[0]).parent
        if self.sidecar_dir is not None:
            return Path(self.sidecar_dir)
        first = Path(inputs[0]) if inputs else Path(".")
        return first if first.is_dir() else first.parent

    def ledger_path(self, inputs: Sequence[str]) -> Path:
        if self.state is not None:
            return Path(self.state)
        if self.out:
            first = Path(self.out[0])
            return first.with_name(first.stem + ".progress.sqlite")
        return self.state_dir(inputs) / ".blip2-captions.progress.sqlite"

    def errors_path(self, inputs: Sequence[str]) -> Path:
        return Path(self.errors) if self.errors is not None else self.state_dir(inputs) / "errors.jsonl"


def split_options(options: dict[str, Any]) -> BatchOptions:
    """`BatchOptions` from keyword arguments, generation options (max_new_tokens, num_beams, ...) included."""
    gen_names = {f.name for f in fields(GenerationOptions)}
    gen = {k: options.pop(k) for k in list(options) if k in gen_names}
    unknown = set(options) - {f.name for f in fields(BatchOptions)}
    if unknown:
        raise TypeError(f"unknown batch option(s): {', '.join(sorted(unknown))}")
    opts = BatchOptions(**options)
    if gen:
        opts.generation = replace(opts.generation, **gen)
    return opts


@dataclass
class Result:
    """What happened to one image. `status`: "done" (caption), "failed" (error) or "skipped" (sidecar existed)."""

    path: str
    status: str
    caption: str | None = None
    error: str | None = None
    score: float | None = None
    prompt: str | None = None
    sidecar: str | None = None


@dataclass
class Summary:
    total: int = 0
    done: int = 0
    failed: int = 0
    skipped: int = 0  # a sidecar existed and --existing skip
    not_images: int = 0  # scanned files with no image content and no image extension: counted, not listed
    resumed: int = 0  # captioned by an earlier run of the same command (its failures are in `failed`)
    seconds: float = 0.0  # the whole run, model loading included
    caption_seconds: float = 0.0  # from the first image decoded to the last caption recorded
    outputs: list[str] = field(default_factory=list)
    errors_file: str | None = None

    @property
    def images_per_s(self) -> float:
        """Captioning throughput: model loading is a one-off cost, not a rate."""
        spent = self.caption_seconds or self.seconds
        return self.done / spent if spent > 0 else 0.0

    def line(self) -> str:
        not_images = f", {self.not_images} not image files" if self.not_images else ""
        rule = " (not image files: no image content and no image extension; counted, not listed)" if not_images else ""
        return (
            f"{self.done} captioned, {self.resumed} captioned before, {self.skipped} skipped, {self.failed} failed"
            f"{not_images} of {self.total} files in {self.seconds:.1f}s ({self.images_per_s:.2f} images/s while "
            f"captioning){rule}"
        )


def default_batch_size(device: torch.device) -> int:
    """A GPU wants large batches; on a CPU larger batches only pad more, so keep them small."""
    return {"cuda": 32, "mps": 16}.get(device.type, 8)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def generate_batch(m: Blip2, pixels: torch.Tensor, prompts: Sequence[str], opts: GenerationOptions) -> list[Generation]:
    """`Blip2.generate` from preprocessed pixels (B, 3, S, S): same prefix, prompts, padding, seed and options."""
    return m.generate_pixels(pixels, prompts, opts)
