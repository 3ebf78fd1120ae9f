"""The miniature BLIP-2: built end to end on the shapes world in minutes on a laptop CPU, then evaluated.

    python -m blip2.train.miniature build --work build/miniature --export examples/miniature   (make miniature)
    python -m blip2.train.miniature demo examples/miniature                                     (make demo)
    python -m blip2.train.miniature tower --first examples/miniature     (blip2 miniature tower: a CLIP tower)

`build` renders the data, pretrains the two frozen towers (a tiny EVA ViT on attribute labels, a tiny OPT on the
texts), then runs the library's own `train()` for stage 1 (ITC + ITM + ITG) and stage 2 (twice: from the stage-1
Q-Former, and from a fresh one, the "without stage 1" baseline), and evaluates on held-out images: caption
attribute accuracy, VQA accuracy, and retrieval R@1 (ITC, then ITM re-ranking) against chance. Each phase leaves
its result in `--work` and is skipped when run again. `--export` copies the models (HF layout), sample images and
`results.json` to a folder small enough to commit. `tower` builds it again on a second, different image tower (a
`transformers` CLIP tower) with the first model's data, LM and recipe, and reports both towers' figures.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import numpy as np
import torch

from ..config import VisionConfig
from ..defaults import MINIATURE_EXPORT, MINIATURE_WORK
from ..durable import atomic_write
from ..scoring import itc_similarity, itm_logits, match_logit, rerank_rows
from .shapes import (
    ATTRIBUTES,
    HELD_OUT,
    QUESTIONS,
    Scene,
    all_scenes,
    read_split,
    records,
    write_split,
    yes_no_question,
)

VISION = VisionConfig(
    hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8
)
QFORMER = {
    "hidden_size": 96,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 192,
    "max_position_embeddings": 32,
}


@dataclass
class Recipe:
    train_images: int = 4000
    test_images: int = 300  # new renders of the colour-shape pairs seen in training
    novel_images: int = 300  # renders of the held-out pairs, never in any training text
    vision_steps: int = 1000
    lm_steps: int = 1200
    stage1_steps: int = 1000
    stage2_steps: int = 1200
    short_stage2_steps: int = 300  # stage 2 again, shorter, from and without stage 1: which learns faster
    batch_size: int = 32
    lr: float = 1e-3  # tiny models from scratch take a larger step than BLIP-2's 1e-4
    threads: int = 1
    seed: int = 0


def _log(msg: str) -> None:
    print(msg, flush=True)


# ---- phases -------------------------------------------------------------------------------------------------------
def make_data(work: Path, r: Recipe) -> None:
    data = work / "data"
    if (data / "stage2.jsonl").is_file():
        return
    train = write_split(data, "train", all_scenes(held_out=False), r.train_images, r.seed)
    write_split(data, "test", all_scenes(held_out=False), r.test_images, r.seed + 1)
    write_split(data, "novel", all_scenes(held_out=True), r.novel_images, r.seed + 2)
    rng = random.Random(r.seed)
    captions = [{"image": p, "caption": s.caption(t)} for p, s in train for t in (0, 1)]
    stage2 = [rec for p, s in train for rec in records(s, p, rng)]
    (data / "stage1.jsonl").write_text("".join(json.dumps(x) + "\n" for x in captions))
    (data / "stage2.jsonl").write_text("".join(json.dumps(x) + "\n" for x in stage2))


def make_towers(work: Path, r: Recipe) -> dict:
    from transformers import AutoTokenizer

    from .models import save_vision
    from .shapes import make_lm_tokenizer, make_qformer_tokenizer, pretrain_lm, pretrain_vision, vision_accuracy

    info_path = work / "towers.json"
    if info_path.is_file():
        return json.loads(info_path.read_text())
    make_qformer_tokenizer(work / "qformer_tokenizer")
    t0 = time.perf_counter()
    _log(f"pretraining the image encoder ({r.vision_steps} steps)")
    vit, heads = pretrain_vision(VISION, r.vision_steps, seed=r.seed)
    save_vision(vit, work / "vision")
    info = {
        "vision_seconds": round(time.perf_counter() - t0),
        "vision_accuracy_seen_pairs": vision_accuracy(vit, heads, all_scenes(held_out=False), 512, r.seed + 10),
        "vision_accuracy_held_out_pairs": vision_accuracy(vit, heads, all_scenes(held_out=True), 512, r.seed + 11),
    }
    t0 = time.perf_counter()
    _log(f"pretraining the language model on text ({r.lm_steps} steps)")
    make_lm_tokenizer(work / "lm")
    pretrain_lm(AutoTokenizer.from_pretrained(work / "lm"), work / "lm", r.lm_steps, seed=r.seed)
    info["lm_seconds"] = round(time.perf_counter() - t0)
    atomic_write(info_path, json.dumps(info, indent=2) + "\n")  # the phase's done mark: whole or absent
    return info


def _common(r: Recipe, out: Path, data: Path, steps: int, max_text_length: int) -> dict:
    return {
        "out": str(out),
        "data": [{"kind": "jsonl", "path": str(data)}],
        "steps": steps,
        "batch_size": r.batch_size,
        "lr": r.lr,
        "min_lr": r.lr / 10,
        "warmup_steps": min(100, steps // 10),
        "warmup_lr": r.lr / 100,
        "augment": False,  # a crop or a flip would change "top left" into something else
        "max_text_length": max_text_length,
        "threads": r.threads,
        "seed": r.seed,
        "save_every": 400,
        "log_every": 50,
    }


def run_stages(work: Path, r: Recipe, only: Sequence[str] | None = None) -> dict[str, float]:
    """Stage 1 and the stage-2 runs (`only` those named, if given) on the towers in `work`."""
    from .trainer import train

    seconds = {}
    phases = [
        (
            "stage1",
            {
                "stage": 1,
                "vision": str(work / "vision"),
                "tokenizer": str(work / "qformer_tokenizer"),
                "qformer": QFORMER,
                "num_query_tokens": 8,
                "embed_dim": 64,
                **_common(r, work / "stage1", work / "data" / "stage1.jsonl", r.stage1_steps, 16),
            },
        ),
        ("stage2", {"stage": 2, **_common(r, work / "stage2", work / "data" / "stage2.jsonl", r.stage2_steps, 40)}),
        (
            "stage2_without_stage1",
            {
                "stage": 2,
                "fresh_qformer": True,
                **_common(r, work / "stage2_without_stage1", work / "data" / "stage2.jsonl", r.stage2_steps, 40),
            },
        ),
    ]
    for name, steps in (("stage2_short", r.short_stage2_steps), ("stage2_without_stage1_short", r.short_stage2_steps)):
        long = dict(phases[1][1] if name == "stage2_short" else phases[2][1])
        phases.append((name, {**long, "out": str(work / name), "steps": steps, "warmup_steps": min(100, steps // 10)}))
    for name, cfg in phases:
        if (only is not None and name not in only) or (work / name / "model" / "config.json").is_file():
            continue
        if cfg["stage"] == 2:
            cfg.update(stage1=str(work / "stage1" / "model"), language_model=str(work / "lm"))
        _log(f"{name} ({cfg['steps']} steps)")
        t0 = time.perf_counter()
        train(cfg)
        seconds[name] = round(time.perf_counter() - t0)
    return seconds


# ---- evaluation ---------------------------------------------------------------------------------------------------
def parse_caption(text: str) -> dict[str, str | None]:
    """The attributes a generated caption names (the first of each kind), None where it names none."""
    words = text.lower().replace(",", " ").split()
    return {attr: next((w for w in words if w in values), None) for attr, values in ATTRIBUTES.items()}


def eval_captions(m, items: Sequence[tuple[str, Scene]]) -> dict:
    gens = m.generate([p for p, _ in items], [""] * len(items), batch_size=64, max_new_tokens=16)
    right = [{a: parse_caption(g.text)[a] == getattr(s, a) for a in ATTRIBUTES} for g, (_, s) in zip(gens, items)]
    out = {f"{a}_accuracy": float(np.mean([r[a] for r in right])) for a in ATTRIBUTES}
    out["all_four_correct"] = float(np.mean([all(r.values()) for r in right]))
    out["examples"] = [{"truth": s.caption(), "generated": g.text} for g, (_, s) in list(zip(gens, items))[:4]]
    return out


def vqa_set(items: Sequence[tuple[str, Scene]], seed: int) -> list[tuple[str, str, str, str]]:
    """(image, kind, question, answer): the four attribute questions and one yes/no question per image."""
    rng = random.Random(seed)
    out = []
    for path, s in items:
        out += [(path, a, q, s.answer(a)) for a, q in QUESTIONS.items()]
        out.append((path, "yes/no", *yes_no_question(s, rng, held_out_ok=True)))
    return out


def eval_vqa(m, items: Sequence[tuple[str, Scene]], seed: int) -> dict:
    from ..processing import vqa_prompt

    qs = vqa_set(items, seed)
    gens = m.generate([p for p, *_ in qs], [vqa_prompt(q) for _, _, q, _ in qs], batch_size=64, max_new_tokens=6)
    right = [g.text.strip().lower() == a for g, (_, _, _, a) in zip(gens, qs)]
    out = {"accuracy": float(np.mean(right))}
    for kind in [*QUESTIONS, "yes/no"]:
        out[kind] = float(np.mean([ok for ok, q in zip(right, qs) if q[1] == kind]))
    return out


@torch.no_grad()
def eval_retrieval(m, items: Sequence[tuple[str, Scene]], k: int = 8) -> dict:
    """R@1 both ways over all 192 canonical captions, by ITC similarity and after ITM re-ranking of the top k."""
    gallery = all_scenes()
    texts = [s.caption() for s in gallery]
    truth = torch.tensor([gallery.index(s) for _, s in items])  # (N,) caption index of each image
    pixels = m.pixel_values([p for p, _ in items])
    image_embeds = m.model.encode_image(pixels)  # (N, Ntok, Dv)
    img = m.model.image_embeddings(image_embeds)  # (N, Nq, E)
    ids, mask = m.text_ids(texts)
    txt = m.model.text_embeddings(ids, mask)  # (T, E)
    sim = itc_similarity(img, txt)  # (N, T)

    def itm(i: np.ndarray, t: np.ndarray) -> np.ndarray:
        i, t = torch.as_tensor(i), torch.as_tensor(t)
        return match_logit(itm_logits(m.model, image_embeds[i], ids[t], mask[t])).cpu().numpy()

    def rerank(scores: torch.Tensor, row_ids: torch.Tensor, rows_are_images: bool) -> torch.Tensor:
        """The best of each row's top k by ITM logit + ITC similarity (LAVIS' re-ranking score)."""
        ids_of = row_ids.numpy()  # image or caption index of each row

        def row_itm(r: int, cand: np.ndarray) -> np.ndarray:
            rows = np.full(len(cand), ids_of[r])
            return itm(rows, cand) if rows_are_images else itm(cand, rows)

        return torch.from_numpy(rerank_rows(scores.float().cpu().numpy(), k, row_itm).argmax(1))

    i2t_itc = (sim.argmax(1) == truth).float().mean().item()
    i2t_itm = (rerank(sim, torch.arange(len(items)), True) == truth).float().mean().item()
    present = sorted(set(truth.tolist()))  # captions with at least one image in this split
    t2i = sim.T[present]  # (T', N)
    same = truth[None, :] == torch.tensor(present)[:, None]  # (T', N): image matches the caption
    t2i_itc = same.gather(1, t2i.argmax(1, keepdim=True)).float().mean().item()
    t2i_itm = same.gather(1, rerank(t2i, torch.tensor(present), False)[:, None]).float().mean().item()
    return {
        "image_to_text_R@1_itc": i2t_itc,
        "image_to_text_R@1_itm_rerank": i2t_itm,
        "image_to_text_chance": 1 / len(texts),
        "text_to_image_R@1_itc": t2i_itc,
        "text_to_image_R@1_itm_rerank": t2i_itm,
        "text_to_image_chance": same.float().mean(dim=1).mean().item(),
    }


STAGE2_RUNS = ("stage2", "stage2_without_stage1", "stage2_short", "stage2_without_stage1_short")


def evaluate(work: Path, r: Recipe, runs: Sequence[str] = STAGE2_RUNS) -> dict:
    """Retrieval by the stage-1 model, captions and VQA by each stage-2 run, on the test and held-out splits."""
    import blip2

    data = work / "data"
    splits = {name: [(str(data / p), s) for p, s in read_split(data, name)] for name in ("test", "novel")}
    out: dict = {}
    retrieval = blip2.load(work / "stage1" / "model", device="cpu", dtype="fp32")
    out["retrieval"] = {name: eval_retrieval(retrieval, items) for name, items in splits.items()}
    for model_name in runs:
        m = blip2.load(work / model_name / "model", device="cpu", dtype="fp32")
        out[model_name] = {
            name: {"caption": eval_captions(m, items), "vqa": eval_vqa(m, items, r.seed)}
            for name, items in splits.items()
        }
    return out


# ---- a second, different image tower ------------------------------------------------------------------------------
CLIP_TOWER = {  # a `transformers` CLIP vision tower of the first tower's size (backbones.py)
    "model_type": "clip_vision_model",
    "hidden_size": 96,
    "intermediate_size": 192,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
}
FIGURES = ("retrieval", "stage2")  # the results a tower is compared on: stage-1 retrieval, stage-2 captions and VQA


def _first_lm(first: Path, folder: Path) -> None:
    """The frozen LM (and its tokenizer) of the exported miniature model, as a folder stage 2 reads."""
    from transformers import AutoTokenizer

    from .models import load_stage2

    if (folder / "config.json").is_file():
        return
    model = first / "model"
    if not (model / "config.json").is_file():
        raise click.ClickException(f"{first} holds no miniature model (no model/config.json): export one first")
    load_stage2(model).blip.language_model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(model).save_pretrained(folder)


def second_tower(first: Path, work: Path, r: Recipe, tower: dict | None = None) -> dict:
    """The miniature built again on a second, different image tower (default: a `transformers` CLIP tower), beside
    the first (EVA) one exported in `first`: the tower is pretrained on the attribute labels as the first was, then
    stage 1 and stage 2 run with the same data, the same frozen LM (the first model's) and the same recipe, and both
    are compared on the same new and held-out images. Results in `work/results.json`."""
    from ..backbones import load_tower, save_tower
    from .shapes import make_qformer_tokenizer, pretrain_encoder, vision_accuracy

    tower = dict(tower or CLIP_TOWER)
    first_results = json.loads((first / "results.json").read_text()) if (first / "results.json").is_file() else None
    if first_results is None or not set(FIGURES) <= set(first_results):
        raise click.ClickException(f"{first} holds no miniature results.json with {FIGURES}: export a build first")
    _claim(work, r)
    t0 = time.perf_counter()
    make_data(work, r)
    _first_lm(first, work / "lm")
    info_path = work / "tower.json"
    if not info_path.is_file():
        make_qformer_tokenizer(work / "qformer_tokenizer")
        _log(f"pretraining the {tower['model_type']} tower ({r.vision_steps} steps)")
        t1 = time.perf_counter()
        torch.manual_seed(r.seed)
        encoder = load_tower(tower)
        encoder, heads = pretrain_encoder(encoder, encoder.config.hidden_size, r.vision_steps, seed=r.seed)
        save_tower(encoder, work / "vision")
        info = {
            "vision_seconds": round(time.perf_counter() - t1),
            "vision_accuracy_seen_pairs": vision_accuracy(encoder, heads, all_scenes(held_out=False), 512, r.seed + 10),
            "vision_accuracy_held_out_pairs": vision_accuracy(
                encoder, heads, all_scenes(held_out=True), 512, r.seed + 11
            ),
        }
        atomic_write(info_path, json.dumps(info, indent=2) + "\n")
    seconds = run_stages(work, r, only=("stage1", "stage2"))
    _log("evaluating on held-out images")
    second = {"vision_config": tower, "towers": json.loads(info_path.read_text()), **evaluate(work, r, ("stage2",))}
    first_config = json.loads((first / "model" / "config.json").read_text())["vision_config"]
    out = {
        "recipe": asdict(r),
        "first_recipe": first_results.get("recipe"),
        "towers": {
            "eva": {"vision_config": first_config, "towers": first_results.get("towers")}
            | {k: first_results[k] for k in FIGURES},
            tower["model_type"]: second,
        },
        "seconds_this_run": {**seconds, "total": round(time.perf_counter() - t0)},
    }
    atomic_write(work / "results.json", json.dumps(out, indent=2) + "\n")
    return out


# ---- fine-tuning on one held-out pair -----------------------------------------------------------------------------
@dataclass
class FinetuneRecipe:
    """Teach a trained miniature one colour-shape pair it never saw, with LoRA on its LM (`lora:`), the way a user
    fine-tunes BLIP-2 on their own captions. The pair's captions are mixed with as many of the seen pairs (replay),
    so that the model learns the new pair without forgetting the others."""

    pair: tuple[str, str] = ("red", "triangle")
    pair_images: int = 300  # training renders of the pair (two caption templates each)
    replay_images: int = 300  # training renders of seen pairs
    test_images: int = 200  # new renders of the pair, and as many of seen pairs, to evaluate on
    steps: int = 200
    batch_size: int = 32
    lr: float = 1e-3
    threads: int = 1
    seed: int = 7


def finetune_pair(model: Path, work: Path, f: FinetuneRecipe) -> dict:
    """Caption accuracy on the pair and on seen pairs, before and after fine-tuning `model` (results in `work`)."""
    import blip2

    from .trainer import train

    data = work / "data"
    pair = [s for s in all_scenes(held_out=True) if (s.colour, s.shape) == tuple(f.pair)]
    if not pair:
        raise click.BadParameter(f"{f.pair} is not a held-out pair: {sorted(HELD_OUT)}", param_hint="--pair")
    seen = all_scenes(held_out=False)
    train_rows = write_split(data, "pair_train", pair, f.pair_images, f.seed)
    train_rows += write_split(data, "replay_train", seen, f.replay_images, f.seed + 1)
    tests = {
        "pair": write_split(data, "pair_test", pair, f.test_images, f.seed + 2),
        "seen_pairs": write_split(data, "seen_test", seen, f.test_images, f.seed + 3),
    }
    captions = [{"image": p, "caption": s.caption(t)} for p, s in train_rows for t in (0, 1)]
    (data / "finetune.jsonl").write_text("".join(json.dumps(x) + "\n" for x in captions))

    def scores(folder: Path) -> dict:
        m = blip2.load(folder, device="cpu", dtype="fp32")
        return {name: eval_captions(m, [(str(data / p), s) for p, s in rows]) for name, rows in tests.items()}

    before = scores(model)
    run = Recipe(batch_size=f.batch_size, lr=f.lr, threads=f.threads, seed=f.seed)
    common = _common(run, work / "run", data / "finetune.jsonl", f.steps, 40)
    cfg = {"stage": 2, "init": str(model), "lora": {}, **common}
    t0 = time.perf_counter()
    result = train(cfg)
    seconds = round(time.perf_counter() - t0)
    after = scores(result.model)
    out = {"recipe": asdict(f), "model": str(model), "train_seconds": seconds, "before": before, "after": after}
    atomic_write(work / "finetune.json", json.dumps(out, indent=2) + "\n")
    return out


# ---- export and demo ----------------------------------------------------------------------------------------------
SAMPLES = 16  # images per split in the exported sample set: the first ones, not chosen by result
SHOWN = 3  # of which the demo prints this many per split in full


def export_to(work: Path, dest: Path, results: dict) -> None:
    from PIL import Image

    for name in ("model", "stage1", "images"):
        shutil.rmtree(dest / name, ignore_errors=True)
    shutil.copytree(work / "stage2" / "model", dest / "model")
    shutil.copytree(work / "stage1" / "model", dest / "stage1")
    (dest / "images").mkdir(parents=True, exist_ok=True)
    truth = []
    for split in ("test", "novel"):
        for i, (path, scene) in enumerate(read_split(work / "data", split)[:SAMPLES]):
            name = f"{split}_{i}.png"
            Image.open(work / "data" / path).save(dest / "images" / name)
            truth.append({"image": name, "split": split, **asdict(scene)})
    (dest / "images" / "truth.json").write_text(json.dumps(truth, indent=2) + "\n")
    (dest / "results.json").write_text(json.dumps(results, indent=2) + "\n")


def demo(folder: Path, echo=print) -> list[dict]:
    """Caption the sample images, ask about them and chat; print a few in full and the score on all of them."""
    import blip2

    m = blip2.load(folder / "model", device="cpu", dtype="fp32")
    truth = json.loads((folder / "images" / "truth.json").read_text())
    rows = []
    for t in truth:
        scene = Scene(t["colour"], t["shape"], t["size"], t["position"])
        image = str(folder / "images" / t["image"])
        caption = m.caption(image)
        answers = {a: m.ask(image, q) for a, q in QUESTIONS.items()}
        chat = m.chat(image)
        turns = [(q, chat.ask(q)) for q in (QUESTIONS["shape"], QUESTIONS["colour"])]
        row = {"image": t["image"], "split": t["split"], "truth": asdict(scene), "caption": caption}
        row |= {"answers": answers, "chat": turns}
        row["caption_right"] = all(v == getattr(scene, a) for a, v in parse_caption(caption).items())
        row["answers_right"] = {a: answers[a] == scene.answer(a) for a in QUESTIONS}
        rows.append(row)
        if sum(r["split"] == t["split"] for r in rows) > SHOWN:
            continue
        kind = "held-out colour-shape pair" if t["split"] == "novel" else "colour-shape pair seen in training"
        echo(f"{t['image']} ({kind}; truth: {scene.caption()})")
        echo(f"  caption: {caption}")
        for a, q in QUESTIONS.items():
            echo(f"  {q} {answers[a]} {'ok' if row['answers_right'][a] else 'WRONG, ' + scene.answer(a)}")
        echo("  chat: " + " / ".join(f"{q} {a}" for q, a in turns))
    for split, kind in (("test", "new images of seen pairs"), ("novel", "images of held-out pairs")):
        mine = [r for r in rows if r["split"] == split]
        caps = sum(r["caption_right"] for r in mine)
        answers = [ok for r in mine for ok in r["answers_right"].values()]
        echo(f"{kind}: {caps}/{len(mine)} captions fully right, {sum(answers)}/{len(answers)} answers right")
    return rows


def _claim(work: Path, r: Recipe) -> None:
    """Make `work` the folder of a run of recipe `r`: finished phases in it are reused when run again."""
    work.mkdir(parents=True, exist_ok=True)
    recipe_file = work / "recipe.json"
    if recipe_file.is_file() and json.loads(recipe_file.read_text()) != asdict(r):
        raise click.ClickException(f"{work} holds a build with another recipe; remove it or use another --work")
    recipe_file.write_text(json.dumps(asdict(r), indent=2) + "\n")


@click.group()
def cli() -> None:
    """The miniature BLIP-2 on the shapes world."""


@cli.command()
@click.option("--work", default=MINIATURE_WORK, show_default=True, type=click.Path(file_okay=False))
@click.option("--export", "export_dir", default=None, type=click.Path(file_okay=False))
@click.option("--quick", is_flag=True, help="A few steps of everything: checks the pipeline, learns nothing.")
def build(work: str, export_dir: str | None, quick: bool) -> None:
    """Render the data, train all parts, evaluate; optionally export the result."""
    r = Recipe()
    if quick:
        r = Recipe(
            train_images=64,
            test_images=16,
            novel_images=16,
            vision_steps=5,
            lm_steps=5,
            stage1_steps=4,
            stage2_steps=4,
            short_stage2_steps=2,
            batch_size=8,
        )
    torch.set_num_threads(r.threads)
    work_dir = Path(work)
    _claim(work_dir, r)
    t0 = time.perf_counter()
    make_data(work_dir, r)
    towers = make_towers(work_dir, r)
    seconds = run_stages(work_dir, r)
    _log("evaluating on held-out images")
    results = {
        "recipe": asdict(r),
        "held_out_pairs": sorted(" ".join(p) for p in HELD_OUT),
        "towers": towers,
        **evaluate(work_dir, r),
        "seconds_this_run": {**seconds, "total": round(time.perf_counter() - t0)},
    }
    (work_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    _log(json.dumps({k: results[k] for k in ("retrieval", *STAGE2_RUNS)}, indent=1))
    if export_dir:
        export_to(work_dir, Path(export_dir), results)
        _log(f"exported to {export_dir}")


@cli.command("finetune")
@click.option("--model", default=f"{MINIATURE_EXPORT}/model", show_default=True, type=click.Path(file_okay=False))
@click.option("--work", default=f"{MINIATURE_WORK}-finetune", show_default=True, type=click.Path(file_okay=False))
@click.option("--pair", nargs=2, default=("red", "triangle"), show_default=True, help="COLOUR SHAPE, a held-out pair.")
@click.option("--steps", type=click.IntRange(min=1), default=FinetuneRecipe.steps, show_default=True)
def finetune_command(model: str, work: str, pair: tuple[str, str], steps: int) -> None:
    """Fine-tune a miniature model with LoRA on captions of one held-out pair; caption scores before and after."""
    f = FinetuneRecipe(pair=tuple(pair), steps=steps)
    torch.set_num_threads(f.threads)
    work_dir = Path(work)
    if (work_dir / "run").exists():
        raise click.ClickException(f"{work_dir} holds a fine-tuning run already; remove it or use another --work")
    out = finetune_pair(Path(model), work_dir, f)
    for when in ("before", "after"):
        parts = [f"{name} {out[when][name]['all_four_correct']:.1%}" for name in ("pair", "seen_pairs")]
        _log(f"{when}: captions with all four attributes right: " + ", ".join(parts))
    _log(f"results in {work_dir / 'finetune.json'}")


@cli.command("tower")
@click.option("--first", default=MINIATURE_EXPORT, show_default=True, type=click.Path(file_okay=False))
@click.option("--work", default=f"{MINIATURE_WORK}-tower", show_default=True, type=click.Path(file_okay=False))
def tower_command(first: str, work: str) -> None:
    """Build the miniature again on a CLIP tower; its held-out figures beside the first (EVA) model's."""
    r = Recipe()
    torch.set_num_threads(r.threads)
    out = second_tower(Path(first), Path(work), r)
    for name, t in out["towers"].items():
        novel, seen = t["stage2"]["novel"], t["stage2"]["test"]
        _log(
            f"{name}: captions all four right {seen['caption']['all_four_correct']:.1%} seen / "
            f"{novel['caption']['all_four_correct']:.1%} held-out pairs; VQA {seen['vqa']['accuracy']:.1%} / "
            f"{novel['vqa']['accuracy']:.1%}; R@1 image->text (ITC) "
            f"{t['retrieval']['test']['image_to_text_R@1_itc']:.1%} / "
            f"{t['retrieval']['novel']['image_to_text_R@1_itc']:.1%}"
        )
    _log(f"results in {Path(work) / 'results.json'}")


@cli.command("demo")
@click.argument("folder", default=MINIATURE_EXPORT, type=click.Path(exists=True, file_okay=False))
def demo_command(folder: str) -> None:
    """Caption, question and chat with the exported miniature model, offline."""
    demo(Path(folder), echo=click.echo)


if __name__ == "__main__":
    cli()
