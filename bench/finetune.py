"""Fine-tuning throughput: our finetune stage vs a plain run_clm.py-style script (bench/baseline_clm.py),
same model, data, block size, batch and steps, run alternately in fresh processes; tokens/s of the
training loop, wall time and peak RSS of each process; writes bench/results/finetune.json."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import common

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--methods", default="full,lora", help="comma-separated: full, lora")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of (ours, baseline) per method")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="both sides train in this precision; auto = the pipeline's choice for this machine")
    p.add_argument("--smoke", action="store_true", help="tiny random model, a few steps: checks the script runs")
    p.add_argument("--out", type=Path, default=None, help="result file (default bench/results/finetune.json)")
    return p.parse_args(argv)


def run_child(cmd: list[str]) -> tuple[str, dict]:
    stdout, proc = common.run_child(cmd, " ".join(cmd[:5]))
    return stdout, {"wall_seconds": proc["wall_seconds"], "peak_mem_mb": round(proc["peak_rss_mb"])}


def ours(model: Path, method: str, args, out_dir: Path) -> dict:
    overrides = [f"output_dir={out_dir}", f"finetune.input={model}", f"finetune.max_steps={args.steps}",
                 f"finetune.batch_size={args.batch_size}", f"data.block_size={args.block_size}",
                 "finetune.warmup_ratio=0", "finetune.lr_scheduler=linear", "finetune.logging_steps=10",
                 f"finetune.precision={args.precision}"]
    if method == "lora":
        overrides += ["finetune.method=lora"]
    _, proc = run_child([sys.executable, "-m", "pipeline", "run", "recipes/quickstart.yaml", "--stages", "finetune",
                         "--force", *overrides])
    record = json.loads((out_dir / "quickstart" / "finetune" / "pipeline.json").read_text())
    return {"tok_s": record["metrics"]["train_tokens_per_s"], **proc}


def baseline(model: Path, method: str, args, out_dir: Path) -> dict:
    from pipeline import data

    cmd = [sys.executable, "bench/baseline_clm.py", "--model", str(model), "--train-file",
           str(data.stdlib_corpus_file()), "--block-size", str(args.block_size), "--batch-size",
           str(args.batch_size), "--max-steps", str(args.steps), "--output-dir", str(out_dir / "baseline")]
    if method == "lora":
        cmd.append("--lora")
    if args.precision == "bf16":
        cmd.append("--bf16")
    stdout, proc = run_child(cmd)
    result = json.loads(stdout.strip().splitlines()[-1])
    return {"tok_s": round(result["train_tokens_per_s"], 1), **proc}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.precision == "auto":  # resolve once, so the baseline trains in the same precision as ours
        from pipeline.training import precision_flags

        args.precision = "bf16" if precision_flags("auto")["bf16"] else "fp32"
    out_dir = Path(tempfile.mkdtemp(prefix="bench-ft-"))
    model = common.tiny_folder(out_dir) if args.smoke else common.smollm2_folder()
    if args.smoke:  # tiny model folders have no pipeline.json; the finetune stage reads one from its input
        from pipeline.folders import write_record
        from pipeline.records import StageRecord

        write_record(model, StageRecord(stage="base", recipe="smoke", fingerprint="smoke", parent="tests/tiny.py"))
    methods = [m.strip() for m in args.methods.split(",")]
    results = {}
    for method in methods:
        runs = {"ours": [], "baseline": []}
        for _ in range(args.rounds):  # alternate so drift in machine load hits both sides alike
            runs["ours"].append(ours(model, method, args, out_dir))
            runs["baseline"].append(baseline(model, method, args, out_dir))
        o = statistics.median(r["tok_s"] for r in runs["ours"])
        b = statistics.median(r["tok_s"] for r in runs["baseline"])
        results[method] = {
            "ours_tok_s": o, "baseline_tok_s": b, "ratio": round(o / b, 3),
            "peak_mem_mb": {"ours": max(r["peak_mem_mb"] for r in runs["ours"]),
                            "baseline": max(r["peak_mem_mb"] for r in runs["baseline"])},
            "wall_seconds": {"ours": statistics.median(r["wall_seconds"] for r in runs["ours"]),
                             "baseline": statistics.median(r["wall_seconds"] for r in runs["baseline"])},
            "runs": runs,
        }
    payload = {
        "settings": {"model": "tiny-llama (smoke)" if args.smoke else "SmolLM2-135M-Instruct (fp32 weights)",
                     "data": "stdlib pydoc topics, train split", "steps": args.steps, "batch_size": args.batch_size,
                     "block_size": args.block_size, "rounds": args.rounds, "precision": args.precision,
                     "tok_s": "training-loop tokens/s from Trainer's train_runtime; wall includes load and data prep"},
        **results,
    }
    common.save("finetune", payload, args.out)
    return payload


if __name__ == "__main__":
    main()
