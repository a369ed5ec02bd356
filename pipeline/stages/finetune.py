"""Fine-tune: full fine-tuning of a causal LM on packed text blocks with `transformers.Trainer`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline import data, models
from pipeline.checkpoint import save_model, staging, write_record
from pipeline.context import Context, begin
from pipeline.training import TrainConfig, train, training_args


@dataclass
class FinetuneConfig(TrainConfig):
    enabled: bool = True
    input: str = "auto"  # model folder to fine-tune; auto = the base model


def run(cfg: FinetuneConfig, ctx: Context) -> Path:
    from transformers import Trainer, default_data_collator, set_seed

    stage = begin(ctx, "finetune", cfg)
    if stage is None:
        return ctx.run_dir / "finetune"
    set_seed(ctx.seed)
    model, tokenizer = models.load_folder(ctx.inputs["finetune"])
    tokenized = data.prepare(ctx.data, tokenizer, ctx.seed)
    blocks = data.pack(tokenized, ctx.data.block_size, ctx.data.max_train_blocks)
    trainer = Trainer(
        model=model,
        args=training_args(cfg, ctx.run_dir / ".trainer" / "finetune", ctx.seed),
        train_dataset=blocks["train"],
        data_collator=default_data_collator,
        processing_class=tokenizer,
    )
    metrics = train(trainer, ctx.data.block_size)
    with staging(stage.out) as tmp:
        save_model(tmp, trainer.model, tokenizer)
        write_record(tmp, stage.record(
            ctx,
            metrics={"params": models.count_params(trainer.model), **metrics},
            tags=["fine-tuned"],
            summary=f"Full fine-tune for {metrics['train_steps']} steps ({metrics['train_tokens']} tokens).",
        ))
    return stage.out
