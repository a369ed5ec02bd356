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


def run_chain(recipe: str, overrides: list[str], chain: list[str]) -> tuple[dict, float]:
    """The whole chain in one child process, as `make all` runs it: each stage's wall seconds (the runner's own
    "done in" line) and peak RSS (the child's VmRSS sampled every 20 ms, each sample charged to the stage whose
    "=== stage ===" line came last); the child's total wall time includes its imports, once."""
    import re
    import subprocess
    import time

    cmd = [sys.executable, "-m", "pipeline", "run", recipe, *overrides]
    peaks = dict.fromkeys(chain, 0.0)
    current = None
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.NamedTemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=common.ROOT, stdout=out, stderr=err, text=True)  # files: no pipe stalls
        with open(err.name) as log:
            while proc.poll() is None:
                for line in log.read().splitlines():
                    m = re.search(r"=== (\w+) ===", line)
                    current = m.group(1) if m and m.group(1) in peaks else current
                rss = _rss_mb(proc.pid)
                if current and rss:
                    peaks[current] = max(peaks[current], rss)
                time.sleep(0.02)
        wall = time.perf_counter() - started
        err.seek(0)
        stderr = err.read()
    if proc.returncode != 0:
        raise SystemExit(f"make all failed:\n{stderr[-3000:]}")
    took = {m.group(1): float(m.group(2)) for m in re.finditer(r"\] (\w+): done in ([\d.]+)s", stderr)}
    missing = [s for s in chain if s not in took]
    if missing:
        raise SystemExit(f"no 'done in' line for {missing} in the run's log")
    return {s: {"seconds": round(took[s], 1), "peak_rss_mb": round(peaks[s], 1)} for s in chain}, wall


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next(int(line.split()[1]) / 1024 for line in fh if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0.0


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
    # no --force: the output folder is fresh, so every stage runs, and what one stage measured is reused by the
    # next, as on a user's first `make all`
    stages, wall = run_chain(args.recipe, overrides, chain)
    result = {
        "report": report_summary(run.run_dir / "report.json"),
        "settings": {"recipe": Path(args.recipe).name, "overrides": args.overrides, "smoke": args.smoke,
                     "note": "one process in a fresh output folder, as on a fresh machine (total: its wall time, "
                             "imports included)"},
        "stages": stages,
        "total_seconds": round(wall, 1),
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
