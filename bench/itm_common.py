"""A full-size `Blip2ForImageTextRetrieval` checkpoint (blip2-itm-vit-g shapes) with random weights, for benchmarks.

Follows `common.make_full_checkpoint`: the shapes come from transformers' class built on the meta device, the values
are random (the cost of a matmul does not depend on them), and the tokenizer is the tests' small BERT-like WordPiece
with `[DEC]` as bos; the Q-Former vocabulary stays 30523 (bert-base-uncased + `[DEC]`) as in the released model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from common import _flush  # also puts tests/ on sys.path for the fixture tokenizers

ITM_VOCAB = 30523
_ONES = ("norm.weight", "LayerNorm.weight", "layer_norm1.weight", "layer_norm2.weight", "post_layernorm.weight",
         "layernorm.weight")  # fmt: skip
_FP32 = ("qformer.", "query_tokens", "embeddings.", "vision_projection.", "text_projection.", "itm_head.")


def make_full_itm_checkpoint(folder: str | Path, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """Write a blip2-itm-vit-g-shaped checkpoint (ViT-g 39 layers, Q-Former with text input, E=256, Nq=32).

    The vision tower is stored in `dtype`; the Q-Former side stays float32, as the reference keeps it. Reuses the
    folder if it is complete.
    """
    from fixtures import make_bert_tokenizer
    from safetensors.torch import save_file
    from transformers import Blip2Config, Blip2ForImageTextRetrieval, Blip2Processor, BlipImageProcessor

    folder = Path(folder)
    if (folder / "done").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tok = make_bert_tokenizer(folder)
    qformer = {"use_qformer_text_input": True, "vocab_size": ITM_VOCAB, "pad_token_id": tok.pad_token_id}
    cfg = Blip2Config(qformer_config=qformer, num_query_tokens=32, image_text_hidden_size=256)
    cfg.architectures = ["Blip2ForImageTextRetrieval"]
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Blip2ForImageTextRetrieval(cfg).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    shard, n, size, weight_map = {}, 1, 0, {}
    for key, shape in shapes.items():
        t = torch.empty(shape, dtype=torch.float32)
        if key.endswith(_ONES):
            t.fill_(1.0)
        else:
            t.normal_(0.0, 0.02, generator=gen)
        shard[key] = t if key.startswith(_FP32) else t.to(dtype)
        size += shard[key].numel() * shard[key].element_size()
        if size > 2 * 2**30:
            _flush(save_file, folder, shard, n, weight_map)
            shard, n, size = {}, n + 1, 0
    if shard:
        _flush(save_file, folder, shard, n, weight_map)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg.save_pretrained(folder)
    image_processor = BlipImageProcessor(size={"height": 224, "width": 224})
    Blip2Processor(image_processor, tok, num_query_tokens=32).save_pretrained(folder)
    (folder / "done").write_text("ok\n")
    return folder
