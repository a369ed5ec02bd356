"""Which compressed student is still good? Every-other-layer against importance-based pruning, healed by KD.

Teacher: the quick start's fine-tuned SmolLM2-135M (runs/quickstart/finetune, made if missing). Each
variant cuts the teacher to about 60% or 80% of its parameters, is scored zero-shot, then distilled with the
quick start's `distill` settings (so every variant sees exactly the quick-start KD budget, the same blocks in
the same order) and scored again. Scores: sliding-window perplexity on the quick start's validation split
and on the start of WikiText-2 test (general English none of the models trained on).

    python bench/compress.py                          # all variants, ~1 h on 2 CPU cores
    python bench/compress.py --variants width-80,depth-80 --out /tmp/c.json
    python bench/compress.py --smoke --out /tmp/c.json  # tiny Llama, a minute

Variants: `uniform` keeps evenly spaced teacher layers (every other one at 60%: DistilGPT2's initialisation,
the distill stage's layer-subset student); `depth` drops the layers of lowest block influence; `width` shrinks
the MLP by activation importance; `mix` shrinks depth and MLP width together (the prune stage's
`target_params` rule); `hidden-mlp` shrinks the hidden (embedding) channels and the MLP together (Minitron's
width axes). Writes bench/results/compress.json and compress.png.
"""
from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import common

ROOT = common.ROOT

# name -> (kind, settings): kind "uniform" is distill's layer subset, "prune" the prune stage
VARIANTS = {
    "uniform-60": ("uniform", {"every": 2}),
    "uniform-80": ("uniform", {"fraction": 0.8}),
    # 60% by depth alone drops 16 of SmolLM2's 30 layers, which target_params refuses: the cut it measured, set
    # explicitly
    "depth-60": ("prune", {"num_hidden_layers": 14}),
    "depth-80": ("prune", {"target_params": 0.8, "axes": ["depth"]}),
    "width-60": ("prune", {"target_params": 0.6, "axes": ["mlp"]}),
    "width-80": ("prune", {"target_params": 0.8, "axes": ["mlp"]}),
    # the grid's other widths (bench/grid.py): run when named
    "width-70": ("prune", {"target_params": 0.7, "axes": ["mlp"]}),
    "width-90": ("prune", {"target_params": 0.9, "axes": ["mlp"]}),
    "mix-60": ("prune", {"target_params": 0.6, "axes": ["depth", "mlp"]}),
    "mix-80": ("prune", {"target_params": 0.8, "axes": ["depth", "mlp"]}),
    # Minitron's width axes: MLP channels and hidden (embedding) channels together
    "hidden-mlp-60": ("prune", {"target_params": 0.6, "axes": ["hidden", "mlp"]}),
    "hidden-mlp-80": ("prune", {"target_params": 0.8, "axes": ["hidden", "mlp"]}),
}
# What compress.json holds; the hidden-mlp pair and the grid's widths run when named (`--variants hidden-mlp-80`).
DEFAULT_VARIANTS = [n for n in VARIANTS if not n.startswith("hidden-mlp") and n not in ("width-70", "width-90")]
# Set by the script for every variant (besides output_dir): the README's reproduce line leaves them out
OWN_OVERRIDES = ("quantize.enabled=false", "evaluate.enabled=false")
SMOKE_OVERRIDES = ["data.block_size=32", "data.max_train_blocks=16", "distill.max_steps=2", "distill.batch_size=2",
                   "prune.calibration_blocks=4"]
SMOKE_FRACTION_OVERRIDES = ["prune.round_to=8"]  # the tiny teacher's widths; only a target_params cut rounds them


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default=None, help="fine-tuned model folder (default: the quick start's finetune/)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated subset of {', '.join(VARIANTS)} (default: all but hidden-mlp)")
    p.add_argument("--refit", choices=["on", "off", "both"], default="on",
                   help="prune.refit for the pruned variants; both = also score each zero-shot without it")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--stride", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=4096, help="validation tokens scored (as the quick start)")
    p.add_argument("--wiki-tokens", type=int, default=8192, help="first N tokens of WikiText-2 test")
    p.add_argument("--wikitext", default=str(common.WIKITEXT_TEST))
    p.add_argument("--work", default=str(ROOT / "runs" / "bench-compress"), help="where the variants' runs go")
    p.add_argument("--override", action="append", default=[], help="recipe override for every variant (key=value)")
    p.add_argument("--out", default=str(common.RESULTS / "compress.json"))
    p.add_argument("--zero-shot-only", action="store_true", help="score the cuts without distilling them")
    p.add_argument("--smoke", action="store_true", help="tiny Llama teacher and sizes, for a quick check")
    return common.variant_args(p, argv, VARIANTS)


def smoke_teacher(overrides: list[str], tmp: Path) -> Path:
    """A tiny Llama, "fine-tuned" for two steps by the pipeline itself."""
    from pipeline import recipe, runner

    tiny = recipe.load(ROOT / "recipes" / "quickstart.yaml",
                       [*overrides, "name=compress-teacher", f"model={common.tiny_folder(tmp)}",
                        "check_source=false",  # random weights: the load stage's source gate refuses them
                        "finetune.max_steps=2", "prune.enabled=false"])
    return runner.run(tiny, until="finetune")["finetune"]


def quickstart_teacher() -> Path:
    """The quick start's own fine-tune (skipped when it is up to date)."""
    from pipeline import recipe, runner

    qs = recipe.load(ROOT / "recipes" / "quickstart.yaml", [f"output_dir={ROOT / 'runs'}"])
    return runner.run(qs, until="finetune")["finetune"]


def scores(model, tokenizer, val_ids: list[int], wiki_text: str, args) -> dict:
    from pipeline.metrics import perplexity

    wiki = tokenizer(wiki_text, add_special_tokens=False, verbose=False)["input_ids"][: args.wiki_tokens]
    return {"validation": round(perplexity(model, val_ids, args.context, args.stride)["perplexity"], 3),
            "wikitext-2-test": round(perplexity(model, wiki, args.context, args.stride)["perplexity"], 3)}


def main(argv=None) -> None:
    import torch

    from pipeline import data, formats, models, recipe, runner
    from pipeline.stages import distill

    args = parse_args(argv)
    work = Path(args.work)
    # the caller's overrides last: they win over the smoke sizes too (bench/heal.py sets distill.max_steps)
    overrides = [f"output_dir={work}", *OWN_OVERRIDES, *(SMOKE_OVERRIDES if args.smoke else []), *args.override]
    tmp = tempfile.TemporaryDirectory()
    teacher_folder = (Path(args.teacher) if args.teacher else smoke_teacher(overrides, Path(tmp.name)) if args.smoke
                      else quickstart_teacher())
    base = recipe.load(ROOT / "recipes" / "quickstart.yaml", overrides)
    teacher, tokenizer = formats.load_folder(teacher_folder, dtype=torch.float32)
    val_ids = data.eval_stream(data.prepare(base.data, tokenizer, base.seed)["validation"])[: args.max_tokens]
    wiki_text = Path(args.wikitext).read_text()
    t_params = models.count_params(teacher)
    shown = teacher_folder.resolve()  # relative to the repository when inside it, as the README cites it
    shown = shown.relative_to(common.ROOT) if shown.is_relative_to(common.ROOT) else shown
    result = {"settings": {"teacher": str(shown), "recipe": "recipes/quickstart.yaml", "overrides": overrides,
                           "refit": args.refit, "context": args.context, "stride": args.stride,
                           "validation_tokens": len(val_ids), "wikitext_tokens": args.wiki_tokens,
                           "kd": {k: getattr(base.distill, k) for k in ("max_steps", "batch_size", "learning_rate",
                                                                       "alpha_kd", "alpha_ce", "temperature", "kl")}},
              "teacher": {"params": t_params, "ppl": scores(teacher, tokenizer, val_ids, wiki_text, args)},
              "variants": {}}
    print("teacher", result["teacher"], flush=True)
    kd_tokens = base.distill.max_steps * base.distill.batch_size * base.data.block_size
    for name in args.variants.split(","):
        kind, settings = VARIANTS[name]
        started = time.time()
        common_overrides = [*overrides, f"name=compress-{name}", "finetune.enabled=false"]
        if kind == "uniform":
            n = teacher.config.num_hidden_layers
            per_layer = sum(p.numel() for p in distill.decoder_layers(teacher)[0].parameters())
            keep = n // settings["every"] if "every" in settings else round(
                (settings["fraction"] * t_params - (t_params - n * per_layer)) / per_layer)
            layer_keys = ([f"distill.every={settings['every']}"] if "every" in settings else [f"distill.keep={keep}"])
            r = recipe.load(ROOT / "recipes" / "quickstart.yaml",
                            [*common_overrides, "prune.enabled=false", f"distill.input={teacher_folder}", *layer_keys])
            student = distill.student_from_teacher(teacher, distill.layer_map(r.distill, n))
            zero = {"refit": scores(student, tokenizer, val_ids, wiki_text, args)}
            del student
            out = None if args.zero_shot_only else runner.run(r, ["distill"], force=True)["distill"]
        else:
            # the variants are named by their share of all parameters, as compress.json measured them
            # a depth-only cut rounds no width and has no output projection to re-fit: the recipe refuses round_to
            # and refit: false with it as meaningless, and count_embeddings with an explicit size
            width = settings.get("axes", ["depth"]) != ["depth"]
            keys = [f"prune.{k}={v}" for k, v in settings.items()]
            if "target_params" in settings:
                keys += ["prune.count_embeddings=true", *(SMOKE_FRACTION_OVERRIDES if args.smoke and width else [])]
            zero = {}
            for refit in ([True, False] if args.refit == "both" and width else [args.refit != "off" or not width]):
                r = recipe.load(ROOT / "recipes" / "quickstart.yaml",
                                [*common_overrides, "prune.enabled=true", f"prune.input={teacher_folder}",
                                 "prune.target_params=null", f"prune.refit={refit}", *keys])
                pruned = runner.run(r, ["prune"], force=True)["prune"]
                model, _ = formats.load_folder(pruned, dtype=torch.float32)
                zero["refit" if refit else "no_refit"] = scores(model, tokenizer, val_ids, wiki_text, args)
                del model
            # distill the refitted cut when both were scored (the last prune run is the plain one)
            if args.refit == "both":
                r = recipe.load(ROOT / "recipes" / "quickstart.yaml",
                                [*common_overrides, "prune.enabled=true", f"prune.input={teacher_folder}",
                                 "prune.target_params=null", "prune.refit=true", *keys])
                runner.run(r, ["prune"], force=True)
            out = None if args.zero_shot_only else runner.run(r, ["distill"], force=True)["distill"]
        if out is None:  # --zero-shot-only
            result["variants"][name] = {"kind": kind, "settings": settings, "seconds": round(time.time() - started, 1),
                                        "zero_shot": zero.get("refit") or zero.get("no_refit"),
                                        "zero_shot_by_refit": zero if len(zero) > 1 else None}
            print(name, result["variants"][name], flush=True)
            common.save("compress", result, Path(args.out))
            continue
        student, _ = formats.load_folder(out, dtype=torch.float32)
        after = scores(student, tokenizer, val_ids, wiki_text, args)
        params = models.count_params(student)
        main_zero = zero.get("refit") or zero.get("no_refit")
        result["variants"][name] = {
            "kind": kind, "settings": settings, "params": params, "params_ratio": round(params / t_params, 4),
            "sizes": {k: getattr(student.config, k) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                                              "intermediate_size") if hasattr(student.config, k)},
            "kd_tokens": kd_tokens, "seconds": round(time.time() - started, 1),
            "zero_shot": main_zero, "zero_shot_by_refit": zero if len(zero) > 1 else None,
            "after_kd": after,
            "ratio": {k: round(after[k] / result["teacher"]["ppl"][k], 3) for k in after},
        }
        del student
        gc.collect()
        print(name, result["variants"][name], flush=True)
        common.save("compress", result, Path(args.out))  # after every variant: a killed run keeps what it had
    if not args.zero_shot_only:
        plot(result, Path(args.out).with_suffix(".png"))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=100)
    # One colour per kind of cut and a legend, not a label per point: variants of one size sit close together.
    kinds = list(dict.fromkeys(name.rsplit("-", 1)[0] for name in result["variants"]))
    colours = {k: plt.get_cmap("tab10")(i) for i, k in enumerate(kinds)}
    for ax, text in zip(axes, ("validation", "wikitext-2-test")):
        for name, v in result["variants"].items():
            ax.scatter(v["params_ratio"], v["ratio"][text], s=60, edgecolors="black",
                       color=colours[name.rsplit("-", 1)[0]], label=name.rsplit("-", 1)[0])
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("parameters / teacher's")
        ax.set_ylabel("student ppl / teacher ppl after KD")
        ax.set_yscale("log")
        ax.set_title(f"{text}")
        ax.grid(True, alpha=0.3)
    common.save_figure(fig, axes, "cut", "Compressed SmolLM2-135M students after the quick start's KD budget "
                       "(lower is better)", path)  # one legend entry per kind of cut


if __name__ == "__main__":
    main()
