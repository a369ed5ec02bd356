"""Stage folders: written to a temporary folder, renamed when complete, skipped when unchanged."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import platform
import shutil
import tempfile
import time
from pathlib import Path

from pipeline import dist

log = logging.getLogger("pipeline")
RECORD = "pipeline.json"


def fingerprint(*parts) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def read_record(folder: str | Path) -> dict | None:
    """The stage record of a finished folder, or None if the folder is missing or incomplete."""
    path = Path(folder) / RECORD
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


@contextlib.contextmanager
def staging(final: Path):
    """Yield a temporary sibling folder; on success it atomically replaces `final`, on failure it is removed.

    In a multi-process run only rank 0 writes: the other ranks get a scratch folder that is thrown away
    (the runner makes them wait for rank 0 before they read the finished folder)."""
    if not dist.is_main():
        with tempfile.TemporaryDirectory(prefix=f"{final.name}-rank{dist.rank()}-") as scratch:
            yield Path(scratch)
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.partial"
    if tmp.exists():  # left over from an interrupted run: never consumed, safe to discard
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.parent / f".{final.name}.old"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "datasets", "accelerate", "peft", "bitsandbytes", "huggingface_hub"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def write_record(folder: Path, record: dict) -> None:
    """pipeline.json and the model card (rank 0 only, like every write)."""
    if not dist.is_main():
        return
    record = {**record, "versions": versions(), "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = folder / (RECORD + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    tmp.replace(folder / RECORD)
    write_card(folder, record)


def save_model(folder: Path, model, tokenizer) -> None:
    """Weights (safetensors), config and tokenizer; rank 0 only, as `Trainer.save_model` does."""
    if not dist.is_main():
        return
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def write_card(folder: Path, record: dict) -> None:
    """Model card README.md with Hub metadata, rebuilt from the stage record."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    name = f"{record['recipe']}-{record['stage']}"
    evals = [
        EvalResult(
            task_type="text-generation",
            dataset_type=e["dataset"],
            dataset_name=e["dataset"],
            metric_type="perplexity",
            metric_value=round(e["perplexity"], 4),
        )
        for e in record.get("evaluation", [])
    ]
    data = ModelCardData(
        model_name=name,
        base_model=record.get("base_model"),
        datasets=[record["dataset"]] if record.get("dataset") else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=sorted({"llm-pipeline", record["stage"], *record.get("tags", [])}),
        eval_results=evals or None,
    )
    metrics = {**record.get("metrics", {})}
    for e in record.get("evaluation", []):
        metrics[f"perplexity ({e['dataset']})"] = round(e["perplexity"], 4)
    rows = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in metrics.items())
    body = f"""
# {name}

Stage **{record['stage']}** of the recipe `{record['recipe']}`, made by llm-pipeline from `{record.get('parent')}`.
{record.get('summary', '')}

| metric | value |
| --- | --- |
{rows}

## Use it

```python
{record.get('usage') or _default_usage()}
```

The full stage configuration, library versions and timings are in `pipeline.json`.
"""
    card = ModelCard("---\n" + data.to_yaml() + "\n---\n" + body)
    tmp = folder / "README.md.tmp"
    tmp.write_text(str(card))
    tmp.replace(folder / "README.md")


def _default_usage() -> str:
    return (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        'model = AutoModelForCausalLM.from_pretrained("path/or/repo-id")\n'
        'tokenizer = AutoTokenizer.from_pretrained("path/or/repo-id")'
    )


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
