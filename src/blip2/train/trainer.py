"""The training loop: `train(config)` runs stage 1 or stage 2 from a `TrainConfig` and exports the HF layout.

`accelerate` places the model, runs mixed precision and several processes (`accelerate launch` / `torchrun`);
the loop itself is flat and reads top to bottom (nanoGPT's). What a run writes under `out/`:

    checkpoint/        trainable weights, optimizer, scheduler, step, every process' RNG (written atomically)
    model/             the trained model in the Hugging Face layout (`blip2.load`, transformers)
    log.jsonl          one line per optimizer step: losses, learning rate, temperature, seconds
    tensorboard/       the same every `log_every` steps
    config.json        the settings of the run

Resuming is exact: the data stream restarts at the next micro-batch (see `data.Batches`) and the RNG continues
from where it stood, so a run killed and resumed logs the same losses as one never killed.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import load_model
from ..dtype_policy import resolve_dtype
from ..durable import append_jsonl, atomic_write, check_settings, recover_dir, repair_jsonl, replace_dir
from ..errors import ConfigError, TrainingError
from .config import TrainConfig
from .data import Batches, Stage1Collate, Stage2Collate, TrainTransform, WebDatasetSource, read_source
from .lora import add_lora
from .models import (
    Stage1Model,
    Stage2Model,
    VisionAdapter,
    export,
    init_from_bert,
    load_stage1,
    load_stage2,
    load_vision,
    new_stage1,
    new_stage2,
)


@dataclass
class TrainResult:
    out: Path
    step: int  # optimizer steps done
    model: Path | None  # the exported HF-layout folder; None when stopped early (stop_at_step)
    last: dict[str, float]  # the last logged record


# ---- building -----------------------------------------------------------------------------------------------------
def build_model(cfg: TrainConfig, vision: nn.Module | None = None) -> tuple[Stage1Model | Stage2Model, Any]:
    """The model to train and its tokenizer, from the config (see `TrainConfig`'s docstring for the choices)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    from ..config import QFormerConfig

    if cfg.stage == 1:
        kw = {"weights": cfg.loss_weights, "gather_with_grad": cfg.gather_with_grad}
        if cfg.init:
            model = load_stage1(cfg.init, **kw)
            tokenizer = AutoTokenizer.from_pretrained(cfg.init)
        else:
            if (cfg.vision is None and vision is None) or cfg.tokenizer is None:
                raise ConfigError("stage 1 from scratch needs 'vision' (an image encoder) and 'tokenizer'")
            tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
            vit = vision if vision is not None else load_vision(cfg.vision)
            qcfg = QFormerConfig(**cfg.qformer)
            model = new_stage1(vit, tokenizer, qcfg, cfg.num_query_tokens, cfg.embed_dim, **kw)
            if cfg.bert:
                init_from_bert(model, cfg.bert)
    elif cfg.init:
        model = load_stage2(cfg.init)
        tokenizer = AutoTokenizer.from_pretrained(cfg.init)
    else:
        if cfg.stage1 is None or cfg.language_model is None:
            raise ConfigError("stage 2 needs 'stage1' (a stage-1 checkpoint) and 'language_model', or 'init'")
        stage1, _ = load_model(cfg.stage1)
        lm_cfg = AutoConfig.from_pretrained(cfg.language_model)
        auto = AutoModelForSeq2SeqLM if lm_cfg.is_encoder_decoder else AutoModelForCausalLM
        lm = auto.from_pretrained(cfg.language_model, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(cfg.language_model)
        model = new_stage2(stage1, lm, tokenizer, fresh_qformer=cfg.fresh_qformer)
    dtype = resolve_dtype(cfg.frozen_dtype, torch.device("cpu"))
    for frozen in model.frozen_modules():
        frozen.to(dtype)
    if cfg.lora is not None:  # after the cast: the LM's base weights in `frozen_dtype`, the adapters in fp32
        add_lora(model, cfg.lora)
    return model, tokenizer


def build_data(cfg: TrainConfig, model: Stage1Model | Stage2Model, tokenizer, rank: int, world: int, start: int):
    if not cfg.data:
        raise ConfigError("no training data: add a 'data' list (jsonl, coco or wds sources)")
    sources = [read_source(d.kind, d.path, d.images) for d in cfg.data]
    streams = [s for s in sources if isinstance(s, WebDatasetSource)]
    if streams and len(sources) > 1:
        raise ConfigError("a WebDataset source cannot be mixed with others; list all shards in one 'path'")
    if streams:
        source = streams[0]
        source.captions_only = cfg.stage == 1
    else:
        source = [ex for s in sources for ex in s if cfg.stage == 2 or not ex.prompt]
        if not source:
            raise ConfigError("no captions in the data: stage 1 learns from {image, caption} records")
    image = model.blip.config.image_transform()  # the image encoder's preprocessing (size, crop, mean/std)
    if cfg.image_size:
        edge = image.shortest_edge and round(image.shortest_edge * cfg.image_size / image.size)
        image = replace(image, size=cfg.image_size, shortest_edge=edge)
    transform = TrainTransform(image.size, cfg.augment, tuple(cfg.crop_scale), flip=cfg.flip, image=image)
    if cfg.stage == 1:
        collate = Stage1Collate(tokenizer, transform, cfg.max_text_length)
    else:
        enc_dec = model.blip.is_encoder_decoder
        collate = Stage2Collate(tokenizer, transform, enc_dec, cfg.max_text_length, cfg.prefix_lm)
    return Batches(source, collate, cfg.batch_size, cfg.seed, rank, world, start=start, shuffle=cfg.shuffle)


# ---- optimisation -------------------------------------------------------------------------------------------------
def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices (and the query tokens) only: never on biases, norms or the temperature."""
    groups: dict[bool, dict[str, list]] = {True: {"params": [], "names": []}, False: {"params": [], "names": []}}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[p.ndim >= 2]["params"].append(p)
            groups[p.ndim >= 2]["names"].append(name)
    return [{**groups[True], "weight_decay": weight_decay}, {**groups[False], "weight_decay": 0.0}]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup from `warmup_lr` to `lr`, then cosine decay to `min_lr` at `steps`."""
    if step < cfg.warmup_steps:
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / cfg.warmup_steps
    t = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def optimizer_step(acc, opt, trainable: list[torch.Tensor], loss_finite: torch.Tensor, grad_clip: float | None) -> bool:
    """One update, unless the loss or a gradient is inf or NaN; returns whether the update was skipped.

    Under fp16 accelerate's loss scaler finds non-finite gradients itself, skips the update and lowers the scale.
    Without a scaler (fp32, bf16) nothing else would stop one NaN from reaching every trained weight, so the step is
    skipped here, in every process alike (gradients agree after DDP's all-reduce; losses are agreed on here).
    """
    if acc.scaler is not None:
        if grad_clip:
            acc.clip_grad_norm_(trainable, grad_clip)
        opt.step()
        return acc.optimizer_step_was_skipped
    grads_finite = [torch.isfinite(p.grad).all() for p in trainable if p.grad is not None]
    finite = torch.stack([loss_finite.to(acc.device), *grads_finite]).all()
    if acc.reduce((~finite).float(), reduction="sum").item() > 0:
        return True
    if grad_clip:
        acc.clip_grad_norm_(trainable, grad_clip)
    opt.step()
    return False


def check_skips(record: dict[str, float], in_a_row: int, cfg: TrainConfig) -> None:
    """Say when a step was skipped for a non-finite loss, and stop when steps keep being skipped."""
    if not record.get("skipped"):
        return
    if not math.isfinite(record["loss"]):
        warnings.warn(f"step {record['step']}: the loss is {record['loss']}; the update was skipped", stacklevel=2)
    if in_a_row >= cfg.max_skipped_steps:
        raise TrainingError(
            f"{in_a_row} optimizer steps in a row skipped up to step {record['step']}: the loss or its gradients are "
            f"inf or NaN (last loss {record['loss']}). Try mixed_precision bf16 instead of fp16, frozen_dtype fp32 "
            f"(now {cfg.frozen_dtype}), a lower lr (now {cfg.lr}), or grad_clip; the checkpoint's weights are "
            "all finite"
        )


# ---- checkpoints --------------------------------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: Path, acc, model: nn.Module, opt, sched, step: int, cfg: TrainConfig) -> None:
    """Write to `checkpoint.tmp` and swap it in (`durable.replace_dir`): a run killed while saving keeps the previous
    checkpoint."""
    from safetensors.torch import save_file

    tmp = folder.with_name(folder.name + ".tmp")
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng-{acc.process_index}.pt")
    if acc.is_main_process:
        trainable = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trainable, tmp / "trainable.safetensors")
        torch.save(opt.state_dict(), tmp / "optimizer.pt")
        torch.save(sched.state_dict(), tmp / "scheduler.pt")
        state = {"step": step, "world": acc.num_processes, "fingerprint": cfg.fingerprint()}
        (tmp / "state.json").write_text(json.dumps(state) + "\n")
    acc.wait_for_everyone()
    if acc.is_main_process:
        replace_dir(tmp, folder)  # fsynced, then renamed in; a kill mid-swap is finished by `recover_dir`
    acc.wait_for_everyone()


def load_checkpoint(folder: Path, model: nn.Module, opt, sched, cfg: TrainConfig, rank: int, world: int):
    """Restore weights, optimizer and schedule; returns (step, this process' RNG state to set later)."""
    from safetensors.torch import load_file

    state = json.loads((folder / "state.json").read_text())
    advice = "resuming would not continue it; use another 'out', or set resume: false to start over"
    check_settings(json.loads(state["fingerprint"]), cfg.resume_settings(), folder, advice)
    if state["world"] != world:
        raise ConfigError(f"{folder}: saved by {state['world']} processes, resumed with {world}; use the same number")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved = load_file(folder / "trainable.safetensors")
    if set(saved) != set(params):
        raise ConfigError(f"{folder}: trainable parameters differ from the model's: {sorted(set(saved) ^ set(params))}")
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value)
    opt.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    sched.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    return state["step"], torch.load(folder / f"rng-{rank}.pt", weights_only=True)


class RunLog:
    """log.jsonl (every step) and TensorBoard (every `every` steps), main process only. On resume the lines
    after the checkpoint's step, written by the killed run, are dropped so the log reads as one run."""

    def __init__(self, out: Path, start: int, every: int, active: bool) -> None:
        self.path, self.every, self.active, self.writer = out / "log.jsonl", every, active, None
        if not active:
            return
        if self.path.exists():  # a torn last line (killed mid-write) goes too
            kept = [r for r in repair_jsonl(self.path) if r["step"] <= start]
            atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=start + 1)
        except ImportError:
            warnings.warn("tensorboard is not installed: logging to log.jsonl only", stacklevel=2)

    def write(self, record: dict[str, float]) -> None:
        if not self.active:
            return
        append_jsonl(self.path, [record], fsync=False)  # bookkeeping: a resume rewrites it from the checkpoint
        if self.writer is not None and record["step"] % self.every == 0:
            for key, value in record.items():
                if key != "step":
                    self.writer.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ---- the loop -----------------------------------------------------------------------------------------------------
def train(config: TrainConfig | dict | str | Path, vision: nn.Module | None = None) -> TrainResult:
    """Train stage 1 or 2 as `config` says (a `TrainConfig`, a dict of its fields, or a YAML file).

    `vision`: for stage 1 from scratch, an image encoder to use instead of `config.vision` (e.g. a
    `VisionAdapter` around any tower).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    if isinstance(config, (str, Path)):
        cfg = TrainConfig.from_yaml(config)
    elif isinstance(config, dict):
        cfg = TrainConfig.from_dict(config)
    else:
        cfg = config
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # a loss switched off leaves its head without gradient, which DDP must be told about
    unused = any(w == 0 for w in cfg.loss_weights.values())
    ddp = DistributedDataParallelKwargs(find_unused_parameters=unused)
    acc = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.cpu, kwargs_handlers=[ddp])
    rank, world = acc.process_index, acc.num_processes
    out = Path(cfg.out)
    ckpt = out / "checkpoint"
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "config.json", json.dumps(cfg.to_dict(), indent=2, default=str) + "\n")

    torch.manual_seed(cfg.seed)  # the same initial weights in every process
    model, tokenizer = build_model(cfg, vision)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg) / cfg.lr)
    step, rng = 0, None
    if acc.is_main_process:
        recover_dir(ckpt, ckpt.with_name(ckpt.name + ".tmp"))  # a save killed between its two renames
    acc.wait_for_everyone()
    if cfg.resume and (ckpt / "state.json").is_file():
        step, rng = load_checkpoint(ckpt, model, opt, sched, cfg, rank, world)
    model, opt = acc.prepare(model, opt)
    raw = acc.unwrap_model(model)
    batches = build_data(cfg, raw, tokenizer, rank, world, start=step * cfg.grad_accum)
    loader = iter(DataLoader(batches, batch_size=None, num_workers=cfg.num_workers))
    # The loader's iterator draws a seed from torch's RNG: set the RNG after it, alike in fresh and resumed runs.
    _set_rng_state(rng) if rng is not None else torch.manual_seed(cfg.seed + 1 + rank)

    log = RunLog(out, step, cfg.log_every, acc.is_main_process)
    show = cfg.progress and acc.is_main_process
    bar = tqdm(total=cfg.steps, initial=step, disable=not show, desc=f"stage {cfg.stage}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    record: dict[str, float] = {}
    in_a_row = 0  # optimizer steps skipped in a row (non-finite loss or gradients)
    model.train()
    while step < cfg.steps:
        t0 = time.perf_counter()
        totals: dict[str, torch.Tensor] = {}
        for micro in range(cfg.grad_accum):
            batch = {k: v.to(acc.device) for k, v in next(loader).items()}
            # only the last micro-step of an optimizer step synchronises gradients between processes
            sync = nullcontext() if micro == cfg.grad_accum - 1 else acc.no_sync(model)
            with sync:
                output = model(**batch)
                acc.backward(output.loss / cfg.grad_accum)
            for name, value in {"loss": output.loss, **output.parts}.items():
                totals[name] = totals.get(name, 0.0) + value.detach().float() / cfg.grad_accum
        lr = sched.get_last_lr()[0]
        skipped = optimizer_step(acc, opt, trainable, torch.isfinite(totals["loss"]), cfg.grad_clip)
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1

        names = sorted(totals)
        values = acc.reduce(torch.stack([totals[k] for k in names]), reduction="mean").tolist()
        record = {"step": step, **dict(zip(names, values)), "lr": lr, "sec": round(time.perf_counter() - t0, 4)}
        if isinstance(raw, Stage1Model):
            record["temp"] = raw.temp.item()
        if skipped:
            record["skipped"] = 1
        log.write(record)
        in_a_row = in_a_row + 1 if skipped else 0
        check_skips(record, in_a_row, cfg)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        stopping = cfg.stop_at_step is not None and step >= cfg.stop_at_step
        if step % cfg.save_every == 0 or step == cfg.steps or stopping:
            save_checkpoint(ckpt, acc, raw, opt, sched, step, cfg)
        if stopping and step < cfg.steps:
            bar.close()
            log.close()
            return TrainResult(out=out, step=step, model=None, last=record)
    bar.close()
    log.close()

    model_dir = None
    if isinstance(raw.blip.vision_model, VisionAdapter):
        warnings.warn("a VisionAdapter tower cannot be exported in the HF layout; see out/checkpoint", stacklevel=2)
    else:
        model_dir = out / "model"
        if acc.is_main_process:
            export(raw, model_dir, tokenizer)
    acc.wait_for_everyone()
    return TrainResult(out=out, step=step, model=model_dir, last=record)
