"""`TrainConfig`: every training setting in one dataclass, read from YAML (`blip2 train run.yaml`).

Defaults are the paper's recipe where it has one (AdamW β=(0.9, 0.98), weight decay 0.05, cosine decay with
linear warmup, peak LR 1e-4, 32 text tokens); sizes are for a small run, not for 129M images.

    stage: 1                       # 1: ITC + ITM + ITG (Q-Former pretraining); 2: LM loss through a frozen LM
    out: runs/stage1               # checkpoint/ (resume), model/ (HF layout), log.jsonl, tensorboard/
    vision: Salesforce/blip2-opt-2.7b   # stage 1 from scratch: a BLIP-2 checkpoint (its ViT), a save_vision folder,
                                        # or a transformers tower: openai/clip-vit-base-patch16, a dinov2 folder...
    tokenizer: bert-base-uncased-with-dec   # stage 1 from scratch: the Q-Former tokenizer ([DEC] as bos_token)
    qformer: {num_hidden_layers: 12}        # stage 1 from scratch: QFormerConfig fields
    bert: path/to/bert-base-uncased         # optional: initialise the Q-Former from BERT, as LAVIS
    init: runs/stage1/model        # or continue a checkpoint (stage 1: retrieval layout; stage 2: blip2-opt...)
    stage1: runs/stage1/model      # stage 2: the stage-1 checkpoint to bridge
    lora: {r: 8}                   # stage 2: LoRA adapters on the LM too (train/lora.py); target modules per family
    language_model: facebook/opt-2.7b   # stage 2: any transformers causal or seq2seq LM folder with its tokenizer
    data:
      - {kind: jsonl, path: train.jsonl}
      - {kind: coco, path: captions_train2017.json, images: train2017}
      - {kind: wds, path: "shards/{000..099}.tar"}
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..config import QFormerConfig
from ..durable import canonical
from ..errors import ConfigError


@dataclass
class DataConfig:
    kind: str  # jsonl | coco | wds
    path: str | list[str]
    images: str | None = None  # folder the image paths are relative to (jsonl: default the manifest's folder)


@dataclass
class LoraSettings:
    """LoRA adapters on the frozen LM (stage 2 / fine-tuning), applied with `peft`; see `train/lora.py`."""

    r: int = 8  # rank of the update B @ A
    alpha: float = 16  # the update is scaled by alpha / r
    dropout: float = 0.05  # on the adapter's input only
    target_modules: list[str] | None = None  # default: per LM family (lora.TARGET_MODULES); required for others


@dataclass
class TrainConfig:
    stage: int = 1
    out: str = "runs/blip2"
    data: list[DataConfig] = field(default_factory=list)

    # ---- the model
    init: str | None = None  # a checkpoint to continue (stage 1: retrieval layout, stage 2: generation layout)
    # stage 1 from scratch, the frozen image encoder: a BLIP-2 checkpoint or `save_vision` folder (EVA ViT), a
    # CLIP / SigLIP / DINOv2 folder or Hub id, or a tower config dict ({model_type: clip_vision_model, ...})
    vision: str | dict[str, Any] | None = None
    tokenizer: str | None = None  # stage 1 from scratch: Q-Former tokenizer folder (`[DEC]` as bos_token)
    qformer: dict[str, Any] = field(default_factory=dict)  # stage 1 from scratch: QFormerConfig fields
    bert: str | None = None  # stage 1 from scratch: BERT weights to initialise the Q-Former with
    num_query_tokens: int = 32
    embed_dim: int = 256  # ITC embedding width
    stage1: str | None = None  # stage 2: the stage-1 checkpoint whose image encoder and Q-Former are bridged
    language_model: str | None = None  # stage 2: a transformers LM folder (with tokenizer) to bridge to
    fresh_qformer: bool = False  # stage 2: random Q-Former instead of stage 1's (the "without stage 1" baseline)
    loss_weights: dict[str, float] = field(default_factory=dict)  # stage 1: {itc, itm, itg}, default 1 each
    gather_with_grad: bool = False  # ITC: gradients through the other processes' features too
    frozen_dtype: str = "fp32"  # dtype of the frozen ViT and LM: fp32 | fp16 | bf16 (LAVIS: fp16 ViT and OPT)
    lora: LoraSettings | None = None  # stage 2: also train LoRA adapters on the LM (`lora: {}` for the defaults)

    # ---- the data
    image_size: int | None = None  # default: the image encoder's
    augment: bool = True  # RandomResizedCrop + flip (turn off when captions say left / right)
    crop_scale: tuple[float, float] = (0.5, 1.0)
    flip: bool = True
    max_text_length: int = 32
    prefix_lm: bool = True  # stage 2, seq2seq LM: split captions into encoder prefix and decoder target
    shuffle: bool = True
    num_workers: int = 0

    # ---- optimisation
    steps: int = 1000  # optimizer steps
    batch_size: int = 32  # per process and micro-step
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 100
    warmup_lr: float = 1e-6
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float | None = None
    mixed_precision: str = "no"  # no | fp16 | bf16 (accelerate)
    max_skipped_steps: int = 20  # steps in a row skipped for a non-finite loss or gradient before the run stops
    cpu: bool = False  # force the CPU even when a GPU is present
    threads: int | None = None  # torch CPU threads; 1 is fastest for tiny models on a busy machine
    seed: int = 0

    # ---- bookkeeping
    log_every: int = 10
    save_every: int = 500
    resume: bool = True  # continue from out/checkpoint when it exists
    stop_at_step: int | None = None  # stop (after saving) at this step, as if killed; for tests and time limits
    progress: bool = True  # tqdm bar on the main process

    def __post_init__(self) -> None:
        self.data = [d if isinstance(d, DataConfig) else _make(DataConfig, d, "data") for d in self.data]
        if self.lora is True or isinstance(self.lora, dict):  # `lora: true` or `lora: {}`: the defaults
            self.lora = _make(LoraSettings, {} if self.lora is True else self.lora, "lora")
        elif self.lora is False:
            self.lora = None
        self.crop_scale = tuple(self.crop_scale)
        self.betas = tuple(self.betas)
        checks = [
            (self.stage in (1, 2), f"stage must be 1 or 2, got {self.stage!r}"),
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}"),
            (0 <= self.warmup_steps, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (self.mixed_precision in ("no", "fp16", "bf16"), f"mixed_precision {self.mixed_precision!r}"),
            (self.frozen_dtype in ("fp32", "fp16", "bf16"), f"frozen_dtype {self.frozen_dtype!r}"),
            (self.save_every >= 1 and self.log_every >= 1, "save_every and log_every must be >= 1"),
            (self.max_skipped_steps >= 1, f"max_skipped_steps must be >= 1, got {self.max_skipped_steps}"),
            (self.lora is None or self.stage == 2, "lora adapts the language model: it needs stage: 2"),
            (self.lora is None or self.lora.r >= 1, f"lora.r must be >= 1, got {self.lora and self.lora.r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        unknown = set(self.qformer) - {f.name for f in fields(QFormerConfig)}
        if unknown:
            raise ConfigError(f"qformer: unknown QFormerConfig fields {sorted(unknown)}")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainConfig:
        return _make(cls, raw, "config")

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
        import yaml

        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot read the training config ({e})") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of settings, got {type(raw).__name__}")
        raw.update(overrides or {})
        # relative paths in the file are relative to the file, so a config works from any directory
        for key in ("out", "init", "vision", "tokenizer", "bert", "stage1", "language_model"):
            if isinstance(raw.get(key), str) and not Path(raw[key]).is_absolute():
                candidate = path.parent / raw[key]
                if candidate.exists() or key == "out":
                    raw[key] = str(candidate)
        for d in raw.get("data") or []:
            for key in ("path", "images"):
                if isinstance(d, dict) and isinstance(d.get(key), str) and not Path(d[key]).is_absolute():
                    d[key] = str(path.parent / d[key])
        try:
            return cls.from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def resume_settings(self) -> dict[str, Any]:
        """The settings that must not change across a resume (bookkeeping ones may)."""
        d = self.to_dict()
        for key in ("stop_at_step", "progress", "log_every", "save_every", "resume", "num_workers", "out", "threads"):
            d.pop(key)
        return d

    def fingerprint(self) -> str:
        """`resume_settings` as canonical JSON, stored with a checkpoint (`durable.check_settings` compares them)."""
        return canonical(self.resume_settings())


def _make(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {raw!r}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown settings {unknown}; known: {sorted(names)}")
    try:
        return cls(**raw)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from e
