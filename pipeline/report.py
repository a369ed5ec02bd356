"""runs/<recipe>/report.{md,json,png}: every model side by side on quality, size and speed."""
from __future__ import annotations

import json
import time
from pathlib import Path

from pipeline import frontier, interrupts
from pipeline.general import LABEL as GENERAL
from pipeline.tasks import OFFLINE_TASK, main_metric

COLUMNS = [  # (key, header, format)
    ("name", "model", "{}"),
    ("params", "params", "{:,}"),
    ("disk_mb", "disk MB", "{:.1f}"),
    ("perplexity", "perplexity", "{:.3f}"),
    ("ppl_vs_base_pct", "Δ ppl vs base", "{:+.1f}%"),
    ("size_vs_base_pct", "size vs base", "{:.0f}%"),
    ("prefill_tok_s", "prefill tok/s", "{:.0f}"),
    ("gen_tok_s", "generate tok/s", "{:.1f}"),
    ("peak_mem_mb", "peak mem MB", "{:.0f}"),
    ("sparsity", "zeros", "{:.0%}"),  # of the block linear weights, for a model with a mask (prune.sparsity)
    ("repetition_4gram", "repeated 4-grams", "{:.0%}"),  # of the samples' words: high = a looping model
]


SPEED = ("prefill_tok_s", "gen_tok_s")


def sparsity_note(rows: list[dict]) -> list[str]:
    """What the zeros of a sparse model buy: its compressed forms' sizes; and that the speeds ran dense kernels
    (none of this pipeline's runtimes skips zeros: "saves disk, not time")."""
    sparse = [r for r in rows if r.get("sparsity")]
    if not sparse:
        return []
    lines = ["", "Zeros: share of the transformer blocks' linear weights that are exactly zero (`prune.sparsity`, "
             "kept fixed by training on the mask)."]
    for row in sparse:
        info = row.get("sparse") or {}
        f = info.get("forms") or {}
        c = f.get("codec")
        if c and f.get(f"bitmask_int8_{c}"):
            mb = 1e6
            lines.append(f"- `{row['name']}` ({info.get('pattern')}, {info.get('method')}): dense {f['dense'] / mb:.1f} MB, "
                         f"bitmask form {f['bitmask'] / mb:.1f} MB, bitmask + {c} {f[f'bitmask_{c}'] / mb:.1f} MB; "
                         f"int8 + {c}: bitmask {f[f'bitmask_int8_{c}'] / mb:.1f} MB against dense "
                         f"{f[f'dense_int8_{c}'] / mb:.1f} MB"
                         + (f" (written to `{info['compressed']['folder']}/`)." if info.get("compressed") else "."))
    device = rows[0].get("device") or "this machine"
    lines.append(f"\nSparsity saves disk, not time: the perplexity and speed columns run dense kernels over the zeros "
                 f"on {device} (no sparse kernel applies: llama.cpp has no sparse types, OpenVINO decompresses "
                 "sparse weights only for int8 activations on AMX CPUs, 2:4 kernels need a CUDA GPU of compute "
                 "capability 8.0+; docs/reference.md, Sparsity).")
    return lines


def noise_note(rows: list[dict]) -> list[str]:
    """Why speeds marked (noisy) are not to be trusted: the machine's load and how far the timed runs spread."""
    out = []
    for row in rows:
        if not row.get("speed_noisy"):
            continue
        parts = []
        for what, n in (row.get("speed_noise") or {}).items():
            if n.get("noisy"):
                parts.append(f"{what}: {n['runs']} runs spread {n['spread']:.0%}, load {n['load']} on {n['cores']} cores")
        out.append(f"- `{row['name']}`: " + "; ".join(parts))
    if out:
        out = ["", "Speeds marked (noisy) were measured while other work loaded the machine (1-minute load above "
               "1.5 per core) or their timed runs never agreed within 15%; compare them with care:"] + out
    return out


def write(run_dir: Path, recipe: str, rows: list[dict]) -> None:
    interrupts.raise_pending()  # an interrupted evaluation writes no report, even if a library swallowed the signal
    base = next((r for r in rows if r["name"] == "base"), None)
    for row in rows:
        if base:
            row["ppl_vs_base_pct"] = round(100 * (row["perplexity"] / base["perplexity"] - 1), 2)
            row["size_vs_base_pct"] = round(100 * row["disk_mb"] / base["disk_mb"], 1)
    payload = {"recipe": recipe, "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "models": rows}
    _atomic(run_dir / "report.json", json.dumps(payload, indent=2) + "\n")
    if rows:
        plot(rows, recipe, run_dir / "report.png")
    _atomic(run_dir / "report.md", markdown(recipe, rows))


def task_columns(rows: list[dict]) -> list[tuple[str, str]]:
    """(task, metric) for every lm-eval task any model has: its main metric (acc when it has one)."""
    out: dict[str, str | None] = {}
    for row in rows:
        for task, scores in (row.get("tasks") or {}).items():
            if out.get(task) is None:
                out[task] = main_metric(scores)
    return [(task, metric or "") for task, metric in out.items()]


def task_cell(scores: dict | None, metric: str) -> str:
    if not scores:
        return "–"
    if "skipped" in scores:
        return "skipped"
    value, err = scores.get(metric), (scores.get("stderr") or {}).get(metric)
    if not isinstance(value, (int, float)):
        return "–"
    return f"{value:.3f}" + (f" ± {err:.3f}" if isinstance(err, (int, float)) else "")


def markdown(recipe: str, rows: list[dict]) -> str:
    cols = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    extra = [e["dataset"] for e in rows[0].get("evaluations", [])[1:]] if rows else []
    task_cols = task_columns(rows)
    answer_cols = list(dict.fromkeys(m for r in rows for m in (r.get("answers") or {}).get("scores", {})))
    reference = next((r.get("reference") for r in rows if r.get("reference")), None)
    compared = [e["dataset"] for e in rows[0].get("evaluations", []) if "kl" in e] if rows else []
    kl_names = [n for n in compared if any(any("kl" in e for e in r.get("evaluations", [])) for r in rows)]
    headers = ([h for _, h, _ in cols] + [f"ppl {name}" for name in extra]
               + [f"KL {name}" for name in kl_names] + ([f"top-1 {kl_names[0]}"] if kl_names else [])
               + [f"{task} {metric}".strip() for task, metric in task_cols] + [f"answers {m}" for m in answer_cols])
    suspect = next((r["source_problems"] for r in rows if r.get("source_problems")), None)
    warning = (["**Warning: the source model failed the load stage's check, and the run went on because "
                f"`check_source: false`. Every number below may be wrong.** {'; '.join(suspect)}.", ""]
               if suspect else [])
    warning += [f"**Stale: `{r['name']}`** is not what the recipe makes now: {r['stale']}. Its row is marked "
                "*(stale)*.\n" for r in rows if r.get("stale")]
    lines = [f"# Report: {recipe}", "", *warning, "![perplexity vs size](report.png)", "",
             "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        cells = [fmt.format(row[k]) if row.get(k) is not None else "–" for k, _, fmt in cols]
        for i, (k, _, _) in enumerate(cols):
            if k in SPEED and row.get("speed_noisy") and row.get(k) is not None:
                cells[i] += " (noisy)"
        if row.get("stale"):
            cells[0] += " *(stale)*"
        by_name = {e["dataset"]: e for e in row.get("evaluations", [])}
        cells += [f"{by_name[n]['perplexity']:.3f}" if n in by_name else "–" for n in extra]
        cells += [f"{by_name[n]['kl']:.4f}" if "kl" in by_name.get(n, {}) else "–" for n in kl_names]
        if kl_names:
            first = by_name.get(kl_names[0], {})
            cells.append(f"{first['top1']:.1%}" if "top1" in first else "–")
        cells += [task_cell((row.get("tasks") or {}).get(task), metric) for task, metric in task_cols]
        cells += [answer_cell((row.get("answers") or {}).get("scores", {}).get(m)) for m in answer_cols]
        lines.append("| " + " | ".join(cells) + " |")
    lines += task_notes(rows, task_cols) + answer_notes(rows, answer_cols)
    if kl_names:
        lines += ["", f"KL: mean KL divergence of each model's next-token distribution from the reference `{reference}`'s "
                  f"(nats per token) on the first {rows[0]['evaluations'][0].get('kl_tokens', 0):,} scored positions of "
                  f"each text; top-1: share of those positions where both models' most likely next token agree."]
    if any(e["dataset"] == GENERAL for r in rows for e in r.get("evaluations", [])):
        lines += ["", f"`{GENERAL}`: English the base model wrote from everyday openings (see the run's "
                  "general/general.txt), never trained on: how much each model forgot outside the recipe's domain."]
    lines += noise_note(rows)
    lines += sparsity_note(rows)
    lines += frontier_section(rows)
    for row in rows:
        teacher = next((t for t in rows if row.get("teacher") and t["folder"] == row["teacher"]), None)
        if teacher:
            lines += ["", f"Distillation: the student `{row['name']}` has {row['perplexity'] / teacher['perplexity']:.2f}x "
                      f"the perplexity of its teacher `{teacher['name']}` ({row['perplexity']:.3f} vs "
                      f"{teacher['perplexity']:.3f}) with {row['params'] / teacher['params']:.0%} of its parameters "
                      f"and {row['disk_mb'] / teacher['disk_mb']:.0%} of its size."]
    for row in rows:
        source = next((r for r in rows if row.get("pruned_from") and r["folder"] == row["pruned_from"]), None)
        if source:
            lines += ["", f"Pruning: `{row['name']}` keeps {row['params'] / source['params']:.0%} of the parameters of "
                      f"`{source['name']}` and has {row['perplexity'] / source['perplexity']:.2f}x its perplexity "
                      f"({row['perplexity']:.3f} vs {source['perplexity']:.3f}) before distillation heals it."]
    if any(r.get("repetition_4gram") is not None for r in rows):
        lines += ["", "Repeated 4-grams: share of the word 4-grams in each model's samples below that repeat an "
                  "earlier one (a model stuck in a loop scores high)."]
    if rows and rows[0].get("evaluations"):
        first = rows[0]["evaluations"][0]
        lines += ["", f"Perplexity: token-level on the `{first['dataset']}` validation split ({first['scored_tokens']:,} "
                  f"tokens scored, context {first['context']}, stride {first['stride']}), on {rows[0]['device']}. "
                  "Size: weight files on disk."]
        speed = rows[0].get("speed_settings")
        if speed:
            lines.append(f"Speed: prefill of {speed['prefill_tokens']} tokens; greedy generation of "
                         f"{speed['new_tokens']} new tokens for {speed['prompts']} prompt(s); median of "
                         f"{speed['repeats']} runs after a warm-up.")
        if any("peak_mem_mb" in r or "peak_mem_error" in r for r in rows):
            lines.append("Peak memory: measured for each model in a fresh process of its own (the same whatever the "
                         "order), as the rise of its RSS once the libraries of its format and model class are imported "
                         "(allocator peak on CUDA) while it loads the model and runs one prefill and generation of "
                         "the speed settings."
                         + "".join(f" `{r['name']}`: not measured ({r['peak_mem_error']})."
                                   for r in rows if r.get("peak_mem_error")))
    for row in rows:
        summary = (row.get("quantization") or {}).get("summary")
        if summary:
            lines += ["", f"## Quantization (`{row['name']}`)", "", summary.strip()]
    sampled = [r for r in rows if r.get("samples")]
    if sampled:
        lines += ["", f"## Samples ({sampled[0]['decoding']})", ""]
        for i, prompt in enumerate(s["prompt"] for s in sampled[0]["samples"]):
            lines += [f"**Prompt:** {prompt}", ""]
            for row in sampled:
                output = " ".join(row["samples"][i]["output"].split())
                lines.append(f"- **{row['name']}**: {prompt} _{output}_")
            lines.append("")
    return "\n".join(lines) + "\n"


def points(rows: list[dict]) -> list[dict]:
    """Every model the run measured: the stage folders and the quantize stage's candidates (scored by its gate on
    the same texts and windows when the recipe keeps `quantize` and `evaluate` windows equal)."""
    folders = {r.get("folder"): r["name"] for r in rows}
    out = [{"name": r["name"], "disk_mb": r["disk_mb"], "quality": frontier.quality(r), "gen_tok_s": r.get("gen_tok_s"),
            "shipped": r["name"] == "quantize", "kind": "stage", "parent": folders.get(r.get("parent"))}
           for r in rows if r.get("disk_mb") is not None]
    for r in rows:
        q = r.get("quantization") or {}
        for c in q.get("candidates") or []:
            if c.get("disk_mb") is None or c["name"] == q.get("chosen"):
                continue  # the chosen one is the quantize row itself
            out.append({"name": f"{c['name']} (candidate)", "disk_mb": c["disk_mb"], "quality": c.get("quality") or
                        {r["evaluations"][0]["dataset"]: c["perplexity"]}, "gen_tok_s": c.get("gen_tok_s"),
                        "shipped": False, "kind": "candidate"})
    return frontier.mark(out)


def frontier_section(rows: list[dict]) -> list[str]:
    pts = points(rows)
    texts = list(dict.fromkeys(t for p in pts for t in p["quality"]))
    if len(pts) < 2 or not texts:
        return []
    lines = ["", "## Frontier: size against quality", "",
             "Every model the run measured, smallest first. A model is dominated when another is no larger (sizes "
             "within 0.1% count as equal) and no worse on every text; only the others are worth shipping.", "",
             "| model | disk MB | " + " | ".join(f"ppl {t}" for t in texts) + " | generate tok/s | |",
             "|---|---|" + "---|" * len(texts) + "---|---|"]
    for p in sorted(pts, key=lambda p: p["disk_mb"]):
        note = "**shipped**" if p["shipped"] else ""
        if p.get("dominated_by"):
            note += (" · " if note else "") + f"dominated by {p['dominated_by']}"
        qual = [f"{p['quality'][t]:.3f}" if t in p["quality"] else "–" for t in texts]
        gen = f"{p['gen_tok_s']:.1f}" if p.get("gen_tok_s") else "–"
        lines.append(f"| {p['name']} | {p['disk_mb']:.1f} | " + " | ".join(qual) + f" | {gen} | {note} |")
    return lines


def answer_cell(value) -> str:
    if isinstance(value, (int, float)):
        return f"{value:.3f}" if value <= 1 else f"{value:.1f}"
    return "skipped" if isinstance(value, dict) else "–"


def answer_notes(rows: list[dict], answer_cols: list[str]) -> list[str]:
    """What the answer columns score, why a metric was skipped, and a few answers of each model."""
    answered = [r for r in rows if r.get("answers")]
    if not answered:
        return []
    first = answered[0]["answers"]
    lines = ["", f"Answers: each model answered {first['prompts']} held-out prompt(s) under its chat template "
             f"(greedy, at most {first['max_new_tokens']} new tokens); `evaluate` metrics score the answers against "
             "the held-out responses (exact_match and rouge_l in [0, 1], chrf in [0, 100])."]
    for m in answer_cols:
        for row in answered:
            value = row["answers"]["scores"].get(m)
            if isinstance(value, dict):
                lines.append(f"- `{m}` skipped for {row['name']}: {value['skipped']}")
    lines += ["", "## Answers to held-out prompts", ""]
    for i, item in enumerate(first["answers"][:3]):
        lines += [f"**Prompt:** {item['prompt']}", "", f"- **reference**: _{' '.join(item['reference'].split())}_"]
        for row in answered:
            lines.append(f"- **{row['name']}**: _{' '.join(row['answers']['answers'][i]['answer'].split())}_")
        lines.append("")
    return lines


def task_notes(rows: list[dict], task_cols: list[tuple[str, str]]) -> list[str]:
    """What the task columns mean, and why any task was skipped (never silently dropped)."""
    if not task_cols:
        return []
    lines = [""]
    if any(task == OFFLINE_TASK for task, _ in task_cols):
        lines.append(f"Tasks (lm-eval harness, ± standard error): `{OFFLINE_TASK}` is multiple-choice continuation of "
                     "held-out validation passages (the true next words against those of other passages; see "
                     "`tasks/heldout_continuation.yaml` for the chance level). Re-run it: `lm_eval --model hf "
                     "--model_args pretrained=<folder> --include_path tasks --tasks heldout_continuation` "
                     "(`--model openvino --device cpu` for an OpenVINO folder).")
    else:
        lines.append("Tasks: lm-eval harness scores, ± standard error.")
    reasons = {}
    for row in rows:
        for task, scores in (row.get("tasks") or {}).items():
            if "skipped" in scores:
                reasons.setdefault((task, scores["skipped"]), []).append(row["name"])
    for (task, reason), names in reasons.items():
        lines.append(f"- `{task}` skipped for {', '.join(names)}: {reason}")
    for task, metric in task_cols:
        noise = within_noise(rows, task, metric)
        if noise:
            lines.append(f"- `{task}` cannot tell these models apart: {noise}")
    return lines


def within_noise(rows: list[dict], task: str, metric: str) -> str | None:
    """Why a task column separates no two models, or None: every pair of scores differs by less than twice the
    standard error of their difference (about a 95% interval), so any ranking by it is noise."""
    scored = []
    for row in rows:
        scores = (row.get("tasks") or {}).get(task) or {}
        value, err = scores.get(metric), (scores.get("stderr") or {}).get(metric)
        if isinstance(value, (int, float)) and isinstance(err, (int, float)):
            scored.append((row["name"], value, err))
    if len(scored) < 2:
        return None
    if any(abs(a[1] - b[1]) >= 2 * (a[2] ** 2 + b[2] ** 2) ** 0.5 for a in scored for b in scored if a is not b):
        return None
    low, high = min(s[1] for s in scored), max(s[1] for s in scored)
    return (f"its scores ({low:.3f} to {high:.3f}) all lie within twice the standard error of their differences "
            f"(± {max(s[2] for s in scored):.3f} each); use KL divergence and perplexity to compare them")


def plot(rows: list[dict], recipe: str, path: Path) -> None:
    """Perplexity against size on disk, one panel per text (the validation split, then general English): every
    stage folder (filled, labelled, arrows along the chain) and every quantize candidate (small); dominated models
    hollow; marker area shows generate speed; the shipped model ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = points(rows)
    texts = list(dict.fromkeys(t for p in pts for t in p["quality"]))[:2]
    fig, axes = plt.subplots(1, len(texts), figsize=(8 * len(texts), 5), dpi=100, squeeze=False)
    fastest = max((p.get("gen_tok_s") or 0) for p in pts) or 1
    for ax, text in zip(axes[0], texts):
        shown = [p for p in pts if text in p["quality"]]
        labels: list[tuple[dict, list[str]]] = []  # stage points and their labels; close points share one
        for p in shown:
            gen = p.get("gen_tok_s")
            stage = p["kind"] == "stage"
            size = (60 + 540 * (gen / fastest if gen else 0)) * (1 if stage else 0.4)
            face = "none" if p.get("dominated_by") else ("C0" if stage else "C1")
            ax.scatter(p["disk_mb"], p["quality"][text], s=size, alpha=0.8, facecolors=face,
                       edgecolors="red" if p["shipped"] else "black", linewidths=2.5 if p["shipped"] else 1)
            if stage:
                label = p["name"] + (f"\n{gen:.1f} tok/s" if gen else "") + (" (shipped)" if p["shipped"] else "")
                near = next((group for group in labels if _close(group[0], p, shown, text)), None)
                if near:  # a base and its fine-tune can sit on one spot (general English): one stacked label
                    near[1].append(label)
                else:
                    labels.append((p, [label]))
        for p, group in labels:
            ax.annotate("\n".join(group), (p["disk_mb"], p["quality"][text]), textcoords="offset points",
                        xytext=(10, 6), fontsize=9, va="bottom" if len(group) == 1 else "center")
        chain = {p["name"]: p for p in shown if p["kind"] == "stage"}
        # each model's arrow comes from the one it was made from (quantize: the input it shipped); a report
        # without parents (older runs) follows pipeline order
        links = [(chain[b["parent"]], b) for b in chain.values() if b.get("parent") in chain]
        links = links or list(zip(list(chain.values()), list(chain.values())[1:]))
        for a, b in links:
            ax.annotate("", xy=(b["disk_mb"], b["quality"][text]), xytext=(a["disk_mb"], a["quality"][text]),
                        arrowprops={"arrowstyle": "->", "color": "grey", "alpha": 0.6, "shrinkA": 8, "shrinkB": 8})
        if _log_axis([p["quality"][text] for p in shown]):
            ax.set_yscale("log")
        ax.set_xlabel("size on disk (MB)")
        ax.set_ylabel(f"perplexity on {text} (lower is better)")
        ax.set_title(text)
        ax.grid(True, alpha=0.3)
        ax.margins(x=0.25, y=0.2)
    fig.suptitle(f"{recipe}: quality vs size (stage folders blue, quantize candidates orange, dominated hollow, "
                 "shipped ringed red; marker area = generate tokens/s)", fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def _log_axis(values: list[float]) -> bool:
    """Whether the plot shows these perplexities on a log axis: when they span more than a decade."""
    return bool(values) and max(values) / min(values) > 10


def _close(a: dict, b: dict, shown: list[dict], text: str) -> bool:
    """Whether two points are close enough on the plot for their labels to overlap: within 4% of the sizes' span
    and 6% of the perplexities' (in log terms when they span a decade, as the axis then is)."""
    import math

    values = [p["quality"][text] for p in shown]
    scale = math.log if _log_axis(values) else (lambda v: v)
    sizes = [p["disk_mb"] for p in shown]
    span_x = (max(sizes) - min(sizes)) or 1
    span_y = (scale(max(values)) - scale(min(values))) or 1
    return (abs(a["disk_mb"] - b["disk_mb"]) < 0.04 * span_x
            and abs(scale(a["quality"][text]) - scale(b["quality"][text])) < 0.06 * span_y)


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
