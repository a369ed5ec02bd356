"""runs/<recipe>/report.md and report.json: one row per model, what each step cost and gained."""
from __future__ import annotations

import json
import time
from pathlib import Path

COLUMNS = [  # (key, header, format)
    ("name", "model", "{}"),
    ("params", "params", "{:,}"),
    ("disk_mb", "disk MB", "{:.1f}"),
    ("perplexity", "perplexity", "{:.3f}"),
    ("ppl_vs_base_pct", "Δ ppl vs base", "{:+.1f}%"),
    ("size_vs_base_pct", "size vs base", "{:.0f}%"),
    ("scored_tokens", "tokens scored", "{:,}"),
]


def write(run_dir: Path, recipe: str, rows: list[dict]) -> None:
    base = next((r for r in rows if r["name"] == "base"), None)
    for row in rows:
        if base:
            row["ppl_vs_base_pct"] = round(100 * (row["perplexity"] / base["perplexity"] - 1), 2)
            row["size_vs_base_pct"] = round(100 * row["disk_mb"] / base["disk_mb"], 1)
    payload = {"recipe": recipe, "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "models": rows}
    _atomic(run_dir / "report.json", json.dumps(payload, indent=2) + "\n")
    _atomic(run_dir / "report.md", markdown(recipe, rows))


def markdown(recipe: str, rows: list[dict]) -> str:
    cols = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    lines = [f"# Report: {recipe}", "", "| " + " | ".join(h for _, h, _ in cols) + " |",
             "|" + "---|" * len(cols)]
    for row in rows:
        cells = [fmt.format(row[k]) if row.get(k) is not None else "–" for k, _, fmt in cols]
        lines.append("| " + " | ".join(cells) + " |")
    for row in rows:
        teacher = next((t for t in rows if row.get("teacher") and t["folder"] == row["teacher"]), None)
        if teacher:
            lines += ["", f"Distillation: the student `{row['name']}` has {row['perplexity'] / teacher['perplexity']:.2f}x "
                      f"the perplexity of its teacher `{teacher['name']}` ({row['perplexity']:.3f} vs "
                      f"{teacher['perplexity']:.3f}) with {row['params'] / teacher['params']:.0%} of its parameters "
                      f"and {row['disk_mb'] / teacher['disk_mb']:.0%} of its size."]
    if rows:
        r = rows[0]
        lines += ["", f"Perplexity: {r['dataset']} validation split, context {r['context']}, stride {r['stride']}, "
                  f"on {r['device']}. Size: weight files on disk."]
    return "\n".join(lines) + "\n"


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
