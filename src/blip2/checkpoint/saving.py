"""How a model is saved: config.json and safetensors in the Hugging Face layout, sharded past a size.

The writing is `huggingface_hub.save_torch_state_dict`'s: `model.safetensors`, or `model-0000i-of-0000n.safetensors`
shards with `model.safetensors.index.json`, each file with `{"format": "pt"}` metadata, as `transformers`' own
`save_pretrained` writes them; it also removes the weight files of an earlier save into the same folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError
from ..model import Blip2Model
from .loading import tie_groups


def save_model(model: Blip2Model, folder: str | os.PathLike, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write config.json and (sharded) model.safetensors in the HF layout; tied copies are written once, under the
    first name of each tie (the input embeddings, as `transformers` writes them)."""
    from huggingface_hub import save_torch_state_dict

    from ..quant import PackedInt8Linear

    if any(hasattr(m, "set_weight") or isinstance(m, PackedInt8Linear) for m in model.modules()):
        raise ConfigError("a model loaded with dtype='int8' cannot be saved in the HF layout; load it in fp32")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save(folder)
    tied = {k for g in tie_groups(model) for k in g[1:]}
    params = dict(model.named_parameters(remove_duplicate=False))
    state = {k: v.detach() for k, v in model.state_dict().items() if k in params and k not in tied}
    save_torch_state_dict(state, folder, max_shard_size=max_shard_bytes)
    return folder
