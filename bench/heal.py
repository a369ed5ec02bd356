"""Does the model's own text keep a cut student's general English? The compress bench's cut, calibrated and healed
on the recipe's text alone or with text the fine-tuned model writes itself (`prune.own_text`, `distill.own_text`),
at several healing budgets (multiples of the quick start's KD tokens).

Each run is one `bench/compress.py` variant (same teacher, same scores: the quick start's validation split and the
start of WikiText-2 test, which no model trained or calibrated on) with the setting's overrides; every setting and
budget runs in this one process, side by side with the recipe-text baseline.

    python bench/heal.py                                   # width-80 x {recipe text, own text} x {1x, 4x}: ~35 min
    python bench/heal.py --budgets 1 --variants width-80 --out /tmp/h.json
    python bench/heal.py --smoke --out /tmp/h.json         # tiny Llama, a few minutes

Writes bench/results/heal.json.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import common
import compress

ROOT = common.ROOT

# name -> overrides of the quick start's recipe. own text: the fine-tuned model writes OWN_TOKENS per budget
# multiple once (so that it lasts as long as the recipe's text in the mix); importance is measured on it and the
# recipe's text equally (weight 1), and it is a fifth of the KD blocks (weight 0.25: at weight 1 the validation
# split lost more than WikiText-2 gained, measured while choosing)
OWN_TOKENS = 8192
SETTINGS = {
    "recipe-text": [],
    "own-text": ["prune.own_text.tokens={tokens}", "distill.own_text.tokens={tokens}", "distill.own_text.weight=0.25"],
}
PRUNED = [name for name, (kind, _) in compress.VARIANTS.items() if kind == "prune"]  # own text reaches prune's cut
SMOKE_SETTINGS = ["prune.own_text.tokens=128", "prune.own_text.length=16", "distill.own_text.tokens=128",
                  "distill.own_text.length=16"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default="width-80",
                   help=f"comma-separated compress.py variants that prune ({', '.join(PRUNED)})")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated subset of {', '.join(SETTINGS)}")
    p.add_argument("--budgets", default="1,4", help="healing budgets: multiples of the quick start's distill.max_steps")
    p.add_argument("--teacher", default=None, help="fine-tuned model folder (default: the quick start's finetune/)")
    p.add_argument("--work", default=str(ROOT / "runs" / "bench-heal"), help="where the runs go")
    p.add_argument("--out", default=str(common.RESULTS / "heal.json"))
    p.add_argument("--smoke", action="store_true", help="tiny Llama teacher and sizes, for a quick check")
    args = p.parse_args(argv)
    for name, allowed in (("variants", PRUNED),
                          ("settings", list(SETTINGS))):
        unknown = set(getattr(args, name).split(",")) - set(allowed)
        if unknown:
            p.error(f"--{name}: unknown {', '.join(sorted(unknown))}; choose from {', '.join(allowed)}")
    try:
        args.budgets = [int(b) for b in args.budgets.split(",")]
    except ValueError:
        p.error(f"--budgets: '{args.budgets}' is not a comma-separated list of whole numbers")
    if min(args.budgets) < 1:
        p.error("--budgets: each budget is at least 1 (a multiple of the quick start's distill.max_steps)")
    return args


def kd_steps(smoke: bool) -> int:
    """The quick start's KD steps (a budget of 1), or the smoke runs' ones."""
    from pipeline import recipe

    if smoke:
        return next(int(o.split("=")[1]) for o in compress.SMOKE_OVERRIDES if o.startswith("distill.max_steps="))
    return recipe.load(ROOT / "recipes" / "quickstart.yaml").distill.max_steps


def main(argv=None) -> None:
    args = parse_args(argv)
    steps = kd_steps(args.smoke)
    result = {"settings": {"recipe": "recipes/quickstart.yaml", "variants": args.variants.split(","),
                           "budgets": args.budgets, "distill_max_steps": steps,
                           "overrides": {s: SETTINGS[s] for s in args.settings.split(",")},
                           "own_tokens_per_budget": OWN_TOKENS},
              "teacher": None, "runs": []}
    tmp = tempfile.TemporaryDirectory()
    for variant in args.variants.split(","):
        for budget in args.budgets:
            for setting in args.settings.split(","):
                name = f"{variant}-{setting}-{budget}x"
                extra = SMOKE_SETTINGS if args.smoke and SETTINGS[setting] else [
                    o.format(tokens=OWN_TOKENS * budget) for o in SETTINGS[setting]]
                out = Path(tmp.name) / f"{name}.json"
                cmd = ["--variants", variant, "--work", str(Path(args.work) / name), "--out", str(out),
                       *(["--teacher", args.teacher] if args.teacher else []), *(["--smoke"] if args.smoke else []),
                       *[f"--override={o}" for o in [*extra, f"distill.max_steps={steps * budget}"]]]
                compress.main(cmd)
                one = json.loads(out.read_text())
                result["teacher"] = result["teacher"] or one["teacher"]
                v = one["variants"][variant]
                result["runs"].append({"name": name, "variant": variant, "setting": setting, "budget": budget,
                                       "kd_tokens": v["kd_tokens"], "params_ratio": v["params_ratio"],
                                       "seconds": v["seconds"], "zero_shot": v["zero_shot"],
                                       "after_kd": v["after_kd"], "ratio": v["ratio"]})
                common.save("heal", result, Path(args.out))  # after every run: a killed bench keeps what it had


if __name__ == "__main__":
    main()
