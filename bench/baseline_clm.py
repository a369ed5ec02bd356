"""The plain Hugging Face way, as run_clm.py does it: load, tokenize, group_texts, Trainer.train().
Used by bench/finetune.py as the baseline our finetune stage is compared against."""
from __future__ import annotations

import argparse
import json
import time
from itertools import chain


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True, help="model folder")
    p.add_argument("--train-file", required=True, help="JSONL with a `text` column")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-steps", type=int, default=20)
    p.add_argument("--learning-rate", type=float, default=5e-5)
    p.add_argument("--lora", action="store_true", help="LoRA r=8 on the attention and MLP projections (peft)")
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (run_clm.py's --bf16)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--output-dir", required=True)
    args = p.parse_args(argv)
    started = time.perf_counter()

    import torch
    from datasets import load_dataset
    from transformers import (AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments,
                              default_data_collator)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    if args.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM",
                                                 target_modules="all-linear"))
    raw = load_dataset("json", data_files=args.train_file, split="train")
    raw = raw.train_test_split(test_size=0.1, seed=args.seed)["train"]

    def tokenize_function(examples):
        return tokenizer([t + tokenizer.eos_token for t in examples["text"]])

    def group_texts(examples):  # run_clm.py's grouping, verbatim in spirit
        concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
        total_length = len(concatenated["input_ids"]) // args.block_size * args.block_size
        result = {k: [t[i : i + args.block_size] for i in range(0, total_length, args.block_size)]
                  for k, t in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    tokenized = raw.map(tokenize_function, batched=True, remove_columns=raw.column_names)
    lm_dataset = tokenized.map(group_texts, batched=True)
    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate, report_to="none", save_strategy="no", seed=args.seed,
        logging_steps=10, disable_tqdm=True, bf16=args.bf16,
        use_cpu=not torch.cuda.is_available(),  # run_clm.py's --use_cpu; needed for --bf16 on a CPU
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=lm_dataset,
                      data_collator=default_data_collator, processing_class=tokenizer)
    result = trainer.train()
    tokens = trainer.state.global_step * args.batch_size * args.block_size
    print(json.dumps({
        "train_tokens": tokens,
        "train_seconds": result.metrics["train_runtime"],
        "train_tokens_per_s": tokens / result.metrics["train_runtime"],
        "train_loss": result.training_loss,
        "wall_seconds": time.perf_counter() - started,
    }))


if __name__ == "__main__":
    main()
