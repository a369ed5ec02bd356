"""Fine-tune: full, LoRA or QLoRA fine-tuning of a causal LM with `transformers.Trainer`.

The stage output is always a full-weight model (adapters are merged), so later stages never see
adapters; the LoRA adapter itself is kept in `adapter/` as a PEFT folder. Training checkpoints go to
`.trainer/finetune/` and an interrupted run resumes from the last one (see `pipeline.training.fit`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline import chat, data, dist, lora, models, qat, sparsity
from pipeline.context import Context, StageRun, begin
from pipeline.errors import StageError
from pipeline.folders import save_model, staging, write_record
from pipeline.lora import LoraSettings, QLoraSettings
from pipeline.training import (
    RUN_ONLY,
    TrainConfig,
    clear_checkpoints,
    fit,
    keep_sparse,
    sharded,
    training_args,
)

ADAPTER_DIR = "adapter"
log = logging.getLogger("pipeline")


@dataclass
class FinetuneConfig(TrainConfig):
    enabled: bool = True  # run this stage
    input: str = "auto"  # folder to read; `auto` = the previous enabled stage's output
    # `full` (all weights), `lora` (PEFT adapter on a frozen base), `qlora` (LoRA on a frozen 4-bit base)
    method: Literal["full", "lora", "qlora"] = "full"
    lora: LoraSettings = field(default_factory=LoraSettings)  # adapter settings (`lora` and `qlora`)
    qlora: QLoraSettings = field(default_factory=QLoraSettings)  # 4-bit base settings (`qlora`)
    # quantization-aware training on the grid a 4-bit candidate will ship: its keys are under
    # [Stage: quantize](#stage-quantize)
    qat: qat.QatSettings = field(default_factory=qat.QatSettings)
    # why: TrainConfig checkpoints nothing by default; a training stage does, so that a killed run resumes
    save_steps: int | None = field(default=200, metadata=RUN_ONLY)

    def check(self) -> list[str]:
        problems = super().check()
        if self.method == "qlora" and lora.bitsandbytes_missing():
            problems.append("method: qlora needs bitsandbytes (pip install bitsandbytes); or use method: lora")
        if self.l1 and self.method != "full":
            problems.append(f"l1: the L1 penalty shrinks the full weights; with method {self.method} they stay "
                            "frozen. Use method: full, or l1: 0")
        if self.qat.enabled and self.method != "full":
            problems.append(f"qat.enabled: quantization-aware training updates the full weights; with method "
                            f"{self.method} they stay frozen. Use method: full, or turn qat off")
        return problems


def _model(cfg: FinetuneConfig, folder: Path):
    """The model the Trainer updates: all weights (full) or a PEFT adapter on a frozen base."""
    if cfg.method == "qlora":
        return lora.add_adapter(lora.load_4bit(folder, cfg.qlora, cfg.gradient_checkpointing), cfg.lora)
    model = models.load_model(models.Source("folder", str(folder)))
    return model if cfg.method == "full" else lora.add_adapter(model, cfg.lora)


def _datasets(ctx: Context, tokenizer, evaluate: bool):
    """(train, validation or None, collator): packed text blocks, or one padded example per conversation."""
    from transformers import default_data_collator

    tokenized = data.prepare(ctx.data, tokenizer, ctx.seed)
    if ctx.data.format == "chat":
        sets = chat.examples(tokenized, ctx.data.block_size, ctx.data.max_train_blocks, ctx.data.source)
        collator = chat.collator(tokenizer)
    else:
        sets = data.text_blocks(ctx.data, tokenizer, ctx.seed)  # data.mix sources included
        collator = default_data_collator
    data.require_rows(sets, ("train", "validation") if evaluate else ("train",), "finetune", ctx.data,
                      "examples" if ctx.data.format == "chat" else "blocks")
    return sets["train"], sets["validation"] if evaluate else None, collator


def _gathered_state(trainer):
    """The whole state dict when FSDP/DeepSpeed split the weights across ranks (every rank must call this:
    they all take part in gathering); None when each rank already holds whole weights (one process, DDP)."""
    if not sharded(trainer):
        return None
    try:
        return trainer.accelerator.get_state_dict(trainer.model)
    except ValueError as err:  # DeepSpeed ZeRO-3 without 16-bit gathering
        raise StageError(f"finetune: cannot gather the trained weights from the ranks ({err}); in the DeepSpeed "
                         "config set zero_optimization.stage3_gather_16bit_weights_on_model_save: true") from err


def _save(cfg: FinetuneConfig, trainer, tokenizer, tmp: Path, stage: StageRun, folder: Path):
    """Write the full-weight model into `tmp` (and the adapter into tmp/adapter). Every rank calls this;
    rank 0 writes and gets the saved model back, the others get None. Adapters are always merged the same
    way, into the base reloaded from `folder`, so one-process, DDP and FSDP runs share one tested path."""
    state = _gathered_state(trainer)
    if not dist.is_main():
        return None
    model = trainer.accelerator.unwrap_model(trainer.model)
    if cfg.method == "full":
        save_model(tmp, model, tokenizer, state_dict=state)
        return model
    # A Hub PEFT folder names the model it adapts: the Hub id when we adapted the unmodified source model.
    base_id = stage.parent.base_model if stage.parent.stage == "base" else None
    model.peft_config["default"].base_model_name_or_path = base_id or str(folder)
    # Only linear layers are adapted; the default ("auto") would look the base up on the Hub to compare vocabularies.
    model.save_pretrained(tmp / ADAPTER_DIR, state_dict=state, save_embedding_layers=False)
    merged = lora.merged(folder, tmp / ADAPTER_DIR)
    save_model(tmp, merged, tokenizer)
    return merged


def _summary(cfg: FinetuneConfig, metrics: dict, targets) -> str:
    done = f"for {metrics['train_steps']} steps ({metrics['train_tokens']} tokens)"
    if cfg.method == "full":
        if cfg.qat.enabled:
            after = cfg.qat.fake_quant_after_n_steps
            return (f"Full quantization-aware fine-tune {done}: the block weights trained fake-quantized to "
                    f"{qat.describe(cfg.qat.grid)} (torchao){f' from step {after} on' if after else ''}, "
                    "saved as ordinary float weights; quantize them "
                    "with a 4-bit candidate on the same grid.")
        return f"Full fine-tune {done}."
    name = {"lora": "LoRA", "qlora": "QLoRA"}[cfg.method]
    base = f"a frozen 4-bit (bitsandbytes {cfg.qlora.quant_type}) base" if cfg.method == "qlora" else "a frozen base"
    return (f"{name} fine-tune {done}: rank-{cfg.lora.r} adapters (alpha {cfg.lora.alpha:g}) on "
            f"{', '.join(targets)} of {base}, merged into full-precision weights. "
            f"The adapter alone is in `{ADAPTER_DIR}/`.")


def run(cfg: FinetuneConfig, ctx: Context) -> Path:
    from transformers import Trainer, set_seed

    stage = begin(ctx, "finetune", cfg)
    if stage is None:
        return ctx.run_dir / "finetune"
    set_seed(ctx.seed)  # before the adapter is initialised
    folder = ctx.inputs["finetune"]
    if cfg.method != "full" and sparsity.record_of(folder) is not None:
        raise StageError(f"finetune.method: '{folder}' is sparse (its record says so), and merging a {cfg.method} "
                         "adapter would fill its zeros; use method: full (the zeros then stay fixed while it trains)")
    tokenizer = models.load_tokenizer(models.Source("folder", str(folder)))
    train_set, eval_set, collator = _datasets(ctx, tokenizer, evaluate=cfg.eval_steps is not None)
    model = _model(cfg, folder)
    if cfg.qat.enabled:
        reason = qat.refusal(model, cfg.qat)
        if reason:
            raise StageError(f"finetune.qat: {reason}")
        swapped = qat.prepare(model, cfg.qat)
        log.info("finetune: %d linear layers train fake-quantized to %s (torchao QAT)", swapped,
                 qat.describe(cfg.qat.grid))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    targets = sorted(model.peft_config["default"].target_modules) if cfg.method != "full" else None
    trainer = Trainer(
        model=model,
        args=training_args(cfg, ctx.run_dir / ".trainer" / "finetune", ctx.seed, evaluate=eval_set is not None,
                           count_tokens=ctx.data.format == "chat"),
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[qat.delayed_start(cfg.qat.fake_quant_after_n_steps)] if cfg.qat.enabled else None,
    )
    if cfg.method == "qlora" and sharded(trainer):
        raise StageError("finetune.method qlora: a 4-bit base is not sharded with FSDP/DeepSpeed here; use "
                         "method: lora (the base is sharded in full precision), or plain DDP (`accelerate launch` "
                         "without an FSDP/DeepSpeed config)")
    sparse = cfg.method == "full" and keep_sparse(trainer, model, folder, cfg.l1, "finetune")
    metrics = fit(trainer, cfg, stage.fingerprint, ctx.recipe, ctx.data.block_size, force=ctx.force)
    if cfg.qat.enabled:  # back to plain nn.Linear: the output is an ordinary float checkpoint
        qat.convert(trainer.model)
    with staging(stage.out) as tmp:
        saved = _save(cfg, trainer, tokenizer, tmp, stage, folder)
        kept = None
        if dist.is_main():
            metrics = {"params": models.count_params(saved), "trainable_params": trainable, **metrics}
            if sparse:
                kept = sparsity.trained_record(tmp, saved, tokenizer, folder, cfg.l1)
                metrics["sparsity"] = kept["sparsity"]
        write_record(tmp, stage.record(
            ctx,
            metrics=metrics,
            method=cfg.method,
            lora_targets=targets,
            qat={**cfg.qat.grid, "fake_quant_after_n_steps": cfg.qat.fake_quant_after_n_steps}
            if cfg.qat.enabled else None,
            sparsity=kept,
            tags=["fine-tuned"] + ([cfg.method] if cfg.method != "full" else []) + (["sparse"] if kept else []),
            summary=_summary(cfg, metrics, targets) + (f" {sparsity.training_note(kept)}" if kept else ""),
        ))
    clear_checkpoints(trainer.args.output_dir)
    return stage.out
