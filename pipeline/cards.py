"""Model cards: the README.md of every stage folder, with Hub metadata (base_model, datasets, tags,
model-index results), rebuilt from the folder's stage record; push writes a Hub variant with the lineage."""
from __future__ import annotations

from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from pipeline import formats
from pipeline.records import StageRecord

USAGE_REF = "path/or/repo-id"  # placeholder in loading snippets; a pushed card puts its repo id here


def write_card(folder: Path, record: StageRecord) -> None:
    """Model card README.md with Hub metadata, rebuilt from the stage record."""
    tmp = folder / "README.md.tmp"
    tmp.write_text(str(model_card(record, folder)))
    tmp.replace(folder / "README.md")


def model_card(record: StageRecord, folder: Path, repo_id: str | None = None, base_model: str | None = None,
               relation: str | None = None):
    """The card of a stage folder. Locally `base_model` is the upstream model; at push time `repo_id` is
    the repo the card goes to and `base_model` the parent stage's repo, so the Hub shows the lineage."""
    name = repo_id.split("/")[-1] if repo_id else f"{record.recipe}-{record.stage}"
    if repo_id is None:
        base_model = record.base_model
        made_from = f"`{record.parent}`"
    else:  # a local path means nothing on the Hub: link the parent repo, or name the source file
        made_from = f"[{base_model}](/{base_model})" if base_model else f"`{Path(str(record.parent)).name}`"
    evals = [
        EvalResult(
            task_type="text-generation",
            dataset_type=e["dataset"],
            dataset_name=e["dataset"],
            metric_type="perplexity",
            metric_value=round(e["perplexity"], 4),
        )
        for e in record.evaluation
    ]
    evals += [
        EvalResult(task_type="text-generation", task_name=task, dataset_type=task, dataset_name=task,
                   metric_type=metric, metric_value=round(value, 4),
                   metric_name=f"{metric} (± {scores['stderr'][metric]:.4f})"
                   if isinstance((scores.get("stderr") or {}).get(metric), float) else metric)
        for task, scores in record.tasks.items()
        for metric, value in scores.items() if isinstance(value, (int, float))
    ]
    evals += [  # answers to the held-out prompts of a chat recipe, scored by `evaluate` metrics
        EvalResult(task_type="text-generation", task_name="held-out answers",
                   dataset_type=record.dataset or "held-out prompts",
                   dataset_name=record.dataset or "held-out prompts", dataset_split="validation",
                   metric_type=metric, metric_value=value)
        for metric, value in record.answer_scores.items() if isinstance(value, (int, float))
    ]
    data = ModelCardData(
        model_name=name,
        base_model=base_model,
        base_model_relation=relation,
        datasets=[record.dataset] if record.dataset else None,
        library_name="gguf" if any(folder.glob("*.gguf")) else "transformers",
        pipeline_tag="text-generation",
        tags=sorted({"llm-pipeline", record.stage, *record.tags}),
        eval_results=evals or None,
    )
    metrics = {**record.metrics}
    for e in record.evaluation:
        metrics[f"perplexity ({e['dataset']})"] = round(e["perplexity"], 4)
    for task, scores in record.tasks.items():
        for metric, value in scores.items():
            if isinstance(value, (int, float)):
                metrics[f"{task} {metric}"] = round(value, 4)
            elif metric == "skipped":
                metrics[f"{task}"] = f"skipped: {value}"
    for metric, value in record.answer_scores.items():
        metrics[f"answers {metric}"] = value if isinstance(value, (int, float)) else f"skipped: {value['skipped']}"
    rows = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in metrics.items())
    body = f"""
# {name}

Stage **{record.stage}** of the recipe `{record.recipe}`, made by llm-pipeline from {made_from}.
{record.summary}

| metric | value |
| --- | --- |
{rows}

## Use it

```python
{formats.usage(folder, repo_id or USAGE_REF)}
```
{formats.card_section(folder, repo_id)}{_requirement(record)}
The full stage configuration, library versions and timings are in `pipeline.json`.
"""
    return ModelCard("---\n" + data.to_yaml() + "\n---\n" + body)


def _requirement(record: StageRecord) -> str:
    """transformers 4.x cannot read the tokenizer files transformers 5 writes: say so where users look."""
    saved = record.versions.get("transformers", "")
    if not saved.split(".")[0].isdigit() or int(saved.split(".")[0]) < 5:
        return ""
    return (f"\nSaved with transformers {saved}: load it with transformers >= 5 (4.x cannot read the tokenizer "
            "files transformers 5 writes).\n")


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
