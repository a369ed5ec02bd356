"""Training knobs shared by the fine-tune and distill stages, mapped onto `TrainingArguments`."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

Scheduler = Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial"]


@dataclass
class TrainConfig:
    max_steps: int = -1  # optimizer steps; -1 trains for `epochs` instead
    epochs: float = 1.0  # passes over the training blocks when max_steps is -1
    batch_size: int = 4  # blocks per device per step
    grad_accum: int = 1  # gradient accumulation steps
    learning_rate: float = 5e-5
    lr_scheduler: Scheduler = "linear"
    warmup_ratio: float = 0.0  # fraction of steps spent warming up the learning rate
    weight_decay: float = 0.0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on GPUs that support it, else fp32
    logging_steps: int = 10

    def check(self) -> list[str]:
        problems = []
        if self.max_steps == 0 or self.max_steps < -1:
            problems.append(f"max_steps: {self.max_steps} must be positive, or -1 to use epochs")
        if self.max_steps == -1 and self.epochs <= 0:
            problems.append(f"epochs: {self.epochs} must be positive when max_steps is -1")
        for key in ("batch_size", "grad_accum", "logging_steps"):
            if getattr(self, key) < 1:
                problems.append(f"{key}: {getattr(self, key)} must be at least 1")
        if self.learning_rate <= 0:
            problems.append(f"learning_rate: {self.learning_rate} must be positive")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"warmup_ratio: {self.warmup_ratio} must be in [0, 1)")
        return problems


def _precision_flags(precision: str) -> dict:
    cuda = torch.cuda.is_available()
    if precision == "auto":
        precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def training_args(cfg: TrainConfig, output_dir: Path, seed: int):
    from transformers import TrainingArguments

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
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        **_precision_flags(cfg.precision),
    )


def train(trainer, block_size: int) -> dict:
    """Run `trainer` and summarise what it did: first/last logged loss, tokens, speed."""
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    steps = trainer.state.global_step
    args = trainer.args
    tokens = steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * block_size
    tokens *= max(1, args.world_size)
    runtime = result.metrics.get("train_runtime", float("nan"))
    return {
        "train_loss_first": losses[0] if losses else math.nan,
        "train_loss_last": losses[-1] if losses else math.nan,
        "train_loss_mean": result.training_loss,
        "train_steps": steps,
        "train_tokens": tokens,
        "train_seconds": round(runtime, 2),
        "train_tokens_per_s": round(tokens / runtime, 1) if runtime else math.nan,
    }
