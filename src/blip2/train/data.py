"""Training data: manifests, augmentation, text batches, and a deterministic, resumable stream of batches.

Sources (each gives `Example`s):
    JSONL manifest   one object a line: {"image", "caption"} or {"image", "question", "answer"} (optionally
                     "history": [[q, a], ...] for chat turns); relative image paths are under `images` (default: the
                     manifest's folder)
    COCO captions    {"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}, or LAVIS' list of
                     {"image", "caption"}
    WebDataset       tar shards of `<key>.jpg|png|jpeg|webp` + `<key>.txt` (caption) or `<key>.json` (as JSONL)

The order of the data is a pure function of (seed, position): epoch e of a list source is a seeded permutation, and
sample g gets its own augmentation RNG seeded by (seed, g). Process `rank` of `world` takes its share of every
global batch. So a run resumed at micro-batch b sees exactly what an uninterrupted run sees, with any number of
DataLoader workers (worker w of W builds the batches b with b % W == w; the DataLoader takes them in turn).
"""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from ..errors import ConfigError
from ..processing import ImageTransform, chat_prompt, load_image, vqa_prompt
from .losses import IGNORE, causal_lm_labels

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class Example:
    image: str | bytes | Image.Image  # a path, encoded bytes (WebDataset) or a decoded image
    text: str  # what is learned: the caption, or the answer
    prompt: str = ""  # "" for a caption; the VQA / chat prompt for an answer


def example_from_record(rec: dict[str, Any], image: str | bytes | Image.Image, where: str) -> Example:
    """{"caption"} -> a caption; {"question", "answer"[, "history"]} -> an answer after the VQA or chat prompt."""
    if "caption" in rec:
        return Example(image=image, text=str(rec["caption"]).strip())
    if "question" in rec and "answer" in rec:
        history = [(str(q), str(a)) for q, a in rec.get("history") or []]
        prompt = chat_prompt(history, str(rec["question"]), lambda s: 0, 1) if history else vqa_prompt(rec["question"])
        return Example(image=image, text=str(rec["answer"]).strip(), prompt=prompt)
    raise ConfigError(f"{where}: a record needs 'caption', or 'question' and 'answer'; got keys {sorted(rec)}")


def read_jsonl(path: str | Path, images: str | Path | None = None) -> list[Example]:
    path = Path(path)
    root = Path(images) if images is not None else path.parent
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read manifest ({e})") from e
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{n}: not JSON ({e})") from e
        if "image" not in rec:
            raise ConfigError(f"{path}:{n}: record has no 'image'")
        out.append(example_from_record(rec, str(root / rec["image"]), f"{path}:{n}"))
    return out


def read_coco(path: str | Path, images: str | Path) -> list[Example]:
    """COCO `captions_*.json`, or LAVIS' `coco_karpathy_train.json` list of {"image", "caption"}."""
    path, root = Path(path), Path(images)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read COCO annotations ({e})") from e
    if isinstance(raw, list):
        return [Example(image=str(root / r["image"]), text=str(r["caption"]).strip()) for r in raw]
    try:
        files = {im["id"]: im["file_name"] for im in raw["images"]}
        return [Example(image=str(root / files[a["image_id"]]), text=a["caption"].strip()) for a in raw["annotations"]]
    except (KeyError, TypeError) as e:
        raise ConfigError(f"{path}: not COCO captions (images/annotations with ids): missing {e}") from e


class WebDatasetSource:
    """Examples from WebDataset shards, read in order (shuffle the shards when writing them)."""

    def __init__(self, urls: str | Sequence[str], captions_only: bool = False) -> None:
        self.urls = urls
        self.captions_only = captions_only  # stage 1 learns captions; VQA records are skipped

    def __iter__(self) -> Iterator[Example]:
        import webdataset as wds

        # our own Batches stream splits the samples between processes and workers, deterministically
        stream = wds.WebDataset(self.urls, shardshuffle=False, nodesplitter=None, workersplitter=None)
        for sample in stream:
            key = sample.get("__key__", "?")
            image = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
            if image is None:
                raise ConfigError(f"{self.urls}: sample {key} has no image ({', '.join(IMAGE_EXTENSIONS)})")
            if "json" in sample:
                rec = json.loads(sample["json"])
            elif "txt" in sample:
                rec = {"caption": sample["txt"].decode("utf-8")}
            else:
                raise ConfigError(f"{self.urls}: sample {key} has neither .txt nor .json text")
            ex = example_from_record(rec, image, f"{self.urls}:{key}")
            if not (self.captions_only and ex.prompt):
                yield ex


def read_source(kind: str, path: str | Sequence[str], images: str | None = None) -> list[Example] | WebDatasetSource:
    if kind == "jsonl":
        return read_jsonl(path, images)
    if kind == "coco":
        if images is None:
            raise ConfigError(f"{path}: a COCO source needs 'images', the folder of its image files")
        return read_coco(path, images)
    if kind in ("wds", "webdataset"):
        return WebDatasetSource(path)
    raise ConfigError(f"data kind {kind!r} is not one of jsonl, coco, wds")


# ---- images -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainTransform:
    """RandomResizedCrop (area `scale`, aspect `ratio`, bicubic) + horizontal flip, then the inference transform.

    The crop follows torchvision's `RandomResizedCrop.get_params` (10 tries, then a centre crop). With `augment`
    off, images are preprocessed exactly as at inference. `image`: the image encoder's inference preprocessing
    (its mean/std, its resize and crop); default CLIP's at `size`.
    """

    size: int
    augment: bool = True
    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    image: ImageTransform | None = None

    def crop_box(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of a random crop."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top, left = rng.randint(0, height - h), rng.randint(0, width - w)
                return left, top, left + w, top + h
        in_ratio = width / height  # fallback: the largest centre crop within the ratio bounds
        if in_ratio < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            w, h = round(height * self.ratio[1]), height
        else:
            w, h = width, height
        left, top = (width - w) // 2, (height - h) // 2
        return left, top, left + w, top + h

    def __call__(self, images: Sequence[Image.Image], rngs: Sequence[random.Random]) -> torch.Tensor:
        """RGB PIL images -> (B, 3, size, size) normalised as the inference `ImageTransform`."""
        inference = self.image or ImageTransform(self.size)
        if not self.augment:
            return inference(images)
        out = []
        for img, rng in zip(images, rngs):
            if self.augment:
                box = self.crop_box(img.width, img.height, rng)
                img = img.resize((self.size, self.size), Image.Resampling.BICUBIC, box=box)
                if self.flip and rng.random() < 0.5:
                    img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            out.append(img)
        return replace(inference, size=self.size, shortest_edge=None)(out)  # already size x size: normalise


# ---- text ---------------------------------------------------------------------------------------------------------
def split_prefix(text: str, rng: random.Random) -> tuple[str, str]:
    """The paper's prefix-LM split for seq2seq LMs: a random word boundary; the prefix (possibly empty) is encoded
    with the image, the rest (never empty) is the decoder's target."""
    words = text.split()
    k = rng.randint(0, max(len(words) - 1, 0))
    return " ".join(words[:k]), " ".join(words[k:])


class Stage1Collate:
    """(Example, rng) pairs -> pixel_values, and the captions tokenised for the Q-Former, padded to `max_length`
    (fixed, as LAVIS: every process then gathers texts of one shape for ITM)."""

    def __init__(self, tokenizer, transform: TrainTransform, max_length: int = 32) -> None:
        self.tokenizer, self.transform, self.max_length = tokenizer, transform, max_length

    def __call__(self, items: Sequence[tuple[Example, random.Random]]) -> dict[str, torch.Tensor]:
        pixels = self.transform([load_image(ex.image) for ex, _ in items], [rng for _, rng in items])
        enc = self.tokenizer(
            [ex.text for ex, _ in items],
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {"pixel_values": pixels, "input_ids": enc.input_ids, "attention_mask": enc.attention_mask}


class Stage2Collate:
    """(Example, rng) pairs -> LM inputs and labels.

    Decoder-only (LAVIS' OPT recipe): `prompt + " " + text + end` with BOS, right-padded, truncated to `max_length`;
    labels are the ids with the prompt and the padding masked (`end` is "\\n" when it is one token, as blip2-opt).
    Seq2seq (LAVIS' T5 recipe): the prompt feeds the encoder and the text is the decoder target; a caption (no
    prompt) is split at a random word boundary when `prefix_lm` is on (the paper's prefix language modelling).
    """

    def __init__(
        self,
        tokenizer,
        transform: TrainTransform,
        encoder_decoder: bool,
        max_length: int = 32,
        prefix_lm: bool = True,
    ) -> None:
        if tokenizer.pad_token is None:  # e.g. LLaMA: padding is masked anyway
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer, self.transform, self.max_length = tokenizer, transform, max_length
        self.encoder_decoder, self.prefix_lm = encoder_decoder, prefix_lm
        newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
        self.end = "\n" if len(newline) == 1 else (tokenizer.eos_token or "")

    def _tok(self, texts: list[str], **kw: Any):
        return self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, padding_side="right", **kw
        )

    def __call__(self, items: Sequence[tuple[Example, random.Random]]) -> dict[str, torch.Tensor]:
        pixels = self.transform([load_image(ex.image) for ex, _ in items], [rng for _, rng in items])
        batch: dict[str, torch.Tensor] = {"pixel_values": pixels}
        if self.encoder_decoder:
            pairs = [
                split_prefix(ex.text, rng) if self.prefix_lm and not ex.prompt else (ex.prompt, ex.text)
                for ex, rng in items
            ]
            enc = self._tok([p for p, _ in pairs], return_tensors="pt")
            dec = self._tok([t for _, t in pairs], return_tensors="pt")
            batch.update(
                input_ids=enc.input_ids,
                attention_mask=enc.attention_mask,
                labels=dec.input_ids.masked_fill(dec.attention_mask == 0, IGNORE),
                decoder_attention_mask=dec.attention_mask,
            )
            return batch
        texts = [(ex.prompt + " " if ex.prompt else "") + ex.text + self.end for ex, _ in items]
        prompt_lengths = [len(self.tokenizer(ex.prompt).input_ids) if ex.prompt else 0 for ex, _ in items]
        enc = self._tok(texts, return_tensors="pt")
        labels = causal_lm_labels(enc.input_ids, enc.attention_mask, prompt_lengths)
        batch.update(input_ids=enc.input_ids, attention_mask=enc.attention_mask, labels=labels)
        return batch


# ---- the stream of batches ----------------------------------------------------------------------------------------
class Batches(IterableDataset):
    """An endless, deterministic stream of this process' collated micro-batches, from micro-batch `start` on.

    Micro-batch b holds global positions `(b * world + rank) * batch_size + j`; position g is sample
    `perm_e[g mod N]` of epoch `e = g // N` (list sources) or the g-th sample of the repeated stream (WebDataset).
    Use with `DataLoader(batches, batch_size=None, num_workers=...)`.
    """

    def __init__(
        self,
        source: Sequence[Example] | WebDatasetSource,
        collate: Callable[[Sequence[tuple[Example, random.Random]]], dict[str, torch.Tensor]],
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        start: int = 0,
        shuffle: bool = True,
    ) -> None:
        if isinstance(source, Sequence) and not source:
            raise ConfigError("the training data is empty")
        self.source, self.collate = source, collate
        self.batch_size, self.seed, self.rank, self.world, self.start = batch_size, seed, rank, world, start
        self.shuffle = shuffle

    def _rng(self, g: int) -> random.Random:
        return random.Random(f"{self.seed}:{g}")  # str seeds hash with sha512: stable across runs and platforms

    def _perm(self, epoch: int) -> list[int]:
        n = len(self.source)
        if not self.shuffle:
            return list(range(n))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(n, generator=gen).tolist()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if isinstance(self.source, Sequence):
            return self._from_list(worker, workers)
        return self._from_stream(worker, workers)

    def _from_list(self, worker: int, workers: int) -> Iterator[dict[str, torch.Tensor]]:
        n, perms = len(self.source), {}
        for b in itertools.count(self.start):
            if b % workers != worker:
                continue
            items = []
            base = (b * self.world + self.rank) * self.batch_size
            for g in range(base, base + self.batch_size):
                epoch, i = divmod(g, n)
                if epoch not in perms:
                    perms = {epoch: self._perm(epoch)}  # one epoch's permutation at a time
                items.append((self.source[perms[epoch][i]], self._rng(g)))
            yield self.collate(items)

    def _from_stream(self, worker: int, workers: int) -> Iterator[dict[str, torch.Tensor]]:
        per_batch = self.batch_size * self.world
        g, pending = 0, []
        while True:  # each pass over the shards is an epoch
            seen = 0
            for ex in self.source:
                seen += 1
                b, slot = divmod(g, per_batch)
                if slot // self.batch_size == self.rank and b >= self.start and b % workers == worker:
                    pending.append((ex, self._rng(g)))  # images are decoded by collate, only for our samples
                    if len(pending) == self.batch_size:
                        yield self.collate(pending)
                        pending = []
                g += 1
            if not seen:
                raise ConfigError(f"{self.source.urls}: the WebDataset shards hold no samples")
