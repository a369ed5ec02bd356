"""Does the KD loss earn its place? Same student, same tokens: KD + CE against CE only.

Teacher: SmolLM2-135M (default: the offline alias; any model folder works). Student: every other
teacher layer (15 of 30), initialised from the teacher as DistilGPT2 was. Each variant trains on
exactly the same blocks, in the same order, for the same number of tokens, then is scored with
sliding-window perplexity on the held-out stdlib split and on the start of WikiText-2 test.

    python bench/distill.py                       # full bench, ~25 min on 2 CPU cores
    python bench/distill.py --teacher runs/quickstart/base --train-tokens 40960
    python bench/distill.py --smoke --teacher tests-tiny-model-folder --out /tmp/d.json

Writes bench/results/distill.json (or --out) and prints it.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "test.txt"
if not WIKITEXT.is_file():
    WIKITEXT = Path("/work/shared/data/wikitext-2/test.txt")

# Variant name -> loss weights; `ce` is the baseline the KD term has to beat.
VARIANTS = {
    "kd": lambda a: {"alpha_kd": a.alpha_kd, "alpha_ce": a.alpha_ce, "alpha_cos": a.alpha_cos},
    "ce": lambda a: {"alpha_kd": 0.0, "alpha_ce": 1.0, "alpha_cos": 0.0},
}
SMOKE = {"train_tokens": 256, "block_size": 32, "batch_size": 2, "eval_context": 32, "eval_stride": 16,
         "stdlib_tokens": 256, "wiki_tokens": 256}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default="smollm2-135m", help="model folder, .gguf file or alias")
    p.add_argument("--every", type=int, default=2, help="student keeps teacher layers 0, every, 2*every, ...")
    p.add_argument("--train-tokens", type=int, default=81920, help="training tokens per variant (rounded to whole steps)")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=float, default=0.1, help="warmup fraction of the steps")
    p.add_argument("--scheduler", default="cosine")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--alpha-kd", type=float, default=0.5)
    p.add_argument("--alpha-ce", type=float, default=0.5)
    p.add_argument("--alpha-cos", type=float, default=0.0)
    p.add_argument("--kl", choices=["forward", "reverse"], default="forward")
    p.add_argument("--teacher-precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--variants", default="kd,ce", help=f"comma-separated subset of {', '.join(VARIANTS)}")
    p.add_argument("--eval-context", type=int, default=256)
    p.add_argument("--eval-stride", type=int, default=128)
    p.add_argument("--stdlib-tokens", type=int, default=0, help="validation tokens scored (0 = the whole split)")
    p.add_argument("--wiki-tokens", type=int, default=32768, help="first N tokens of WikiText-2 test (0 = skip)")
    p.add_argument("--wikitext", default=str(WIKITEXT))
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "distill.json"))
    p.add_argument("--smoke", action="store_true", help="tiny sizes for a quick check (pair with a tiny --teacher)")
    args = p.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        p.error(f"--variants: unknown {', '.join(sorted(unknown))}; choose from {', '.join(VARIANTS)}")
    if args.train_tokens < args.block_size * args.batch_size:
        p.error(f"--train-tokens must be at least one step ({args.block_size * args.batch_size} tokens)")
    return args


def load_teacher(name: str):
    from pipeline import models

    source = models.resolve(name)
    return models.load_model(source), models.load_tokenizer(source)


def eval_streams(args, tokenizer) -> dict[str, list[int]]:
    from pipeline import data

    cfg = data.DataConfig(block_size=args.block_size)
    tokenized = data.prepare(cfg, tokenizer, args.seed)
    streams = {"stdlib": data.eval_stream(tokenized["validation"])[: args.stdlib_tokens or None]}
    if args.wiki_tokens:
        # 8 characters per token is a generous upper bound: tokenizing the whole file would waste a minute
        text = Path(args.wikitext).read_text()[: args.wiki_tokens * 8]
        streams["wikitext2"] = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"][: args.wiki_tokens]
    return streams, tokenized


def score(model, streams, args) -> dict:
    from pipeline.metrics import perplexity

    out = {}
    for name, ids in streams.items():
        started = time.time()
        r = perplexity(model, ids, args.eval_context, args.eval_stride)
        seconds = time.time() - started
        out[name] = {"ppl": round(r["perplexity"], 4), "scored_tokens": r["scored_tokens"],
                     "forward_tokens_per_s": round(len(ids) * args.eval_context / args.eval_stride / seconds, 1)}
        print(f"  {name}: ppl {r['perplexity']:.3f} on {r['scored_tokens']} tokens ({seconds:.0f}s)", flush=True)
    return out


def train_variant(name, weights, teacher, tokenizer, blocks, args, workdir) -> tuple:
    import copy

    from transformers import default_data_collator, set_seed

    from pipeline import models
    from pipeline.stages.distill import DistillConfig, DistillTrainer, build_student, teacher_dtype
    from pipeline.training import train, training_args

    set_seed(args.seed)
    steps = args.train_tokens // (args.block_size * args.batch_size)
    cfg = DistillConfig(every=args.every, max_steps=steps, batch_size=args.batch_size, learning_rate=args.lr,
                        lr_scheduler=args.scheduler, warmup_ratio=args.warmup, temperature=args.temperature,
                        kl=args.kl, teacher_precision=args.teacher_precision,
                        logging_steps=max(1, steps // 20), **weights)
    problems = cfg.check()
    if problems:
        raise SystemExit(f"bad settings: {problems}")
    student, keep = build_student(cfg, teacher, tokenizer)
    targs = training_args(cfg, Path(workdir) / name, args.seed)
    t_dtype = teacher_dtype(cfg.teacher_precision, targs.device)
    if t_dtype != next(teacher.parameters()).dtype:  # keep the fp32 teacher intact for the next variant
        teacher = copy.deepcopy(teacher)
    trainer = DistillTrainer(model=student, args=targs, train_dataset=blocks, data_collator=default_data_collator,
                             teacher=teacher, temperature=cfg.temperature, alpha_kd=cfg.alpha_kd,
                             alpha_ce=cfg.alpha_ce, alpha_cos=cfg.alpha_cos, kl=cfg.kl,
                             teacher_dtype=t_dtype)
    metrics = train(trainer, args.block_size)
    losses = [round(h["loss"], 4) for h in trainer.state.log_history if "loss" in h]
    return trainer.model, keep, {**metrics, "losses": losses, "params": models.count_params(trainer.model)}


def machine() -> dict:
    info = common.machine()  # plus the load around the run: speeds on a shared CPU need it
    return {**info, "cuda": info["gpu"] is not None, "platform": platform.platform(),
            "load_avg_start": [round(x, 2) for x in os.getloadavg()]}


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.time()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from pipeline import data, models
    from pipeline.records import versions

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    info = machine()
    print(f"teacher {args.teacher}", flush=True)
    teacher, tokenizer = load_teacher(args.teacher)
    streams, tokenized = eval_streams(args, tokenizer)
    blocks = data.pack(tokenized, args.block_size)["train"]
    print("teacher perplexity:", flush=True)
    teacher_scores = score(teacher, streams, args)
    result = {
        "bench": "distill",
        "teacher": {"model": args.teacher, "params": models.count_params(teacher),
                    "layers": teacher.config.num_hidden_layers, "scores": teacher_scores},
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "machine": info,
        "versions": versions(),
        "variants": {},
    }
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.variants.split(","):
            weights = VARIANTS[name](args)
            print(f"variant {name}: {weights}", flush=True)
            student, keep, m = train_variant(name, weights, teacher, tokenizer, blocks, args, workdir)
            scores = score(student, streams, args)
            result["variants"][name] = {
                **weights,
                "student_ppl": {k: v["ppl"] for k, v in scores.items()},
                "teacher_ppl": {k: v["ppl"] for k, v in teacher_scores.items()},
                "ratio": {k: round(v["ppl"] / teacher_scores[k]["ppl"], 4) for k, v in scores.items()},
                "params": m["params"],
                "params_ratio": round(m["params"] / result["teacher"]["params"], 4),
                "layer_map": keep,
                "train_tokens": m["train_tokens"],
                "train_steps": m["train_steps"],
                "tokens_per_s": m["train_tokens_per_s"],
                "train_seconds": m["train_seconds"],
                "forward_tokens_per_s": {k: v["forward_tokens_per_s"] for k, v in scores.items()},
                "losses": m["losses"],
            }
            del student
            gc.collect()
    v = result["variants"]
    if "kd" in v and "ce" in v:
        result["kd_beats_ce"] = {k: v["kd"]["student_ppl"][k] < v["ce"]["student_ppl"][k] for k in streams}
    result["machine"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["seconds"] = round(time.time() - started, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("teacher", "variants", "seconds")}, indent=1))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
