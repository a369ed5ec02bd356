"""runs/<recipe>/report.{md,json,png}: every model side by side on quality, size and speed."""
from __future__ import annotations

import json
import time
from pathlib import Path

from pipeline import interrupts
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
    ("repetition_4gram", "repeated 4-grams", "{:.0%}"),  # of the samples' words: high = a looping model
]


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
    headers = ([h for _, h, _ in cols] + [f"ppl {name}" for name in extra]
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
        if row.get("stale"):
            cells[0] += " *(stale)*"
        by_name = {e["dataset"]: e for e in row.get("evaluations", [])}
        cells += [f"{by_name[n]['perplexity']:.3f}" if n in by_name else "–" for n in extra]
        cells += [task_cell((row.get("tasks") or {}).get(task), metric) for task, metric in task_cols]
        cells += [answer_cell((row.get("answers") or {}).get("scores", {}).get(m)) for m in answer_cols]
        lines.append("| " + " | ".join(cells) + " |")
    lines += task_notes(rows, task_cols) + answer_notes(rows, answer_cols)
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
                         f"{speed['repeats']} runs after a warm-up. Peak memory: what loading and "
                         "scoring the model added (process RSS rise on CPU, allocator peak on CUDA).")
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
    return lines


def plot(rows: list[dict], recipe: str, path: Path) -> None:
    """Perplexity against size on disk, one labelled point per model; marker area shows generate speed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    fastest = max((r.get("gen_tok_s") or 0) for r in rows) or 1
    for row in rows:
        gen = row.get("gen_tok_s")
        size = 60 + 540 * (gen / fastest if gen else 0)
        ax.scatter(row["disk_mb"], row["perplexity"], s=size, alpha=0.7, edgecolors="black")
        label = row["name"] + (f"\n{gen:.1f} tok/s" if gen else "")
        ax.annotate(label, (row["disk_mb"], row["perplexity"]), textcoords="offset points", xytext=(10, 6),
                    fontsize=9)
    # the chain, base → finetune → prune → distill → quantize, as arrows from each model to the next
    for a, b in zip(rows, rows[1:]):
        ax.annotate("", xy=(b["disk_mb"], b["perplexity"]), xytext=(a["disk_mb"], a["perplexity"]),
                    arrowprops={"arrowstyle": "->", "color": "grey", "alpha": 0.6, "shrinkA": 8, "shrinkB": 8})
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel("perplexity (lower is better)")
    if max(r["perplexity"] for r in rows) / min(r["perplexity"] for r in rows) > 10:
        ax.set_yscale("log")
    ax.set_title(f"{recipe}: quality vs size (marker area = generate tokens/s)")
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.25, y=0.2)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
