"""The shapes world: one coloured shape of some size at one side of a small noisy image, with captions,
questions and chat turns from templates; and the two frozen towers of the miniature BLIP-2 trained on it.

Some colour-shape pairs (`HELD_OUT`) never occur in any training image or text: a model that captions a red
triangle correctly has composed "red" and "triangle" itself. The image encoder is a tiny EVA ViT trained to
classify the attributes (then frozen); the language model is a tiny OPT trained on the texts alone (then frozen).
Both are this package's / `transformers`' own classes, so the result loads anywhere BLIP-2 loads.
"""

from __future__ import annotations

import itertools
import json
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from ..config import VisionConfig
from ..processing import ImageTransform, chat_prompt, vqa_prompt
from ..vision import VisionTransformer

COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (230, 200, 30),
    "purple": (140, 60, 180),
    "orange": (240, 130, 30),
}
SHAPES = ["circle", "square", "triangle", "cross"]
SIZES = ["small", "large"]
POSITIONS = ["left", "right", "top", "bottom"]  # one word each: the tiny LM copies single words reliably
ATTRIBUTES = {"colour": list(COLOURS), "shape": SHAPES, "size": SIZES, "position": POSITIONS}
HELD_OUT = {("red", "triangle"), ("blue", "circle"), ("green", "cross"), ("yellow", "square")}
IMAGE_SIZE = 32

CAPTION_TEMPLATES = [
    "a {size} {colour} {shape} on the {position} side",
    "there is a {size} {colour} {shape} on the {position} side",
]
QUESTIONS = {
    "colour": "what color is the shape?",
    "shape": "what shape is it?",
    "size": "is the shape small or large?",
    "position": "which side is the shape on?",
}


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    size: str
    position: str

    @property
    def held_out(self) -> bool:
        return (self.colour, self.shape) in HELD_OUT

    def caption(self, template: int = 0) -> str:
        return CAPTION_TEMPLATES[template].format(**asdict(self))

    def answer(self, attribute: str) -> str:
        return getattr(self, attribute)


def all_scenes(held_out: bool | None = None) -> list[Scene]:
    """Every scene; `held_out` True / False keeps only the held-out / the trainable colour-shape pairs."""
    scenes = [Scene(*a) for a in itertools.product(COLOURS, SHAPES, SIZES, POSITIONS)]
    return scenes if held_out is None else [s for s in scenes if s.held_out == held_out]


def render(scene: Scene, rng: random.Random, size: int = IMAGE_SIZE) -> Image.Image:
    """The scene on a light, noisy background; the shape's place and extent jitter around the middle of its side."""
    background = rng.randint(185, 245)
    noise = np.random.default_rng(rng.getrandbits(32)).integers(-12, 13, (size, size, 3))
    img = Image.fromarray(np.clip(background + noise, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    r = (rng.uniform(3.5, 4.5) if scene.size == "small" else rng.uniform(6.0, 7.0)) * size / 32
    x, y = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75)}[scene.position]
    cx = x * size + rng.uniform(-1.5, 1.5) * size / 32
    cy = y * size + rng.uniform(-1.5, 1.5) * size / 32
    colour = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in COLOURS[scene.colour])
    if scene.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif scene.shape == "square":
        s = r * 0.9
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=colour)
    elif scene.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=colour)
    else:  # cross
        w = r * 0.38
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=colour)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=colour)
    return img


# ---- texts --------------------------------------------------------------------------------------------------------
def yes_no_question(scene: Scene, rng: random.Random, held_out_ok: bool) -> tuple[str, str]:
    """'is there a {colour} {shape}?' about the true pair or another one (never a held-out pair in training)."""
    while True:
        colour = scene.colour if rng.random() < 0.5 else rng.choice(list(COLOURS))
        shape = scene.shape if rng.random() < 0.5 else rng.choice(SHAPES)
        if held_out_ok or (colour, shape) not in HELD_OUT:
            answer = "yes" if (colour, shape) == (scene.colour, scene.shape) else "no"
            return f"is there a {colour} {shape}?", answer


def records(scene: Scene, image: str, rng: random.Random) -> list[dict]:
    """The stage-2 records of one training image: a caption, two questions and a two-turn chat."""
    attrs = rng.sample(list(QUESTIONS), 3)
    yes_q, yes_a = yes_no_question(scene, rng, held_out_ok=False)
    qa = [(QUESTIONS[a], scene.answer(a)) for a in attrs] + [(yes_q, yes_a)]
    rng.shuffle(qa)
    return [
        {"image": image, "caption": scene.caption(rng.randrange(len(CAPTION_TEMPLATES)))},
        {"image": image, "question": qa[0][0], "answer": qa[0][1]},
        {"image": image, "question": qa[1][0], "answer": qa[1][1]},
        {"image": image, "question": qa[3][0], "answer": qa[3][1], "history": [list(qa[2])]},
    ]


def document(scene: Scene, rng: random.Random) -> list[str]:
    """Texts about one scene, as stage 2 shows them (captions; prompts followed by answers): a caption first, as
    a description comes before questions about it, then the rest in random order.

    The LM is pretrained on such documents packed into one sequence, so it learns that what a text says about the
    shape agrees with what came before: the in-context reading that lets it read BLIP-2's soft visual prompt later.
    (With the caption anywhere, the tiny LM learned to copy colour, shape and size but never the side, in 1800
    steps; with the description first it copies all four within 900.)
    """
    texts = []
    for rec in records(scene, "", rng) + records(scene, "", rng):
        if "caption" in rec:
            texts.append(rec["caption"])
        else:
            history = [tuple(h) for h in rec.get("history", [])]
            prompt = chat_prompt(history, rec["question"], lambda s: 0, 1) if history else vqa_prompt(rec["question"])
            texts.append(f"{prompt} {rec['answer']}")
    rng.shuffle(texts)
    first = next(i for i, t in enumerate(texts) if not t.startswith("Question:"))
    return [texts[first]] + texts[:first] + texts[first + 1 :]


def tokenizer_corpus() -> list[str]:
    """Every word of the world, held-out pairs included (a tokenizer knows words, not which pairs are seen)."""
    words = [w for values in ATTRIBUTES.values() for v in values for w in v.split()]
    lines = [s.caption(t) for s in all_scenes() for t in range(len(CAPTION_TEMPLATES))]
    lines += [vqa_prompt(q) + " yes no" for q in QUESTIONS.values()] + ["is there a " + " ".join(words) + "?"]
    lines += ["Question: what is it? Answer: a red circle. Question: and? Answer:", "\n"]
    return lines


def _pieces(pre_tokenizer, lines: list[str]) -> list[str]:
    """The sorted set of pre-tokenised pieces of `lines`: a fixed vocabulary (trained BPE / WordPiece vocabularies
    break frequency ties in no fixed order, and a miniature must rebuild identically)."""
    return sorted({piece for line in lines for piece, _ in pre_tokenizer.pre_tokenize_str(line)})


def _vocabulary_lines() -> list[str]:
    rng = random.Random(0)
    return tokenizer_corpus() + [t for s in all_scenes() for t in document(s, rng)]


def make_lm_tokenizer(folder: Path):
    """Byte-level words with OPT's special ids (`<s>` 0, `<pad>` 1, `</s>` 2 as BOS, `<unk>` 3) and `<image>`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + _pieces(byte_level, _vocabulary_lines()))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.add_tokens(["<image>"], special_tokens=True)
    fast.save_pretrained(folder)
    return fast


def make_qformer_tokenizer(folder: Path):
    """Lower-case WordPiece as bert-base-uncased (the world's words, letters to spell others), `[DEC]` as bos."""
    import string

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    bert = pre_tokenizers.BertPreTokenizer()
    letters = list(string.ascii_lowercase) + ["##" + c for c in string.ascii_lowercase]
    words = _pieces(bert, [line.lower() for line in _vocabulary_lines()])
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {t: i for i, t in enumerate(specials + sorted(set(words + letters)))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = bert
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        mask_token="[MASK]",
    )
    fast.add_special_tokens({"bos_token": "[DEC]"})
    fast.save_pretrained(folder)
    return fast


# ---- the frozen towers --------------------------------------------------------------------------------------------
def _log(msg: str) -> None:
    print(msg, flush=True)


def scene_batches(scenes: list[Scene], batch: int, seed: int) -> Iterator[tuple[torch.Tensor, list[Scene]]]:
    rng = random.Random(seed)
    transform = ImageTransform(IMAGE_SIZE)
    while True:
        chosen = [rng.choice(scenes) for _ in range(batch)]
        yield transform([render(s, rng) for s in chosen]), chosen


def _fit(
    params: list[nn.Parameter], loss: Callable[[], torch.Tensor], steps: int, lr: float, decay: float, what: str
) -> None:
    """`steps` AdamW steps on `loss()` (a fresh batch's loss each call) under a one-cycle schedule; logs every 200."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        value = loss()
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps:
            _log(f"  {what} step {step}/{steps} loss {value.item():.3f} ({time.perf_counter() - t0:.0f}s)")


def pretrain_vision(cfg: VisionConfig, steps: int, batch: int = 64, lr: float = 2e-3, seed: int = 0):
    """A tiny EVA ViT trained to name the four attributes (linear heads on the mean token), then frozen.

    It sees every colour-shape pair, as labels and never as text: like a web-scale image encoder, it has seen the
    world; the held-out pairs are held out of everything BLIP-2 itself learns from (stage 1 and 2, and the LM).
    """
    torch.manual_seed(seed)
    vit = VisionTransformer(cfg)
    for m in vit.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
    with torch.no_grad():
        vit.embeddings.position_embedding.normal_(0, 0.02)
    return pretrain_encoder(vit, cfg.hidden_size, steps, batch, lr, seed)


def pretrain_encoder(encoder: nn.Module, width: int, steps: int, batch: int = 64, lr: float = 2e-3, seed: int = 0):
    """Any image encoder (pixels (B, 3, 32, 32) -> features (B, N, width)) trained as `pretrain_vision` trains its
    ViT: linear heads on the mean token name the four attributes; the encoder is returned frozen, with its heads."""
    heads = nn.ModuleDict({k: nn.Linear(width, len(v)) for k, v in ATTRIBUTES.items()})
    data = scene_batches(all_scenes(), batch, seed)

    def loss() -> torch.Tensor:
        pixels, scenes = next(data)
        feats = encoder(pixels).mean(dim=1)  # (B, D)
        return sum(
            F.cross_entropy(heads[k](feats), torch.tensor([v.index(getattr(s, k)) for s in scenes]))
            for k, v in ATTRIBUTES.items()
        )

    _fit(list(encoder.parameters()) + list(heads.parameters()), loss, steps, lr, 0.05, "vision")
    encoder.eval().requires_grad_(False)
    return encoder, heads.eval()


@torch.no_grad()
def vision_accuracy(vit: nn.Module, heads: nn.ModuleDict, scenes: list[Scene], n: int, seed: int) -> dict:
    pixels, chosen = next(scene_batches(scenes, n, seed))
    feats = vit(pixels).mean(dim=1)
    return {
        k: float(np.mean([v[i] == getattr(s, k) for i, s in zip(heads[k](feats).argmax(-1).tolist(), chosen)]))
        for k, v in ATTRIBUTES.items()
    }


def packed_batch(tokenizer, rng: random.Random, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, length) ids and labels: each row a document about one scene, its texts `</s> text \n` packed end to end.

    Texts then start at every position and after other context, as they will after BLIP-2's soft prompt.
    """
    scenes = all_scenes(held_out=False)
    ids = torch.full((batch, length), tokenizer.pad_token_id)
    for row in range(batch):
        seq: list[int] = []
        for text in document(rng.choice(scenes), rng):
            seq += tokenizer(text + "\n").input_ids
        ids[row, : min(length, len(seq))] = torch.tensor(seq[:length])
    labels = ids.masked_fill(ids == tokenizer.pad_token_id, -100)
    return ids, labels


def pretrain_lm(tokenizer, folder: Path, steps: int, batch: int = 32, lr: float = 3e-3, seed: int = 0):
    """A tiny OPT trained on the world's texts (`text + "\n"`, as stage 2 will present them), then saved."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    newline = tokenizer("\n", add_special_tokens=False).input_ids[0]
    cfg = OPTConfig(
        vocab_size=(len(tokenizer) + 7) // 8 * 8,
        hidden_size=128,
        word_embed_proj_dim=128,
        ffn_dim=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=newline,
        dropout=0.0,
    )
    lm = OPTForCausalLM(cfg)
    rng = random.Random(seed)

    def loss() -> torch.Tensor:
        ids, labels = packed_batch(tokenizer, rng, batch, 96)
        return lm(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss

    lm.train()
    _fit(list(lm.parameters()), loss, steps, lr, 0.01, "LM")
    lm.eval()
    lm.generation_config.eos_token_id = newline
    lm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return lm


def write_split(folder: Path, name: str, scenes: list[Scene], n: int, seed: int) -> list[tuple[str, Scene]]:
    """Render `n` images of random `scenes` into folder/name/ and return (relative path, scene) pairs."""
    rng = random.Random(seed)
    (folder / name).mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        scene = rng.choice(scenes)
        rel = f"{name}/{i:05d}.png"
        render(scene, rng).save(folder / rel)
        out.append((rel, scene))
    (folder / f"{name}.json").write_text(json.dumps([{"image": p, **asdict(s)} for p, s in out]) + "\n")
    return out


def read_split(folder: Path, name: str) -> list[tuple[str, Scene]]:
    rows = json.loads((folder / f"{name}.json").read_text())
    return [(r.pop("image"), Scene(**r)) for r in rows]
