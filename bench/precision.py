"""What bf16 mixed precision costs in quality: the quick start's fine-tune run in fp32 and in bf16
(same data, steps and seed), each then scored by the evaluate stage on the validation split; training
tokens/s alongside. Writes bench/results/precision.json."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import common

PRECISIONS = ["fp32", "bf16"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--recipe", default=str(common.ROOT / "recipes" / "quickstart.yaml"))
    p.add_argument("--smoke", action="store_true", help="tiny random model, a few steps: checks the script runs")
    p.add_argument("--out", type=Path, default=None, help="result file (default bench/results/precision.json)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-precision-"))
    overrides = ["evaluate.speed=false", "evaluate.samples=false", "evaluate.models=[base,finetune]",
                 "finetune.progress_bar=false"]
    if args.smoke:
        # check_source=false: random weights, which the load stage's source gate refuses
        overrides += [f"model={common.tiny_folder(tmp)}", "check_source=false", "data.block_size=64",
                      "data.max_train_blocks=16", "finetune.max_steps=2", "evaluate.max_tokens=256"]
    results = {}
    for precision in PRECISIONS:
        out_dir = tmp / precision
        common.run_child([sys.executable, "-m", "pipeline", "run", args.recipe, "--stages", "load,finetune,evaluate",
                          f"output_dir={out_dir}", f"finetune.precision={precision}", *overrides], precision)
        report = json.loads(next(out_dir.glob("*/report.json")).read_text())
        rows = {r["name"]: r for r in report["models"]}
        record = json.loads(next(out_dir.glob("*/finetune/pipeline.json")).read_text())["metrics"]
        results[precision] = {"perplexity": rows["finetune"]["perplexity"], "base_perplexity": rows["base"]["perplexity"],
                              "scored_tokens": rows["finetune"]["evaluations"][0]["scored_tokens"],
                              "train_loss_last": record["train_loss_last"], "train_tokens_per_s": record["train_tokens_per_s"]}
        print(precision, results[precision], flush=True)
    bf16, fp32 = results["bf16"], results["fp32"]
    payload = {
        "settings": {"recipe": Path(args.recipe).name, "overrides": overrides, "smoke": args.smoke,
                     "note": "finetune stage with finetune.precision=fp32|bf16, then the evaluate stage"},
        **results,
        "bf16_ppl_change_pct": round(100 * (bf16["perplexity"] / fp32["perplexity"] - 1), 2),
        "bf16_speedup": round(bf16["train_tokens_per_s"] / fp32["train_tokens_per_s"], 2),
    }
    common.save("precision", payload, args.out)
    return payload


if __name__ == "__main__":
    main()
