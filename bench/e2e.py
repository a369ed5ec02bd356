"""End to end: wall time and peak memory of each stage of a recipe (the quick start by default), each
stage a fresh process as `make all` would run it; writes bench/results/e2e.json."""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import common

from pipeline import recipe as recipes
from pipeline import runner

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--recipe", default=str(common.ROOT / "recipes" / "quickstart.yaml"))
    p.add_argument("overrides", nargs="*", help="recipe key=value overrides")
    p.add_argument("--smoke", action="store_true", help="tiny random model with a few steps: checks the script runs")
    p.add_argument("--out", type=Path, default=None, help="result file (default bench/results/e2e.json)")
    return p.parse_args(argv)


def run_stage(recipe: str, stage: str, overrides: list[str]) -> dict:
    """One stage in a child process; wait4 gives that child's own peak RSS."""
    # no --force: the output folder is fresh, so every stage runs, and what one stage measured is reused by the
    # next as on a user's first `make all`
    cmd = [sys.executable, "-m", "pipeline", "run", recipe, "--stages", stage, *overrides]
    _, proc = common.run_child(cmd, f"stage {stage}")
    return {"seconds": proc["wall_seconds"], "peak_rss_mb": round(proc["peak_rss_mb"], 1)}


def report_summary(path: Path) -> dict:
    """What the run's report says of each model: the quality the timed run bought."""
    import json

    if not path.is_file():
        return {}
    out = {}
    for row in json.loads(path.read_text())["models"]:
        out[row["name"]] = {
            "params": row.get("params"), "disk_mb": row.get("disk_mb"), "perplexity": round(row["perplexity"], 3),
            "repetition_4gram": row.get("repetition_4gram"),
            "tasks": {t: v.get("acc") for t, v in (row.get("tasks") or {}).items() if "acc" in v},
            # every text it was scored on (the validation split first, then general English): perplexity, and
            # KL divergence / top-1 agreement against the run's reference (the fine-tuned model)
            "texts": {e["dataset"]: {k: round(e[k], 4) for k in ("perplexity", "kl", "top1") if k in e}
                      for e in row.get("evaluations", [])},
            "speed_noisy": row.get("speed_noisy"),
        }
        quantization = row.get("quantization") or {}
        if quantization.get("chosen"):  # which quantization the run shipped, and every candidate the gate measured
            out[row["name"]]["chosen"] = quantization["chosen"]
            out[row["name"]]["candidates"] = [
                {k: c.get(k) for k in ("name", "status", "disk_mb", "quality", "kl", "top1")}
                for c in quantization.get("candidates") or [] if c.get("disk_mb") is not None]
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    out_dir = Path(tempfile.mkdtemp(prefix="e2e-"))
    overrides = [f"output_dir={out_dir}", *args.overrides]
    if args.smoke:
        folder = common.tiny_folder(out_dir)
        # check_source=false: a random tiny model, which the load stage's source gate refuses
        overrides += [f"model={folder}", "check_source=false", "data.block_size=64", "data.max_train_blocks=16",
                      "finetune.max_steps=2", "distill.max_steps=2", "evaluate.max_tokens=256", "evaluate.repeats=1",
                      "evaluate.new_tokens=2", "evaluate.generation.max_new_tokens=2"]
    # The recipe decides the chain (prune, for one, is on in the quick start and off by default).
    run = recipes.load(args.recipe, overrides)
    chain = runner.enabled_stages(run)
    stages = {stage: run_stage(args.recipe, stage, overrides) for stage in chain}
    result = {
        "report": report_summary(run.run_dir / "report.json"),
        "settings": {"recipe": Path(args.recipe).name, "overrides": args.overrides, "smoke": args.smoke,
                     "note": "each stage in its own process in a fresh output folder, as `make all` on a fresh machine"},
        "stages": stages,
        "total_seconds": round(sum(s["seconds"] for s in stages.values()), 1),
        "max_peak_rss_mb": max(s["peak_rss_mb"] for s in stages.values()),
    }
    common.save("e2e", result, args.out)
    plot = run.run_dir / "report.png"
    if plot.is_file() and not args.smoke:  # the README shows the quick start's frontier from this run
        import shutil

        shutil.copy(plot, (args.out or common.RESULTS / "e2e.json").with_name("e2e-report.png"))
    print(f"stage folders and report: {out_dir}")
    return result


if __name__ == "__main__":
    main()
