"""What does weight sparsity cost and save? One-shot prune.sparsity variants of SmolLM2-135M, scored zero-shot.

Each variant runs the prune stage with only `prune.sparsity` set (50% unstructured by Wanda and by magnitude,
2:4 by Wanda; calibration: the quick start's 64 blocks of its training split) on the teacher (default: the
quick start's base model, SmolLM2-135M-Instruct from its GGUF; `--teacher` for the fine-tuned one) and scores
sliding-window perplexity on the quick start's validation split and the start of WikiText-2 test, as
bench/compress.py does. Sizes: every on-disk form the prune record reports (dense, bitmask, their int8
versions, each entropy-coded). No healing (distill) here: zero-shot only; the published recoveries need
training on the fixed mask, which `distill` after a sparse prune does.

    python bench/sparsity.py                      # three variants, ~10 min on 2 CPU cores
    python bench/sparsity.py --smoke --out /tmp/s.json   # tiny Llama, a minute
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
VARIANTS = {
    "unstructured-50-wanda": {"amount": 0.5, "method": "wanda"},
    "unstructured-50-magnitude": {"amount": 0.5, "method": "magnitude"},
    "2:4-wanda": {"pattern": "2:4", "method": "wanda"},
}
OWN_OVERRIDES = ("finetune.enabled=false", "distill.enabled=false", "quantize.enabled=false",
                 "evaluate.enabled=false", "prune.enabled=true", "prune.target_params=null")
SMOKE_OVERRIDES = ["data.block_size=32", "data.max_train_blocks=16", "prune.calibration_blocks=4"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default=None, help="model folder (default: the quick start's base/)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--stride", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=4096, help="validation tokens scored (as the quick start)")
    p.add_argument("--wiki-tokens", type=int, default=8192, help="first N tokens of WikiText-2 test")
    p.add_argument("--wikitext", default=str(common.WIKITEXT_TEST))
    p.add_argument("--work", default=str(ROOT / "runs" / "bench-sparsity"), help="where the variants' runs go")
    p.add_argument("--out", default=str(common.RESULTS / "sparsity.json"))
    p.add_argument("--smoke", action="store_true", help="tiny Llama teacher, for a quick check")
    return common.variant_args(p, argv, VARIANTS)


def main(argv=None) -> None:
    import torch

    from pipeline import data, formats, recipe, runner, sparsity
    from pipeline.metrics import perplexity

    args = parse_args(argv)
    tmp = tempfile.TemporaryDirectory()
    overrides = [f"output_dir={args.work}", *OWN_OVERRIDES]
    if args.smoke:
        overrides += SMOKE_OVERRIDES
        tiny = recipe.load(ROOT / "recipes" / "quickstart.yaml",
                           [*overrides, "name=sparsity-teacher", "prune.enabled=false", "check_source=false",
                            f"model={common.tiny_folder(Path(tmp.name))}"])
        teacher_folder = runner.run(tiny, ["load"])["load"]  # a stage folder (with its record), as prune reads
    else:
        teacher_folder = Path(args.teacher) if args.teacher else common.smollm2_folder()
    base = recipe.load(ROOT / "recipes" / "quickstart.yaml", [*overrides, "prune.sparsity.amount=0.5"])
    teacher, tokenizer = formats.load_folder(teacher_folder, dtype=torch.float32)
    val_ids = data.eval_stream(data.prepare(base.data, tokenizer, base.seed)["validation"])[: args.max_tokens]
    wiki_path = Path(args.wikitext)
    wiki_text = wiki_path.read_text() if wiki_path.is_file() else None
    wiki = tokenizer(wiki_text, add_special_tokens=False, verbose=False)["input_ids"][: args.wiki_tokens] \
        if wiki_text else None

    def scores(model) -> dict:
        out = {"validation": round(perplexity(model, val_ids, args.context, args.stride)["perplexity"], 3)}
        if wiki:
            out["wikitext-2-test"] = round(perplexity(model, wiki, args.context, args.stride)["perplexity"], 3)
        return out

    dense = sparsity.forms(teacher)
    shown = teacher_folder.resolve()  # relative to the repository when inside it, as compress.py does
    shown = shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown
    result = {"settings": {"teacher": str(shown), "recipe": "recipes/quickstart.yaml",
                           "overrides": overrides, "calibration_blocks": base.prune.calibration_blocks,
                           "block_size": base.data.block_size, "context": args.context, "stride": args.stride,
                           "validation_tokens": len(val_ids), "wikitext_tokens": len(wiki) if wiki else 0,
                           "healing": "none (zero-shot)"},
              "teacher": {"ppl": scores(teacher), "forms": dense}, "variants": {}}
    print("teacher", result["teacher"], flush=True)
    del teacher
    gc.collect()
    for name in args.variants.split(","):
        started = time.time()
        keys = [f"prune.sparsity.{k}={v}" for k, v in VARIANTS[name].items()]
        r = recipe.load(ROOT / "recipes" / "quickstart.yaml",
                        [*overrides, f"name=sparsity-{name.replace(':', '-')}", f"prune.input={teacher_folder}", *keys])
        folder = runner.run(r, ["prune"], force=True)["prune"]
        rec = json.loads((folder / "pipeline.json").read_text())
        model, _ = formats.load_folder(folder, dtype=torch.float32)
        ppl = scores(model)
        forms = rec["sparsity"]["forms"]
        codec = forms["codec"]
        result["variants"][name] = {
            "settings": VARIANTS[name], "sparsity": rec["sparsity"]["sparsity"], "ppl": ppl,
            "ppl_ratio": {k: round(v / result["teacher"]["ppl"][k], 3) for k, v in ppl.items()},
            "forms": forms,
            # the size target: the sparse int8 model's compressed weights against the dense int8 model's
            "int8_compressed_vs_dense_int8_compressed": round(forms[f"bitmask_int8_{codec}"] /
                                                               dense[f"dense_int8_{codec}"], 3),
            "prune_seconds": rec["seconds"], "seconds": round(time.time() - started, 1),
        }
        del model
        gc.collect()
        print(name, result["variants"][name], flush=True)
        common.save("sparsity", result, Path(args.out))  # after every variant: a killed run keeps what it had


if __name__ == "__main__":
    main()
