"""The compress grid: how much of the fine-tuned model to keep, how long to heal it, which weight type to ship.

The quick start's fine-tuned SmolLM2-135M (keep 100%) and its MLP-width cuts to 90 / 80 / 70 / 60% of the
parameters (bench/compress.py's `width-*` cuts, ranked on the recipe's text), each healed by KD with 1x and 4x
the quick start's KD tokens; then every model in fp32 and in the best int8, int4 and GGUF types of
bench/results/quantize.json and quantize-gguf.json. Scores: perplexity on the quick start's validation split
and on the start of WikiText-2 test (general English no model trained or calibrated on), size on disk, prefill
and generate speed; the size-quality frontier over all of them (a point is dominated when another is no larger
and no worse on both texts).

Students are bench/heal.py's recipe-text runs (`runs/bench-heal/width-K-recipe-text-Bx/`, reused when there:
delete one to make it again); each model's quantization is one bench/quantize.py run whose JSON is kept in
--work and reused, so a killed grid goes on where it stopped. On a fresh checkout (no --work), `--reuse
bench/results/grid.json` keeps the points that file already has, once the fine-tuned model made here scores what
it recorded, and measures only the rest.

    python bench/grid.py                                 # ~2 h on 2 CPU cores
    python bench/grid.py --keeps 100,60 --budgets 1 --out /tmp/g.json
    python bench/grid.py --smoke --out /tmp/g.json       # tiny Llama, a few minutes
    python bench/grid.py --reuse bench/results/grid.json # add what a committed grid lacks

Writes bench/results/grid.json and grid.png.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import common
import compress
import heal
import quantize

ROOT = common.ROOT
# The best of each kind measured on the fine-tuned model: OpenVINO int8; the quick start's int4 (80% of the layers
# in 4-bit, AWQ + scale estimation); int4 with the tied embedding in 4-bit too (the only OpenVINO type under 15%
# of the base without a cut); GGUF Q4_1 (the better of Q4_0 / Q4_1 in quantize-gguf.json, as llama.cpp users
# ship it)
TYPES = ["openvino-int8", "int4-g32-awq-se-r80", "int4-g32-all-awq-se", "gguf-q4_1"]
TEXTS = ("stdlib-validation", "wikitext-2-test")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--keeps", default="100,90,80,70,60",
                   help="shares of the parameters kept, in %% (100: the fine-tuned model itself; others: width-K cuts)")
    p.add_argument("--budgets", default="1,4", help="healing budgets: multiples of the quick start's KD tokens")
    p.add_argument("--types", default=",".join(TYPES), help=f"bench/quantize.py candidates (default: {','.join(TYPES)})")
    p.add_argument("--teacher", default=None, help="fine-tuned model folder (default: the quick start's finetune/)")
    p.add_argument("--stdlib-tokens", type=int, default=4096, help="validation tokens scored (as the quick start)")
    p.add_argument("--wiki-tokens", type=int, default=8192, help="first N tokens of WikiText-2 test")
    p.add_argument("--rounds", type=int, default=1, help="speed rounds per model folder")
    p.add_argument("--heal-work", default=str(ROOT / "runs" / "bench-heal"), help="where the students' runs go")
    p.add_argument("--work", default=str(ROOT / "runs" / "bench-grid"), help="where each model's quantize JSON goes")
    p.add_argument("--out", default=str(common.RESULTS / "grid.json"))
    p.add_argument("--reuse", type=Path, default=None,
                   help="a grid JSON written earlier: its points for models that have no quantize JSON in --work are "
                        "kept as they are, if the fine-tuned model scores what that file recorded (else it stops)")
    p.add_argument("--measured-only", action="store_true",
                   help="train and convert nothing: gather the students and quantize runs already made (a grid cut "
                        "short), listing the missing ones")
    p.add_argument("--smoke", action="store_true", help="tiny Llama teacher and sizes, for a quick check")
    args = p.parse_args(argv)
    try:
        args.keeps = [int(k) for k in args.keeps.split(",")]
        args.budgets = [int(b) for b in args.budgets.split(",")]
    except ValueError:
        p.error("--keeps and --budgets are comma-separated whole numbers")
    cuts = {f"width-{k}" for k in args.keeps if k != 100}
    if cuts - set(compress.VARIANTS):
        p.error(f"--keeps: no cut for {', '.join(sorted(cuts - set(compress.VARIANTS)))}; "
                f"choose from 100 and {', '.join(v[6:] for v in compress.VARIANTS if v.startswith('width-'))}")
    if min(args.budgets) < 1:
        p.error("--budgets: each budget is at least 1 (a multiple of the quick start's distill.max_steps)")
    args.types = args.types.split(",")
    if set(args.types) - set(quantize.PRESETS):
        p.error(f"--types: unknown {', '.join(sorted(set(args.types) - set(quantize.PRESETS)))}")
    return args


def student(keep: int, budget: int, teacher: Path, args, tmp: Path) -> Path | None:
    """The width cut to `keep`% healed with `budget` x the quick start's KD tokens (heal.py's recipe-text run);
    None where it is not there yet and --measured-only."""
    variant, name = f"width-{keep}", f"width-{keep}-recipe-text-{budget}x"
    folder = Path(args.heal_work) / name / f"compress-{variant}" / "distill"
    if not (folder / "model.safetensors").is_file():  # stage folders are written whole (pipeline/folders.py)
        if args.measured_only:
            return None
        heal.main(["--variants", variant, "--budgets", str(budget), "--settings", "recipe-text", "--teacher",
                   str(teacher), "--work", str(args.heal_work), "--out", str(tmp / f"{name}.json"),
                   *(["--smoke"] if args.smoke else [])])
    return folder


def quantized(label: str, folder: Path, args) -> dict | None:
    """bench/quantize.py on one model folder: fp32 and every type, both texts, size and speed; None where it has
    not run yet and --measured-only."""
    out = Path(args.work) / f"quantize-{label}.json"
    if not out.is_file():
        if args.measured_only:
            return None
        quantize.main(["--input", str(folder), "--candidates", *args.types, "--stdlib-tokens", str(args.stdlib_tokens),
                       "--wiki-tokens", str(args.wiki_tokens), "--rounds", str(args.rounds), "--out", str(out),
                       *(["--smoke"] if args.smoke else [])])
    return json.loads(out.read_text())


def points(label: str, keep: int, budget: int | None, q: dict, teacher_ppl: dict) -> list[dict]:
    """One point per weight type of a model folder; ratios against the fine-tuned model in fp32."""
    rows = {"fp32": q["fp32"], **q["candidates"]}
    out = []
    for kind, row in rows.items():
        if "ppl" not in row:  # a candidate that failed: its error is in the quantize JSON
            continue
        ppl = {t: round(row["ppl"][t], 3) for t in TEXTS if t in row["ppl"]}
        out.append({"name": f"{label}/{kind}", "keep": keep, "budget": budget, "type": kind,
                    "disk_mb": row["disk_mb"], "quality": ppl,
                    "ratio": {t: round(v / teacher_ppl[t], 3) for t, v in ppl.items()},
                    "prefill_tok_s": row.get("prefill_tok_s"), "gen_tok_s": row.get("gen_tok_s"),
                    "load_average_1min": q["settings"]["load_average_1min"], "cpu": q["machine"]["cpu"]})
    return out


def main(argv=None) -> dict:
    from pipeline import frontier

    args = parse_args(argv)
    tmp_dir = tempfile.TemporaryDirectory()
    tmp = Path(tmp_dir.name)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    teacher = (Path(args.teacher) if args.teacher else
               compress.smoke_teacher([f"output_dir={args.work}", *compress.SMOKE_OVERRIDES], tmp) if args.smoke
               else compress.quickstart_teacher())
    kd_steps = {b: heal.kd_steps(args.smoke) * b for b in args.budgets}
    result = {"settings": {"teacher": str(teacher), "keeps": args.keeps, "budgets": args.budgets, "types": args.types,
                           "kd_steps": kd_steps, "stdlib_tokens": args.stdlib_tokens, "wiki_tokens": args.wiki_tokens,
                           "students": "bench/heal.py recipe-text runs (bench/compress.py width-K cuts)",
                           "note": "ratios: perplexity over the fine-tuned model's in fp32 on the same text; "
                                   "speeds: one bench/quantize.py run per model folder, at the load average shown"},
              "teacher": None, "points": []}
    earlier_teacher, earlier = reusable(args.reuse, teacher, args) if args.reuse else (None, {})
    if earlier:
        result["settings"]["reused"] = {"from": str(args.reuse), "models": sorted(earlier)}

    def from_earlier(label: str) -> bool:  # a quantize JSON made here wins over the earlier grid's points
        return label in earlier and not (Path(args.work) / f"quantize-{label}.json").is_file()

    if from_earlier("finetune"):
        result["teacher"] = earlier_teacher | {"folder": str(teacher)}
        teacher_ppl = result["teacher"]["ppl"]
    else:
        base = quantized("finetune", teacher, args)
        if base is None:
            raise SystemExit(f"--measured-only: the fine-tuned model's quantize run ({args.work}/quantize-finetune.json) "
                             "is not there yet; run the grid without --measured-only first")
        teacher_ppl = {t: base["fp32"]["ppl"][t] for t in TEXTS if t in base["fp32"]["ppl"]}
        result["teacher"] = {"folder": str(teacher), "ppl": teacher_ppl, "disk_mb": base["fp32"]["disk_mb"]}
        earlier.pop("finetune", None)

    def save():
        frontier.mark(result["points"])
        result["best_under_15pct"] = best_under(result["points"], 0.15 * result["teacher"]["disk_mb"])
        common.save("grid", result, Path(args.out))  # after every model: a killed grid keeps what it had

    if 100 in args.keeps:
        result["points"] += earlier.get("finetune") or points("finetune", 100, None, base, teacher_ppl)
        save()
    for budget in args.budgets:  # every cut at the small budget first: a grid cut short still spans the sizes
        for keep in [k for k in args.keeps if k != 100]:
            label = f"width-{keep}-{budget}x"
            if from_earlier(label):
                result["points"] += earlier[label]
                save()
                continue
            folder = student(keep, budget, teacher, args, tmp)
            q = None if folder is None else quantized(label, folder, args)
            if q is None:  # --measured-only, not made yet
                result.setdefault("missing", []).append(label)
                continue
            result["points"] += points(label, keep, budget, q, teacher_ppl)
            save()
    save()
    plot(result, Path(args.out).with_suffix(".png"))
    return result


def reusable(path: Path, teacher: Path, args) -> tuple[dict, dict[str, list[dict]]]:
    """The teacher record and the points by model label of an earlier grid JSON, once `teacher` is shown to be the
    model it was measured against: its fp32 perplexities on the same tokens agree within 0.1% (a fine-tune made
    again on the same recipe, machine and libraries agrees to the digit; one that does not cannot share ratios)."""
    earlier = json.loads(path.read_text())
    qargs = quantize.parse_args(["--stdlib-tokens", str(args.stdlib_tokens), "--wiki-tokens", str(args.wiki_tokens),
                                 *(["--smoke"] if args.smoke else [])])
    _, texts = quantize.scored_texts(teacher, qargs)
    now = quantize.ppl(quantize.load(teacher, None), texts, qargs)
    recorded = earlier["teacher"]["ppl"]
    if set(now) != set(recorded) or any(abs(now[t] / recorded[t] - 1) > 1e-3 for t in recorded):
        raise SystemExit(f"--reuse {path}: the fine-tuned model scores {now}, that grid's scored {recorded}: it was "
                         "measured against another model; run without --reuse (or with that model as --teacher)")
    by_label: dict[str, list[dict]] = {}
    for p in earlier["points"]:  # the CPU it was measured on: OpenVINO's kernels and every speed depend on it
        by_label.setdefault(p["name"].split("/")[0], []).append(
            {"cpu": earlier["machine"]["cpu"], **{k: v for k, v in p.items() if k != "dominated_by"}})
    return earlier["teacher"], by_label


def best_under(pts: list[dict], limit_mb: float) -> dict | None:
    """The point under `limit_mb` with the lowest worse-of-both-texts ratio: what issue 28's second target asks."""
    under = [p for p in pts if p["disk_mb"] <= limit_mb and p["ratio"]]
    if not under:
        return None
    best = min(under, key=lambda p: max(p["ratio"].values()))
    return {"name": best["name"], "limit_mb": round(limit_mb, 2), "disk_mb": best["disk_mb"], "ratio": best["ratio"]}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = result["points"]
    keeps = sorted({p["keep"] for p in pts}, reverse=True)
    colours = {k: plt.get_cmap("viridis")(i / max(1, len(keeps) - 1)) for i, k in enumerate(keeps)}
    markers = {None: "*", 1: "o", 4: "s", 16: "D"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), dpi=100)
    for ax, text in zip(axes, TEXTS):
        for p in pts:
            if text not in p["ratio"]:
                continue
            dominated = "dominated_by" in p
            ax.scatter(p["disk_mb"], p["ratio"][text], s=70, marker=markers.get(p["budget"], "^"),
                       facecolors="none" if dominated else colours[p["keep"]], edgecolors=colours[p["keep"]],
                       linewidths=1.4, label=f"keep {p['keep']}%")
            if not dominated:
                ax.annotate(p["type"], (p["disk_mb"], p["ratio"][text]), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")
        limit = 0.15 * result["teacher"]["disk_mb"]
        ax.axvline(limit, color="grey", lw=0.8, ls=":")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("disk MB (dotted: 15% of the base)")
        ax.set_ylabel("perplexity / fine-tuned model's (fp32)")
        ax.set_title(text)
        ax.grid(True, alpha=0.3)
    # a legend of what each property means, not of the first point of each kind: colour = share kept, shape =
    # KD budget, fill = frontier or dominated
    from matplotlib.lines import Line2D

    def key(label, marker="o", colour="grey", fill=True):
        return Line2D([], [], ls="", marker=marker, markersize=7, label=label, markeredgecolor=colour,
                      markerfacecolor=colour if fill else "none")

    budgets = sorted({p["budget"] for p in pts}, key=lambda b: -1 if b is None else b)
    handles = ([key(f"keep {k}%" + (" (fine-tuned)" if k == 100 else ""), colour=colours[k]) for k in keeps]
               + [key("no cut" if b is None else f"{b}x KD", markers.get(b, "^")) for b in budgets]
               + [key("dominated", fill=False)])
    common.save_figure(fig, axes, "colour: kept; shape: KD budget",
                       "Keep x healing x weight type on SmolLM2-135M (lower is better; hollow = dominated)", path,
                       handles=handles)


if __name__ == "__main__":
    main()
