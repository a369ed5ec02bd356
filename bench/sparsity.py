"""What does weight sparsity cost and save? prune.sparsity variants of SmolLM2-135M, zero-shot and healed.

Each variant (magnitude / Wanda / SparseGPT x 50% unstructured / 2:4) runs the prune stage with only
`prune.sparsity` set (calibration: the quick start's 64 blocks of its training split) on the teacher (default: the
quick start's fine-tuned model, made by its load and finetune stages when missing), then heals it with the quick
start's distill section on the fixed mask (60 steps x 4 x 128 tokens, teacher = the dense fine-tuned model).
Both models are scored by sliding-window perplexity on the quick start's validation split and the start of
WikiText-2 test (scored only: nothing is tuned on it), as bench/compress.py does. Sizes: every on-disk form the
records report (dense, bitmask, their int8 versions, each entropy-coded). Each row is checked against issue 31's
targets and placed against the structured cuts of bench/results/compress.json (size share vs perplexity ratio).

    python bench/sparsity.py                               # six variants, zero-shot + healed (~1 h idle, 2 cores)
    python bench/sparsity.py --variants 2:4-sparsegpt --no-heal
    python bench/sparsity.py --smoke --out /tmp/s.json     # tiny Llama, a minute
    python bench/sparsity.py --variants unstructured-50-sparsegpt \
        --override "prune.data.mix=[{source: ../shared/data/wikitext-2/valid.txt, weight: 0.33}]" \
        --override "distill.data.mix=[{source: ../shared/data/wikitext-2/valid.txt, weight: 0.33}]"  # general text too
    # ... and --override prune.calibration_blocks=256 --override distill.alpha_ce=1.0: sparsity-healed-tuned.json
"""
from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import common

ROOT = common.ROOT
# in the order they run (a killed run keeps the rows it finished): the likeliest to meet the targets first
VARIANTS = {
    "unstructured-50-sparsegpt": {"amount": 0.5, "method": "sparsegpt"},
    "unstructured-50-wanda": {"amount": 0.5, "method": "wanda"},
    "2:4-sparsegpt": {"pattern": "2:4", "method": "sparsegpt"},
    "2:4-wanda": {"pattern": "2:4", "method": "wanda"},
    "unstructured-50-magnitude": {"amount": 0.5, "method": "magnitude"},
    "2:4-magnitude": {"pattern": "2:4", "method": "magnitude"},
}
# issue 31: healed perplexity ratio to the dense fine-tuned model (validation, WikiText-2), and the sparse int8
# model's compressed files against the dense int8 model's
TARGETS = {"unstructured": {"validation": 1.10, "wikitext-2-test": 1.20},
           "2:4": {"validation": 1.25, "wikitext-2-test": 1.40}}
SIZE_TARGET = 0.60
OWN_OVERRIDES = ("finetune.enabled=false", "quantize.enabled=false", "evaluate.enabled=false",
                 "prune.enabled=true", "prune.target_params=null")
SMOKE_OVERRIDES = ["data.block_size=32", "data.max_train_blocks=16", "prune.calibration_blocks=4",
                   "distill.max_steps=2", "distill.batch_size=2", "distill.logging_steps=1"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default=None, help="model folder (default: the quick start's finetune/)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--no-heal", dest="heal", action="store_false", help="zero-shot only (no distill)")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--stride", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=4096, help="validation tokens scored (as the quick start)")
    p.add_argument("--wiki-tokens", type=int, default=8192, help="first N tokens of WikiText-2 test")
    p.add_argument("--wikitext", default=str(common.WIKITEXT_TEST))
    p.add_argument("--structured", default=str(common.RESULTS / "compress.json"),
                   help="the structured cuts to place each variant against")
    p.add_argument("--work", default=str(ROOT / "runs" / "bench-sparsity"), help="where the variants' runs go")
    p.add_argument("--out", default=str(common.RESULTS / "sparsity.json"))
    p.add_argument("--smoke", action="store_true", help="tiny Llama teacher, for a quick check")
    p.add_argument("--override", action="append", default=[],
                   help="recipe override for every variant (key=value), e.g. a general-text mix in prune.data and "
                        "distill.data, as bench/compress.py takes")
    return common.variant_args(p, argv, VARIANTS)


def frontier(share: float, ratio: dict, cuts: dict) -> dict:
    """Where a sparse model (`share` = its bitmask file over the dense teacher's: what it stores, as a structured
    cut's parameter ratio is) sits among the structured cuts healed by KD: those it beats on size and on every
    scored perplexity, and those that beat it on both."""
    def better(a_share, a_ratio, b_share, b_ratio) -> bool:
        return a_share <= b_share and all(a_ratio[k] <= b_ratio[k] for k in a_ratio if k in b_ratio)

    scored = {name: (c["params_ratio"], c["ratio"]) for name, c in cuts.items() if c.get("ratio")}
    return {"size_share": round(share, 3),
            "dominates": sorted(n for n, (s, r) in scored.items() if better(share, ratio, s, r)),
            "dominated_by": sorted(n for n, (s, r) in scored.items() if better(s, r, share, ratio))}


def main(argv=None) -> None:
    import torch

    from pipeline import data, formats, recipe, runner, sparsity
    from pipeline.metrics import perplexity

    args = parse_args(argv)
    tmp = tempfile.TemporaryDirectory()
    overrides = [f"output_dir={args.work}", *OWN_OVERRIDES, f"distill.enabled={str(args.heal).lower()}"]
    overrides += [*(SMOKE_OVERRIDES if args.smoke else []), *args.override]  # the caller's keys last: they win
    if args.smoke:
        tiny = recipe.load(ROOT / "recipes" / "quickstart.yaml",
                           [*overrides, "name=sparsity-teacher", "prune.enabled=false", "distill.enabled=false",
                            "check_source=false", f"model={common.tiny_folder(Path(tmp.name))}"])
        teacher_folder = runner.run(tiny, ["load"])["load"]  # a stage folder (with its record), as prune reads
    elif args.teacher:
        teacher_folder = Path(args.teacher)
    else:  # the quick start's fine-tuned model (its load and finetune stages, reused when up to date)
        qs = recipe.load(ROOT / "recipes" / "quickstart.yaml", [f"output_dir={ROOT / 'runs'}"])
        teacher_folder = runner.run(qs, ["load", "finetune"])["finetune"]
    base = recipe.load(ROOT / "recipes" / "quickstart.yaml", [*overrides, "prune.sparsity.amount=0.5"])
    teacher, tokenizer = formats.load_folder(teacher_folder, dtype=torch.float32)
    val_ids = data.eval_stream(data.prepare(base.data, tokenizer, base.seed)["validation"])[: args.max_tokens]
    wiki_path = Path(args.wikitext)
    wiki_text = wiki_path.read_text() if wiki_path.is_file() else None
    wiki = tokenizer(wiki_text, add_special_tokens=False, verbose=False)["input_ids"][: args.wiki_tokens] \
        if wiki_text else None
    structured_path = Path(args.structured)
    cuts = json.loads(structured_path.read_text())["variants"] if structured_path.is_file() else {}

    def scores(model) -> dict:
        out = {"validation": round(perplexity(model, val_ids, args.context, args.stride)["perplexity"], 3)}
        if wiki:
            out["wikitext-2-test"] = round(perplexity(model, wiki, args.context, args.stride)["perplexity"], 3)
        return out

    def scored(folder: Path) -> tuple[dict, dict]:
        model, _ = formats.load_folder(folder, dtype=torch.float32)
        ppl = scores(model)
        del model
        gc.collect()
        return ppl, {k: round(v / result["teacher"]["ppl"][k], 3) for k, v in ppl.items()}

    dense = sparsity.forms(teacher)
    shown = teacher_folder.resolve()  # relative to the repository when inside it, as compress.py does
    shown = shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown
    d = base.distill
    result = {"settings": {"teacher": str(shown), "recipe": "recipes/quickstart.yaml",
                           "overrides": overrides, "calibration_blocks": base.prune.calibration_blocks,
                           "block_size": base.data.block_size, "context": args.context, "stride": args.stride,
                           "validation_tokens": len(val_ids), "wikitext_tokens": len(wiki) if wiki else 0,
                           "healing": {"max_steps": d.max_steps, "batch_size": d.batch_size,
                                       "learning_rate": d.learning_rate, "alpha_kd": d.alpha_kd,
                                       "alpha_ce": d.alpha_ce,
                                       "data": "the recipe's training split" + (" with the overrides' distill.data"
                                                                                if any(o.startswith("distill.data")
                                                                                       for o in args.override) else ""),
                                       "mask": "fixed"} if args.heal else "none (zero-shot)",
                           "targets": {"ppl_ratio": TARGETS, "int8_compressed_vs_dense_int8_compressed": SIZE_TARGET},
                           "structured": str(structured_path.relative_to(ROOT)) if cuts and
                           structured_path.is_relative_to(ROOT) else str(structured_path)},
              "teacher": {"ppl": scores(teacher), "forms": dense}, "variants": {}}
    print("teacher", result["teacher"], flush=True)
    del teacher
    gc.collect()
    codec = dense["codec"]
    for name in args.variants.split(","):
        started = time.time()
        keys = [f"prune.sparsity.{k}={v}" for k, v in VARIANTS[name].items()]
        r = recipe.load(ROOT / "recipes" / "quickstart.yaml",
                        [*overrides, f"name=sparsity-{name.replace(':', '-')}", f"prune.input={teacher_folder}", *keys])
        folder = runner.run(r, ["prune"], force=True)["prune"]
        rec = json.loads((folder / "pipeline.json").read_text())
        ppl, ratio = scored(folder)
        forms = rec["sparsity"]["forms"]
        row = {"settings": VARIANTS[name], "sparsity": rec["sparsity"]["sparsity"],
               "zero_shot": {"ppl": ppl, "ppl_ratio": ratio, "forms": forms},
               "prune_seconds": rec["seconds"]}
        result["variants"][name] = row
        common.save("sparsity", result, Path(args.out))  # a killed run keeps the zero-shot row
        final = row["zero_shot"]
        if args.heal:
            healed = runner.run(r, ["distill"], force=True)["distill"]
            hrec = json.loads((healed / "pipeline.json").read_text())
            hppl, hratio = scored(healed)
            final = {"ppl": hppl, "ppl_ratio": hratio, "forms": hrec["sparsity"]["forms"],
                     "sparsity": hrec["sparsity"]["sparsity"]}  # the fixed mask: as sparse as before healing
            row["healed"] = final
            row["distill_seconds"] = hrec["seconds"]
        f = final["forms"]
        share = f["bitmask"] / dense["dense"]
        size = round(f[f"bitmask_int8_{codec}"] / dense[f"dense_int8_{codec}"], 3)
        goal = TARGETS["2:4" if "pattern" in VARIANTS[name] else "unstructured"]
        row.update({
            # the size target: the sparse int8 model's compressed weights against the dense int8 model's
            "int8_compressed_vs_dense_int8_compressed": size,
            "targets_met": ({k: final["ppl_ratio"][k] <= v for k, v in goal.items() if k in final["ppl_ratio"]}
                            | {"size": size <= SIZE_TARGET}) if args.heal else None,
            "frontier": frontier(share, final["ppl_ratio"], cuts) if cuts else None,
            "seconds": round(time.time() - started, 1)})
        print(name, json.dumps(row), flush=True)
        common.save("sparsity", result, Path(args.out))  # after every variant: a killed run keeps what it had


if __name__ == "__main__":
    main()
