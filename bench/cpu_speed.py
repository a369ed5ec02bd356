"""What makes CPU fine-tuning faster here: torch threads, attention kernel (SDPA vs eager), bf16 autocast,
packing vs padding. Each variant trains the same model on the same stdlib blocks in a fresh process with
`transformers.Trainer`; the time per optimizer step is the median after warm-up steps. Tokens/s counts
real (non-padding) tokens. Writes bench/results/cpu-speed.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import common

VARIANTS = {  # name: settings that differ from the first variant, the pipeline's default (fp32, sdpa, all threads, packed)
    "default": {},
    "1-thread": {"threads": 1},
    "eager-attention": {"attn": "eager"},
    "bf16-autocast": {"bf16": True},
    "padded-documents": {"padded": True},
}
DEFAULT = {"threads": 0, "attn": "sdpa", "bf16": False, "padded": False}
SEED = 42


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per variant (the first 2 are warm-up)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ",".join(VARIANTS))
    p.add_argument("--smoke", action="store_true", help="tiny random model, a few steps: checks the script runs")
    p.add_argument("--out", default=None, help="result file (default bench/results/cpu-speed.json)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one variant, run in this process
    return p.parse_args(argv)


def _blocks(tokenizer, block: int, padded: bool):
    """Training examples from the stdlib corpus's train split: the pipeline's packed blocks, or one padded,
    truncated example per paragraph (line-by-line training, as run_clm's old --line_by_line did)."""
    from pipeline import data

    cfg = data.DataConfig(source="stdlib", block_size=block)
    if not padded:
        return data.pack(data.prepare(cfg, tokenizer, SEED), block)["train"]
    docs = data.load_splits(cfg, SEED)["train"][cfg.text_column]
    paragraphs = [p.strip() for doc in docs for p in doc.split("\n\n") if p.strip()]
    enc = tokenizer(paragraphs, truncation=True, max_length=block, padding="max_length")
    return [{"input_ids": i, "attention_mask": m, "labels": [t if k else -100 for t, k in zip(i, m)]}
            for i, m in zip(enc["input_ids"], enc["attention_mask"])]


def child(spec: dict) -> dict:
    import torch
    from transformers import (AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments,
                              default_data_collator)

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(spec["model"], attn_implementation=spec["attn"])
    examples = _blocks(tokenizer, spec["block_size"], spec["padded"])

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter())

    clock = StepClock()
    args = TrainingArguments(output_dir=spec["tmp"], max_steps=spec["steps"], per_device_train_batch_size=spec["batch_size"],
                             learning_rate=5e-5, bf16=spec["bf16"], use_cpu=True, report_to="none", save_strategy="no",
                             disable_tqdm=True, seed=SEED, dataloader_num_workers=0, logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=default_data_collator,
                      callbacks=[clock])
    trainer.train()
    steps = [b - a for a, b in zip(clock.times[1:], clock.times[2:])]  # step 1 and 2 are warm-up
    # real tokens per step: whole blocks when packed, the attention mask's ones when padded (batches are shuffled,
    # so the mean over all examples)
    real = [sum(e["attention_mask"]) if "attention_mask" in e else len(e["input_ids"]) for e in examples]
    tokens_per_step = statistics.mean(real) * spec["batch_size"]
    step_s = statistics.median(steps)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"step_s": round(step_s, 3), "real_tokens_per_step": round(tokens_per_step, 1),
            "tok_s": round(tokens_per_step / step_s, 1), "threads": torch.get_num_threads(),
            "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return {}
    import tempfile
    from pathlib import Path

    tmp = Path(tempfile.mkdtemp(prefix="bench-cpu-"))
    model = common.tiny_folder(tmp) if args.smoke else common.smollm2_folder()
    names = [n.strip() for n in args.variants.split(",")]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from: {', '.join(VARIANTS)}")
    results = {}
    for name in names:
        spec = {**DEFAULT, **VARIANTS[name], "model": str(model), "steps": args.steps, "batch_size": args.batch_size,
                "block_size": args.block_size, "tmp": str(tmp / "trainer")}
        done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                              cwd=common.ROOT)
        if done.returncode != 0:
            results[name] = {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
        else:
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(name, results[name], flush=True)
    base = results[names[0]].get("tok_s")
    for r in results.values():
        if base and "tok_s" in r:
            r["speedup"] = round(r["tok_s"] / base, 3)
    payload = {"settings": {"model": "tiny-llama (smoke)" if args.smoke else "SmolLM2-135M-Instruct",
                            "steps": args.steps, "batch_size": args.batch_size, "block_size": args.block_size,
                            "timing": "median optimizer-step time after 2 warm-up steps; tok_s counts real tokens",
                            "default": "fp32 weights, SDPA attention, all torch threads, packed blocks"},
               "variants": results}
    common.save("cpu-speed", payload, Path(args.out) if args.out else None)
    return payload


if __name__ == "__main__":
    main()
