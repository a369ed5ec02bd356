"""Distill: a student made of a subset of the teacher's layers, trained on KD + LM loss."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Trainer

from pipeline import data, models
from pipeline.checkpoint import save_model, staging, write_record
from pipeline.context import Context, StageError, begin
from pipeline.training import TrainConfig, train, training_args


@dataclass
class DistillConfig(TrainConfig):
    enabled: bool = True
    input: str = "auto"  # teacher folder; auto = the fine-tuned model (or base if fine-tuning is off)
    every: int = 2  # keep every n-th teacher layer (DistilGPT2's initialisation)
    keep: int | None = None  # or: keep N evenly spaced layers, first and last included
    layers: list[int] | None = None  # or: exactly these teacher layer indices
    temperature: float = 2.0  # softens both distributions in the KD term
    alpha_kd: float = 0.5  # weight of T^2 * KL(teacher || student)
    alpha_ce: float = 0.5  # weight of the plain next-token cross-entropy
    learning_rate: float = 2e-4

    def check(self) -> list[str]:
        problems = super().check()
        if self.every < 1:
            problems.append(f"every: {self.every} must be at least 1")
        if self.keep is not None and self.keep < 1:
            problems.append(f"keep: {self.keep} must be at least 1")
        if self.keep is not None and self.layers is not None:
            problems.append("keep and layers: set only one of them")
        if self.temperature <= 0:
            problems.append(f"temperature: {self.temperature} must be positive")
        if self.alpha_kd < 0 or self.alpha_ce < 0 or self.alpha_kd + self.alpha_ce == 0:
            problems.append("alpha_kd/alpha_ce: must be non-negative and not both zero")
        return problems


def layer_map(cfg: DistillConfig, n_layers: int) -> list[int]:
    """Teacher layer indices the student keeps, in order."""
    if cfg.layers is not None:
        bad = [i for i in cfg.layers if not 0 <= i < n_layers]
        if bad or not cfg.layers:
            raise StageError(f"distill.layers: {bad or 'empty'} out of range; the teacher has layers 0..{n_layers - 1}")
        return list(cfg.layers)
    if cfg.keep is not None:
        if cfg.keep > n_layers:
            raise StageError(f"distill.keep: {cfg.keep} is more than the teacher's {n_layers} layers")
        if cfg.keep == 1:
            return [0]
        return sorted({round(i * (n_layers - 1) / (cfg.keep - 1)) for i in range(cfg.keep)})
    return list(range(0, n_layers, cfg.every))


def decoder_layers(model) -> torch.nn.ModuleList:
    """The model's stack of transformer blocks (GPT-2's `h`, Llama's `layers`, ...)."""
    n = model.config.num_hidden_layers
    stacks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n]
    if not stacks:
        raise StageError(f"distill: cannot find the {n} decoder layers of {type(model).__name__}")
    return stacks[0]


def student_from_teacher(teacher, keep: list[int]):
    """Copy the teacher, keeping only layers `keep` (embeddings, norms and head are shared copies)."""
    student = copy.deepcopy(teacher)
    stack = decoder_layers(student)
    kept = [stack[i] for i in keep]
    parent = next(m for m in student.modules() if any(c is stack for c in m.children()))
    name = next(n for n, c in parent.named_children() if c is stack)
    setattr(parent, name, torch.nn.ModuleList(kept))
    for new_idx, layer in enumerate(kept):
        for mod in layer.modules():  # KV-cache slots are addressed by layer index
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = new_idx
    student.config.num_hidden_layers = len(keep)
    if isinstance(getattr(student.config, "layer_types", None), list):
        student.config.layer_types = [student.config.layer_types[i] for i in keep]
    return student


class DistillTrainer(Trainer):
    """Trainer whose loss is alpha_kd * T^2 * KL(teacher/T || student/T) + alpha_ce * CE."""

    def __init__(self, *args, teacher, temperature: float, alpha_kd: float, alpha_ce: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False).to(self.args.device)
        self.temperature, self.alpha_kd, self.alpha_ce = temperature, alpha_kd, alpha_ce

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        ce = outputs.loss
        loss = self.alpha_ce * ce
        if self.alpha_kd > 0:
            with torch.no_grad():
                t_logits = self.teacher(input_ids=inputs["input_ids"]).logits
            kd = kd_loss(outputs.logits, t_logits, inputs["labels"], self.temperature)
            loss = loss + self.alpha_kd * kd
        return (loss, outputs) if return_outputs else loss


def kd_loss(s_logits, t_logits, labels, temperature: float) -> torch.Tensor:
    """Token-averaged T^2 * KL(teacher || student) over positions that carry a label."""
    mask = labels[:, 1:] != -100  # logits at position i predict token i+1
    s = s_logits[:, :-1][mask].float() / temperature
    t = t_logits[:, :-1][mask].float() / temperature
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
    return kl * temperature**2


def run(cfg: DistillConfig, ctx: Context) -> Path:
    from transformers import default_data_collator, set_seed

    stage = begin(ctx, "distill", cfg)
    if stage is None:
        return ctx.run_dir / "distill"
    set_seed(ctx.seed)
    teacher, tokenizer = models.load_folder(ctx.inputs["distill"])
    keep = layer_map(cfg, teacher.config.num_hidden_layers)
    student = student_from_teacher(teacher, keep)
    tokenized = data.prepare(ctx.data, tokenizer, ctx.seed)
    blocks = data.pack(tokenized, ctx.data.block_size, ctx.data.max_train_blocks)
    trainer = DistillTrainer(
        model=student,
        args=training_args(cfg, ctx.run_dir / ".trainer" / "distill", ctx.seed),
        train_dataset=blocks["train"],
        data_collator=default_data_collator,
        processing_class=tokenizer,
        teacher=teacher,
        temperature=cfg.temperature,
        alpha_kd=cfg.alpha_kd,
        alpha_ce=cfg.alpha_ce,
    )
    metrics = train(trainer, ctx.data.block_size)
    t_params, s_params = models.count_params(teacher), models.count_params(trainer.model)
    with staging(stage.out) as tmp:
        save_model(tmp, trainer.model, tokenizer)
        write_record(tmp, stage.record(
            ctx,
            metrics={"params": s_params, "teacher_params": t_params,
                     "params_ratio": round(s_params / t_params, 4), **metrics},
            layer_map=keep,
            tags=["distillation"],
            summary=f"Student with teacher layers {keep} ({len(keep)} of {teacher.config.num_hidden_layers}), "
            f"trained with {cfg.alpha_kd} x KD (T={cfg.temperature}) + {cfg.alpha_ce} x CE.",
        ))
    return stage.out
