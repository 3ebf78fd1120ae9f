"""Training: Q-Former pretraining (stage 1: ITC + ITM + ITG), the generative stage 2 with any LM, fine-tuning.

    from blip2.train import TrainConfig, train
    result = train(TrainConfig(stage=1, vision=..., tokenizer=..., data=[{"kind": "jsonl", "path": ...}]))
    result.model            # the trained model in the HF layout: blip2.load(result.model)

Rooms: `losses` (tensors in and out), `models` (the trainable wrappers, freezing, builders, export), `data`
(manifests, augmentation, the resumable batch stream), `config` (`TrainConfig`), `trainer` (the loop), `lora`
(LoRA adapters on the LM: target modules per family, saving, `merge`),
`shapes` and `miniature` (a synthetic world and the miniature BLIP-2 trained on it).
Heavy imports (accelerate, tensorboard, peft) happen inside `train` and `lora`, not here.
"""

from .config import DataConfig, TrainConfig
from .models import (
    Stage1Model,
    Stage2Model,
    VisionAdapter,
    export,
    load_stage1,
    load_stage2,
    load_vision,
    new_stage1,
    new_stage2,
    save_vision,
)
from .trainer import TrainResult, train

__all__ = [
    "DataConfig",
    "Stage1Model",
    "Stage2Model",
    "TrainConfig",
    "TrainResult",
    "VisionAdapter",
    "export",
    "load_stage1",
    "load_stage2",
    "load_vision",
    "new_stage1",
    "new_stage2",
    "save_vision",
    "train",
]
