"""Training knobs shared by the fine-tune and distill stages, mapped onto `TrainingArguments`,
plus resumable training: checkpoints every N steps, marked with the stage fingerprint."""
from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers import TrainerCallback

from pipeline import dist, errors
from pipeline.errors import StageError
from pipeline.models import native_bf16, pick_device

log = logging.getLogger("pipeline")
Reporter = Literal["auto", "tensorboard", "none"]
Scheduler = Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial"]
# Settings that do not change the trained model: left out of the stage fingerprint (context.result_settings).
RUN_ONLY = {"fingerprint": False}
# Keys added after runs were made: they enter the fingerprint only when set, so older run folders stay current.
ADDED = {"fingerprint": "unless_default"}
MARKER = "pipeline-checkpoint.json"  # written into each finished checkpoint-N folder


@dataclass
class TrainConfig:
    max_steps: int = -1  # optimizer steps; -1 trains for `epochs`
    epochs: float = 1.0  # passes over the training blocks
    batch_size: int = 4  # blocks per device per step
    grad_accum: int = 1  # gradient accumulation steps
    learning_rate: float = 5e-5  # peak learning rate
    # `linear`, `cosine`, `constant`, `constant_with_warmup`, `cosine_with_restarts`, `polynomial`
    lr_scheduler: Scheduler = "linear"
    warmup_ratio: float = 0.0  # fraction of steps spent warming up
    weight_decay: float = 0.0  # AdamW weight decay
    # `auto`: bf16 mixed precision (fp32 weights, bf16 autocast) where the hardware runs bf16 natively — GPUs that
    # support it, CPUs with AVX512-BF16/AMX — else fp32; or `fp32`, `bf16`, `fp16`
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    logging_steps: int = 10  # log the loss every N steps
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, slower steps
    eval_steps: int | None = None  # validation loss every N steps (null: none while training)
    # stop after N evaluations without a lower validation loss; implies `keep_best`
    early_stopping_patience: int | None = None
    keep_best: bool = False  # finish with the weights of the evaluation with the lowest validation loss
    # L1 penalty on the transformer blocks' linear weights, applied after every optimizer step as its proximal step
    # (each weight moves lr x l1 towards zero and stops at exactly zero), so sparsity grows while training; 0 = off.
    # The record gives the sparsity reached. Full-weight training only (not LoRA)
    l1: float = field(default=0.0, metadata=ADDED)
    # write a resumable checkpoint every N steps (null: none); a multiple of `eval_steps` when keeping the best
    save_steps: int | None = field(default=None, metadata=RUN_ONLY)
    save_total_limit: int = field(default=2, metadata=RUN_ONLY)  # checkpoints kept (the best one is kept as well)
    # `auto`: continue an interrupted run from its last checkpoint; null: start afresh; or a `checkpoint-N` folder
    resume_from: str | None = field(default="auto", metadata=RUN_ONLY)
    # `auto` (TensorBoard when installed), `tensorboard`, `none`
    report_to: Reporter = field(default="auto", metadata=RUN_ONLY)
    progress_bar: bool = field(default=True, metadata=RUN_ONLY)  # the Trainer's progress bar

    def check(self) -> list[str]:
        problems = []
        if self.max_steps == 0 or self.max_steps < -1:
            problems.append(f"max_steps: {self.max_steps} must be positive, or -1 to use epochs")
        if self.max_steps == -1 and self.epochs <= 0:
            problems.append(f"epochs: {self.epochs} must be positive when max_steps is -1")
        for key in ("batch_size", "grad_accum", "logging_steps", "save_total_limit"):
            if getattr(self, key) < 1:
                problems.append(f"{key}: {getattr(self, key)} must be at least 1")
        for key in ("eval_steps", "early_stopping_patience", "save_steps"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                problems.append(f"{key}: {getattr(self, key)} must be at least 1, or null")
        if self.l1 < 0:
            problems.append(f"l1: {self.l1} must be 0 (off) or positive")
        if self.learning_rate <= 0:
            problems.append(f"learning_rate: {self.learning_rate} must be positive")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"warmup_ratio: {self.warmup_ratio} must be in [0, 1)")
        if self.eval_steps is None and (self.keep_best or self.early_stopping_patience):
            problems.append("keep_best/early_stopping_patience: need eval_steps (how often to measure validation loss)")
        if self.best_model and self.save_steps and self.eval_steps and self.save_steps % self.eval_steps:
            problems.append(f"save_steps: {self.save_steps} must be a multiple of eval_steps ({self.eval_steps}) "
                            f"to keep the best model; e.g. save_steps: {self.eval_steps}")
        if self.resume_from not in (None, "auto") and not (Path(self.resume_from) / "trainer_state.json").is_file():
            problems.append(f"resume_from: '{self.resume_from}' is not a Trainer checkpoint folder (no "
                            "trainer_state.json); use auto, null, or a .trainer/<stage>/checkpoint-N folder")
        if self.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
            problems.append("report_to: tensorboard is not installed; pip install tensorboard, or use auto/none")
        return problems

    @property
    def best_model(self) -> bool:
        return self.eval_steps is not None and (self.keep_best or self.early_stopping_patience is not None)


def _checkpointing(arguments, on: bool) -> dict:
    """Activation checkpointing under the name this transformers reads: 5.23 renamed `gradient_checkpointing*`
    to `activation_checkpointing*` and warns on every run that passes the old names (which 5.5 only knows)."""
    name = "activation_checkpointing" if "activation_checkpointing" in arguments.__dataclass_fields__ else \
        "gradient_checkpointing"
    # non-reentrant checkpointing also works when only adapter weights need gradients (LoRA)
    return {name: on, f"{name}_kwargs": {"use_reentrant": False} if on else None}


def precision_flags(precision: str) -> dict:
    """bf16 mixed precision (fp32 master weights, bf16 autocast) where the hardware runs bf16 natively:
    1.5x the fp32 training speed on this project's AMX CPU at the same loss (bench/results/cpu-speed.json)."""
    if precision == "auto":
        precision = "bf16" if native_bf16(pick_device()) else "fp32"
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def _report_to(choice: str) -> str:
    if choice == "auto":
        from transformers.integrations import is_tensorboard_available

        return "tensorboard" if is_tensorboard_available() else "none"
    return choice


def training_args(cfg: TrainConfig, output_dir: Path, seed: int, *, evaluate: bool = False,
                  count_tokens: bool = False):
    """TrainingArguments for `cfg`. `evaluate`: the stage passes a validation set to the Trainer.
    `count_tokens`: batches are padded, so count real tokens instead of batch shape x steps."""
    from transformers import TrainingArguments

    if cfg.eval_steps is not None and not evaluate:
        raise StageError("eval_steps/keep_best/early_stopping_patience: this stage does not evaluate while "
                         "training; remove them")
    save_steps = cfg.save_steps or (cfg.eval_steps if cfg.best_model else None)
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=cfg.max_steps,
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # a float < 1 is a fraction of all steps in transformers 5
        weight_decay=cfg.weight_decay,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        **_checkpointing(TrainingArguments, cfg.gradient_checkpointing),
        eval_strategy="steps" if cfg.eval_steps else "no",
        eval_steps=cfg.eval_steps,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        save_total_limit=cfg.save_total_limit,
        load_best_model_at_end=cfg.best_model,
        metric_for_best_model="eval_loss" if cfg.eval_steps else None,
        greater_is_better=False,
        report_to=_report_to(cfg.report_to),  # TensorBoard event files go to <output_dir>/runs/
        disable_tqdm=not cfg.progress_bar,
        include_num_input_tokens_seen="non_padding" if count_tokens else "no",
        seed=seed,
        data_seed=seed,
        use_cpu=dist.uses_cpu(),  # on a CPU-only machine this makes `accelerate launch` DDP use gloo
        ddp_find_unused_parameters=False,  # causal LMs (and LoRA adapters) use every trainable weight
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        **precision_flags(cfg.precision),
    )


def train(trainer, block_size: int, resume_from: str | None = None) -> dict:
    """Run `trainer` and summarise what it did: first/last logged loss, tokens, speed. A disk that fills while
    the Trainer writes a checkpoint is the stage's disk-full message (space needed and free), not a bug: the
    unfinished checkpoint has no marker, so the same command resumes from the last finished one."""
    try:
        result = trainer.train(resume_from_checkpoint=resume_from)
    except Exception as err:
        if not errors.is_disk_full(err):
            raise
        out = Path(trainer.args.output_dir)
        for partial in _checkpoints(out):  # the one it was writing: never resumed from, and it holds the space
            if _marker(partial) is None and dist.is_main():
                shutil.rmtree(partial, ignore_errors=True)
        # a checkpoint holds the weights, AdamW's two moments and small state: about three copies of the model
        need = 3 * sum(p.numel() * p.element_size() for p in trainer.model.parameters())
        raise errors.disk_full(out / ".checkpoint.partial", 0, need) from err
    state, args = trainer.state, trainer.args
    losses = [h["loss"] for h in state.log_history if "loss" in h]
    evals = [h["eval_loss"] for h in state.log_history if "eval_loss" in h]
    steps = state.global_step
    tokens = state.num_input_tokens_seen or (
        steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * block_size
        * max(1, args.world_size))
    runtime = result.metrics.get("train_runtime", float("nan"))
    metrics = {
        "train_loss_first": losses[0] if losses else math.nan,
        "train_loss_last": losses[-1] if losses else math.nan,
        # after a resume the Trainer averages only the resumed steps' losses over all steps; the log has them all
        "train_loss_mean": _logged_mean(state.log_history) if resume_from else result.training_loss,
        "train_steps": steps,
        "train_tokens": tokens,
        "train_seconds": round(runtime, 2),
        "train_tokens_per_s": round(tokens / runtime, 1) if runtime else math.nan,
        "world_size": max(1, args.world_size),
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        "parallelism": parallelism(trainer),
    }
    if evals:
        metrics.update(eval_loss_first=evals[0], eval_loss_last=evals[-1], eval_loss_best=min(evals))
    if args.load_best_model_at_end and state.best_model_checkpoint:
        metrics["best_step"] = int(state.best_model_checkpoint.rsplit("-", 1)[1])
    if resume_from:
        metrics["resumed_from"] = Path(resume_from).name
    return metrics


def sharded(trainer) -> bool:
    """FSDP or DeepSpeed split the weights across ranks (DDP and single processes hold whole copies)."""
    return trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled


def parallelism(trainer) -> str:
    """How the Trainer spread the work: fsdp, deepspeed, ddp, or single (one process)."""
    if trainer.is_fsdp_enabled:
        return "fsdp"
    if trainer.is_deepspeed_enabled:
        return "deepspeed"
    return "ddp" if trainer.args.world_size > 1 else "single"


def _logged_mean(history: list[dict]) -> float:
    """Step-weighted mean of the logged training losses (each covers the steps since the previous log)."""
    total, prev = 0.0, 0
    for entry in (h for h in history if "loss" in h):
        total += entry["loss"] * (entry["step"] - prev)
        prev = entry["step"]
    return total / prev if prev else math.nan


def fit(trainer, cfg: TrainConfig, fingerprint: str, recipe: str, block_size: int, force: bool = False) -> dict:
    """Train with checkpoints marked by this stage's fingerprint, resuming an unfinished run;
    call `clear_checkpoints` once the stage folder is written."""
    from transformers import EarlyStoppingCallback

    out = Path(trainer.args.output_dir)
    resume = resume_point(cfg, out, fingerprint, recipe, force)
    _warn_if_not_sharded(trainer)
    trainer.add_callback(CheckpointMarker(fingerprint, recipe))
    if cfg.early_stopping_patience:
        trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
    return train(trainer, block_size, resume)


def _warn_if_not_sharded(trainer) -> None:
    """accelerate turns an FSDP/DeepSpeed config into plain DDP on CPUs (it shards only on accelerators);
    say so rather than let the user believe the model is sharded."""
    if not dist.is_main() or sharded(trainer):
        return
    for env, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(env, "").lower() == "true":
            log.warning("the accelerate config asks for %s, but accelerate enables it only on GPUs/accelerators; "
                        "this run uses %s (every process holds the whole model)", name, parallelism(trainer))


def _checkpoints(folder: Path) -> list[Path]:
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _marker(checkpoint: Path) -> dict | None:
    try:
        return json.loads((checkpoint / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def resume_point(cfg: TrainConfig, out: Path, fingerprint: str, recipe: str, force: bool) -> str | None:
    """The checkpoint to resume from: `resume_from` if it names one, else the newest finished checkpoint of
    an unfinished run with the same fingerprint. Checkpoints of different settings are refused, not mixed in."""
    if cfg.resume_from not in (None, "auto"):
        path = Path(cfg.resume_from)
        _same_run(path, _marker(path), fingerprint, recipe, "resume_from")
        log.info("resuming from %s", path)
        return str(path)
    found = _checkpoints(out)
    if found and (force or cfg.resume_from is None):
        log.info("starting afresh (%s): removing %d old checkpoint(s) in %s",
                 "--force" if force else "resume_from: null", len(found), out)
        clear_checkpoints(out)
        return None
    finished = [p for p in found if _marker(p) is not None]
    for p in found:
        if p not in finished:  # killed while writing it; Trainer writes the marker-less folder first
            log.info("ignoring %s: incomplete (killed while saving?)", p)
    if not finished:
        return None
    last = finished[-1]
    _same_run(last, _marker(last), fingerprint, recipe, str(out))
    log.info("resuming from %s (step %s)", last, last.name.split("-")[1])
    return str(last)


def _same_run(path: Path, marker: dict | None, fingerprint: str, recipe: str, where: str) -> None:
    if marker is None:
        raise StageError(f"{where}: {path} is not a finished llm-pipeline checkpoint (no {MARKER}); "
                         "point resume_from at a checkpoint-N folder this pipeline wrote, or use auto")
    if marker.get("fingerprint") != fingerprint:
        raise StageError(
            f"{where}: checkpoint {path} belongs to a different run (recipe '{marker.get('recipe')}', settings "
            f"fingerprint {marker.get('fingerprint')}; this run: recipe '{recipe}', {fingerprint}). Restore that "
            f"run's settings to resume it, or start afresh with --force (deletes the old checkpoints)."
        )


def keep_sparse(trainer, model, folder: Path, l1: float, stage: str) -> bool:
    """When the input folder is sparse (its record says so), keep its zeros fixed: re-zeroed after every optimizer
    step; with `l1`, also soft-threshold the block weights. True when the output is to be recorded as sparse."""
    from pipeline import sparsity

    sparse = sparsity.record_of(folder) is not None
    if not sparse and not l1:
        return False
    keep = sparsity.from_zeros(model) if sparse else None
    if sparse:
        held = sum(int((~k).sum()) for k in keep.values())
        log.info("%s: the input is sparse: %d zero weights of the transformer blocks stay zero while training", stage,
                 held)
    trainer.add_callback(sparsity.KeepMask(model, keep, l1))
    return True


def clear_checkpoints(folder: str | Path) -> None:
    if dist.is_main():
        for p in _checkpoints(Path(folder)):
            shutil.rmtree(p, ignore_errors=True)


class CheckpointMarker(TrainerCallback):
    """Writes the stage fingerprint into each checkpoint once the Trainer has finished saving it."""

    def __init__(self, fingerprint: str, recipe: str):
        self.fingerprint, self.recipe = fingerprint, recipe

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            tmp = folder / (MARKER + ".tmp")
            tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "recipe": self.recipe,
                                       "step": state.global_step}) + "\n")
            tmp.replace(folder / MARKER)
