"""Manifests, augmentation, text batches and the deterministic stream of batches."""

from __future__ import annotations

import io
import json
import random

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from blip2.errors import ConfigError
from blip2.processing import ImageTransform
from blip2.train.data import (
    Batches,
    Example,
    Stage2Collate,
    TrainTransform,
    WebDatasetSource,
    read_coco,
    read_jsonl,
    split_prefix,
)
from blip2.train.losses import IGNORE


def test_jsonl_manifest_captions_questions_and_chat(tmp_path):
    (tmp_path / "m.jsonl").write_text(
        '{"image": "a.jpg", "caption": " a cat "}\n\n'
        '{"image": "/abs/b.jpg", "question": "what is it?", "answer": "a dog"}\n'
        '{"image": "c.jpg", "question": "what colour?", "answer": "red", "history": [["what is it?", "a car"]]}\n'
    )
    a, b, c = read_jsonl(tmp_path / "m.jsonl")
    assert a == Example(str(tmp_path / "a.jpg"), "a cat", "")
    assert b == Example("/abs/b.jpg", "a dog", "Question: what is it? Answer:")
    assert c.prompt == "Question: what is it? Answer: a car. Question: what colour? Answer:"  # as `Chat` builds it
    (tmp_path / "bad.jsonl").write_text('{"image": "a.jpg"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:1: .*'caption'"):
        read_jsonl(tmp_path / "bad.jsonl")


def test_coco_annotations_both_layouts(tmp_path):
    coco = {"images": [{"id": 7, "file_name": "x.jpg"}], "annotations": [{"image_id": 7, "caption": "A dog."}]}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    assert read_coco(tmp_path / "c.json", tmp_path / "img") == [Example(str(tmp_path / "img" / "x.jpg"), "A dog.")]
    (tmp_path / "l.json").write_text(json.dumps([{"image": "y.jpg", "caption": "two cats"}]))
    assert read_coco(tmp_path / "l.json", "r")[0] == Example("r/y.jpg", "two cats")
    (tmp_path / "e.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ConfigError, match="not COCO"):
        read_coco(tmp_path / "e.json", tmp_path)


def test_webdataset_shards(tmp_path):
    import webdataset as wds

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(buf, format="PNG")
    with wds.TarWriter(str(tmp_path / "s.tar")) as sink:
        sink.write({"__key__": "a", "png": buf.getvalue(), "txt": "a red square"})
        sink.write({"__key__": "b", "png": buf.getvalue(), "json": json.dumps({"question": "q?", "answer": "red"})})
    got = list(WebDatasetSource(str(tmp_path / "s.tar")))
    assert [(e.text, e.prompt) for e in got] == [("a red square", ""), ("red", "Question: q? Answer:")]
    assert isinstance(got[0].image, bytes)
    assert [e.text for e in WebDatasetSource(str(tmp_path / "s.tar"), captions_only=True)] == ["a red square"]


def test_random_resized_crop_bounds_and_determinism():
    t = TrainTransform(16, scale=(0.5, 1.0))
    for seed in range(200):
        left, top, right, bottom = t.crop_box(60, 40, random.Random(seed))
        w, h = right - left, bottom - top
        assert 0 <= left and 0 <= top and right <= 60 and bottom <= 40
        assert 0.5 * 2400 * 0.95 <= w * h <= 2400
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
    img = Image.frombytes("RGB", (60, 40), bytes(range(256)) * 28 + bytes(32))
    a = t([img, img], [random.Random(1), random.Random(2)])
    b = t([img], [random.Random(1)])
    assert a.shape == (2, 3, 16, 16) and torch.equal(a[:1], b) and not torch.equal(a[0], a[1])


def test_no_augmentation_is_the_inference_transform():
    """If this fails, a model trained without augmentation sees other pixels than at inference."""
    img = Image.frombytes("RGB", (30, 20), bytes(range(200)) * 9)
    assert torch.equal(TrainTransform(16, augment=False)([img], [random.Random(0)]), ImageTransform(16)([img]))


def test_flip_mirrors():
    img = Image.new("RGB", (16, 16))
    img.paste((255, 0, 0), (0, 0, 8, 16))
    t = TrainTransform(16, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    flipped = [t([img], [random.Random(s)])[0, 0, 0, 0] for s in range(20)]
    assert len({round(v.item(), 3) for v in flipped}) == 2


def test_stage2_opt_labels_mask_prompt_and_padding(tiny):
    """If this fails, stage 2 learns to predict the prompt or padding (LAVIS masks both)."""
    tok = AutoTokenizer.from_pretrained(tiny.opt)
    collate = Stage2Collate(tok, TrainTransform(32, augment=False), encoder_decoder=False)
    img = str(tiny.images[0])
    items = [(Example(img, "a red cat"), random.Random(0)), (Example(img, "red", "Question: what? Answer:"), None)]
    batch = collate(items)
    ids, labels = batch["input_ids"], batch["labels"]
    nl = tok("\n", add_special_tokens=False).input_ids[0]
    caption = tok("a red cat\n").input_ids
    assert ids[0, : len(caption)].tolist() == caption and caption[0] == tok.bos_token_id and caption[-1] == nl
    assert labels[0, : len(caption)].tolist() == caption  # no prompt: all learned (the BOS is never predicted)
    prompt = tok("Question: what? Answer:").input_ids
    full = tok("Question: what? Answer: red\n").input_ids
    assert ids[1, : len(full)].tolist() == full and full[: len(prompt)] == prompt
    assert labels[1].tolist()[: len(full)] == [IGNORE] * len(prompt) + full[len(prompt) :]
    assert (labels[batch["attention_mask"] == 0] == IGNORE).all()


def test_stage2_t5_prefix_split_and_targets(tiny):
    tok = AutoTokenizer.from_pretrained(tiny.t5)
    collate = Stage2Collate(tok, TrainTransform(32, augment=False), encoder_decoder=True)
    img = str(tiny.images[0])
    batch = collate([(Example(img, "red", "Question: what? Answer:"), random.Random(0))])
    assert tok.decode(batch["input_ids"][0], skip_special_tokens=True) == "Question: what? Answer:"
    assert tok.decode(batch["labels"][0][batch["labels"][0] != IGNORE], skip_special_tokens=True) == "red"
    splits = {split_prefix("a b c d", random.Random(s)) for s in range(50)}
    assert splits == {("", "a b c d"), ("a", "b c d"), ("a b", "c d"), ("a b c", "d")}


def _ids(items):
    return torch.tensor([int(ex.text) for ex, _ in items])


def _stream(n=10, **kw):
    return Batches([Example("x", str(i)) for i in range(n)], _ids, batch_size=3, seed=5, **kw)


def _take(batches, k, workers=0):
    it = iter(DataLoader(batches, batch_size=None, num_workers=workers))
    return [next(it).tolist() for _ in range(k)]


def test_batches_cover_each_epoch_once_in_a_new_order():
    got = [i for b in _take(_stream(), 10) for i in b]  # 30 positions = 3 epochs of 10
    epochs = [got[0:10], got[10:20], got[20:30]]
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert epochs[0] != epochs[1]


def test_batches_two_ranks_make_the_single_process_batch():
    """If this fails, two processes do not see the batch one process of twice the size sees (gathered ITC)."""
    one = Batches([Example("x", str(i)) for i in range(10)], _ids, batch_size=6, seed=5)
    r0, r1 = _take(_stream(rank=0, world=2), 4), _take(_stream(rank=1, world=2), 4)
    assert [a + b for a, b in zip(r0, r1)] == _take(one, 4)


def test_batches_resume_and_workers_give_the_same_stream():
    """If this fails, a resumed run (or one with DataLoader workers) trains on other data than an uninterrupted one."""
    full = _take(_stream(), 8)
    assert _take(_stream(start=5), 3) == full[5:8]
    assert _take(_stream(), 8, workers=2) == full


def test_batches_augmentation_depends_on_position_only():
    seen = []

    def collate(items):
        seen.append([rng.random() for _, rng in items])
        return torch.zeros(1)

    src = [Example("x", str(i)) for i in range(4)]
    list(zip(range(3), Batches(src, collate, batch_size=2, seed=1)))
    first = list(seen)
    seen.clear()
    list(zip(range(2), Batches(src, collate, batch_size=2, seed=1, start=1)))
    assert seen == first[1:3]


def test_batches_from_webdataset_shards_split_and_resume(tmp_path):
    """If this fails, processes reading WebDataset shards overlap, skip samples, or resume elsewhere."""
    import webdataset as wds

    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    for shard in range(2):
        with wds.TarWriter(str(tmp_path / f"s{shard}.tar")) as sink:
            for i in range(shard * 4, shard * 4 + 4):
                sink.write({"__key__": f"k{i}", "png": buf.getvalue(), "txt": str(i)})
    urls = [str(tmp_path / "s0.tar"), str(tmp_path / "s1.tar")]

    def stream(**kw):
        return Batches(WebDatasetSource(urls), _ids, batch_size=3, seed=5, **kw)

    assert _take(stream(), 3) == [[0, 1, 2], [3, 4, 5], [6, 7, 0]]  # in order, then the next pass
    r0, r1 = _take(stream(rank=0, world=2), 2), _take(stream(rank=1, world=2), 2)
    assert r0 == [[0, 1, 2], [6, 7, 0]] and r1 == [[3, 4, 5], [1, 2, 3]]
    assert _take(stream(start=1), 2) == [[3, 4, 5], [6, 7, 0]]
    assert _take(stream(), 3, workers=2) == [[0, 1, 2], [3, 4, 5], [6, 7, 0]]
