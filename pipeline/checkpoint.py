"""Stage folders: written to a temporary folder, renamed when complete, skipped when unchanged."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from pipeline import dist, errors, interrupts
from pipeline.config import StageError

log = logging.getLogger("pipeline")
RECORD = "pipeline.json"
_expected_bytes: dict[Path, int] = {}  # staging folder -> bytes its model needs on disk (see save_model)


def fingerprint(*parts) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class CorruptRecord(StageError):
    """A stage folder's pipeline.json cannot be read: the folder is not to be trusted or consumed."""


def read_record(folder: str | Path) -> dict | None:
    """The stage record of a finished folder, or None if the folder has none (missing, or unfinished).
    A pipeline.json that is there but unreadable (truncated, edited by hand) raises CorruptRecord."""
    path = Path(folder) / RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        problem = f"line {err.lineno}, column {err.colno}: {err.msg}" if hasattr(err, "lineno") else str(err)
        record = problem
    if isinstance(record, dict):
        return record
    problem = record if isinstance(record, str) else f"a JSON {type(record).__name__}, not a stage record"
    stage = "load" if Path(folder).name == "base" else Path(folder).name
    raise CorruptRecord(
        f"'{path}' is corrupt or truncated ({problem}), so '{folder}' cannot be used. Re-run the stage that wrote "
        f"it: python -m pipeline run RECIPE --stages {stage} --force"
    )


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
    try:
        tmp.mkdir()
        yield tmp
        interrupts.raise_pending()  # a Ctrl-C some library swallowed still leaves no folder
    except BaseException as err:
        if any(isinstance(e, KeyboardInterrupt) for e in errors.chain(err)):
            interrupts.delivered()
        written = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()) if tmp.exists() else 0
        shutil.rmtree(tmp, ignore_errors=True)
        expected = _expected_bytes.pop(tmp, None)
        cause = next((e for e in errors.chain(err) if isinstance(e, OSError)), None)  # libraries wrap it
        if cause is not None and cause.errno in errors.DISK_FULL:
            raise errors.disk_full(tmp, written, expected) from err
        if cause is not None and cause.errno in errors.NOT_WRITABLE:
            raise errors.not_writable(cause.filename or tmp, cause) from err
        raise
    _expected_bytes.pop(tmp, None)
    old = final.parent / f".{final.name}.old"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def lock_files(run_dir: Path) -> tuple[Path, Path]:
    """Beside the run folder (which stays a plain folder of results): the lock, flock'ed while a run uses
    the folder (the OS drops it when the process ends, even killed), and who holds it, for the next run."""
    run_dir = Path(run_dir)
    return run_dir.parent / f".{run_dir.name}.lock", run_dir.parent / f".{run_dir.name}.lock.json"


def writable_run_dir(run_dir: Path) -> None:
    """Create the run folder and prove it is writable before any model is loaded."""
    probe = Path(run_dir) / f".write-test-{os.getpid()}"
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        if err.errno in errors.DISK_FULL:
            raise errors.disk_full(probe, 0) from err
        raise errors.not_writable(run_dir, err) from err


@contextlib.contextmanager
def run_lock(run_dir: Path, wait: bool = False):
    """Hold the run folder for one run at a time: a second run is refused (naming the first), or with
    `wait` queues behind it. Only rank 0 of a multi-process run takes it."""
    from filelock import FileLock, Timeout

    if not dist.is_main():
        yield
        return
    writable_run_dir(run_dir)
    lock_path, holder = lock_files(run_dir)
    lock = FileLock(str(lock_path), timeout=-1 if wait else 0)
    try:
        if wait and lock_holder(run_dir):
            log.info("run folder %s is in use (%s); waiting for it", run_dir, lock_holder(run_dir))
        lock.acquire()
    except Timeout:
        who = lock_holder(run_dir) or "another process"
        raise StageError(
            f"run folder '{run_dir}' is in use by another run ({who}). Wait for it to finish, add --wait to start "
            "when it does, or give this run its own folder (name=... or output_dir=...). A run that crashed "
            "does not keep the folder: the lock ends with its process."
        ) from None
    try:
        holder.write_text(json.dumps({"pid": os.getpid(), "host": platform.node(), "command": " ".join(sys.argv),
                                      "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}))
        yield
    finally:
        holder.unlink(missing_ok=True)
        lock.release()


def lock_holder(run_dir: Path) -> str | None:
    """'PID 123 on host, started ...' for the run that holds the folder, if it said."""
    try:
        info = json.loads(lock_files(run_dir)[1].read_text())
        return f"PID {info['pid']} on {info['host']}, started {info['started']}: {info['command']}"
    except (OSError, ValueError, KeyError):
        return None


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


def save_model(folder: Path, model, tokenizer, state_dict: dict | None = None) -> None:
    """Weights (safetensors), config and tokenizer; rank 0 only, as `Trainer.save_model` does.
    `state_dict`: weights gathered from FSDP/DeepSpeed ranks, when `model` holds only a shard."""
    if not dist.is_main():
        return
    need = model.get_memory_footprint() if hasattr(model, "get_memory_footprint") else None
    if need:
        _expected_bytes[Path(folder)] = need  # for the disk-full message, if the disk fills while writing
        free = errors.free_bytes(folder)
        if free is not None and free < need * 1.05:
            raise errors.disk_full(Path(folder), 0, need)
    model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(folder)


USAGE_REF = "path/or/repo-id"  # placeholder in loading snippets; a pushed card puts its repo id here


def write_card(folder: Path, record: dict) -> None:
    """Model card README.md with Hub metadata, rebuilt from the stage record."""
    tmp = folder / "README.md.tmp"
    tmp.write_text(str(model_card(record, folder)))
    tmp.replace(folder / "README.md")


def model_card(record: dict, folder: Path, repo_id: str | None = None, base_model: str | None = None,
               relation: str | None = None):
    """The card of a stage folder. Locally `base_model` is the upstream model; at push time `repo_id` is
    the repo the card goes to and `base_model` the parent stage's repo, so the Hub shows the lineage."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    name = repo_id.split("/")[-1] if repo_id else f"{record['recipe']}-{record['stage']}"
    if repo_id is None:
        base_model = record.get("base_model")
        made_from = f"`{record.get('parent')}`"
    else:  # a local path means nothing on the Hub: link the parent repo, or name the source file
        made_from = f"[{base_model}](/{base_model})" if base_model else f"`{Path(str(record.get('parent'))).name}`"
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
    evals += [
        EvalResult(task_type="text-generation", task_name=task, dataset_type=task, dataset_name=task,
                   metric_type=metric, metric_value=round(value, 4),
                   metric_name=f"{metric} (± {scores['stderr'][metric]:.4f})"
                   if isinstance((scores.get("stderr") or {}).get(metric), float) else metric)
        for task, scores in (record.get("tasks") or {}).items()
        for metric, value in scores.items() if isinstance(value, (int, float))
    ]
    evals += [  # answers to the held-out prompts of a chat recipe, scored by `evaluate` metrics
        EvalResult(task_type="text-generation", task_name="held-out answers",
                   dataset_type=record.get("dataset") or "held-out prompts",
                   dataset_name=record.get("dataset") or "held-out prompts", dataset_split="validation",
                   metric_type=metric, metric_value=value)
        for metric, value in (record.get("answer_scores") or {}).items() if isinstance(value, (int, float))
    ]
    data = ModelCardData(
        model_name=name,
        base_model=base_model,
        base_model_relation=relation,
        datasets=[record["dataset"]] if record.get("dataset") else None,
        library_name="gguf" if any(folder.glob("*.gguf")) else "transformers",
        pipeline_tag="text-generation",
        tags=sorted({"llm-pipeline", record["stage"], *record.get("tags", [])}),
        eval_results=evals or None,
    )
    metrics = {**record.get("metrics", {})}
    for e in record.get("evaluation", []):
        metrics[f"perplexity ({e['dataset']})"] = round(e["perplexity"], 4)
    for task, scores in (record.get("tasks") or {}).items():
        for metric, value in scores.items():
            if isinstance(value, (int, float)):
                metrics[f"{task} {metric}"] = round(value, 4)
            elif metric == "skipped":
                metrics[f"{task}"] = f"skipped: {value}"
    for metric, value in (record.get("answer_scores") or {}).items():
        metrics[f"answers {metric}"] = value if isinstance(value, (int, float)) else f"skipped: {value['skipped']}"
    rows = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in metrics.items())
    body = f"""
# {name}

Stage **{record['stage']}** of the recipe `{record['recipe']}`, made by llm-pipeline from {made_from}.
{record.get('summary', '')}

| metric | value |
| --- | --- |
{rows}

## Use it

```python
{usage(folder, repo_id or USAGE_REF)}
```
{gguf_usage(folder, repo_id)}{_requirement(record)}
The full stage configuration, library versions and timings are in `pipeline.json`.
"""
    return ModelCard("---\n" + data.to_yaml() + "\n---\n" + body)


def gguf_usage(folder: Path, repo_id: str | None) -> str:
    """llama.cpp and Ollama commands for a GGUF folder: the Hub repo once pushed, the local file before."""
    files = sorted(Path(folder).glob("*.gguf"))
    if not files:
        return ""
    tag = files[0].stem.rsplit("-", 1)[-1]  # <model>-Q8_0.gguf -> Q8_0, the tag Ollama and llama.cpp select by
    if repo_id:
        commands = (f"ollama run hf.co/{repo_id}:{tag}\n"
                    f"llama-cli -hf {repo_id}:{tag} -p \"The Python interpreter\"\n"
                    f"llama-server -hf {repo_id}:{tag}")
    else:
        commands = (f"llama-cli -m {files[0].name} -p \"The Python interpreter\"\n"
                    f"llama-server -m {files[0].name}\n"
                    f"# pushed to the Hub as <user>/<repo>: ollama run hf.co/<user>/<repo>:{tag}")
    return f"""
### llama.cpp, Ollama, LM Studio

`{files[0].name}` is a GGUF file ({tag}) with its tokenizer, chat template and hyper-parameters inside:

```bash
{commands}
```
"""


def _requirement(record: dict) -> str:
    """transformers 4.x cannot read the tokenizer files transformers 5 writes: say so where users look."""
    saved = (record.get("versions") or {}).get("transformers", "")
    if not saved.split(".")[0].isdigit() or int(saved.split(".")[0]) < 5:
        return ""
    return (f"\nSaved with transformers {saved}: load it with transformers >= 5 (4.x cannot read the tokenizer "
            "files transformers 5 writes).\n")


def usage(folder: Path, ref: str) -> str:
    """A loading snippet for the folder's format, read from its files, naming `ref` as the model."""
    return _usage_for_files(Path(folder)).replace(USAGE_REF, ref)


def _usage_for_files(folder: Path) -> str:
    from pipeline.models import is_openvino

    if (folder / "adapter_config.json").is_file():
        return ("from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
                f'model = AutoPeftModelForCausalLM.from_pretrained("{USAGE_REF}")\n'
                f'tokenizer = AutoTokenizer.from_pretrained("{USAGE_REF}")')
    if is_openvino(folder):
        return ("from optimum.intel import OVModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
                "# needs `pip install optimum-intel openvino`; runs on the CPU through OpenVINO, weights stay compressed\n"
                f'model = OVModelForCausalLM.from_pretrained("{USAGE_REF}")\n'
                f'tokenizer = AutoTokenizer.from_pretrained("{USAGE_REF}")')
    ggufs = sorted(p.name for p in folder.glob("*.gguf"))
    if ggufs:
        return ("from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                "# transformers dequantizes the GGUF weights to float32 on load\n"
                f'model = AutoModelForCausalLM.from_pretrained("{USAGE_REF}", gguf_file="{ggufs[0]}")\n'
                + (f'tokenizer = AutoTokenizer.from_pretrained("{USAGE_REF}")  # the tokenizer files beside it'
                   if (folder / "tokenizer_config.json").is_file() else
                   f'tokenizer = AutoTokenizer.from_pretrained("{USAGE_REF}", gguf_file="{ggufs[0]}")'))
    try:
        quant = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, json.JSONDecodeError):
        quant = {}
    note = ""
    if quant.get("quant_method") == "bitsandbytes":
        note = "# needs `pip install bitsandbytes`; the quantization config is read from config.json\n"
    return ("from transformers import AutoModelForCausalLM, AutoTokenizer\n\n" + note
            + f'model = AutoModelForCausalLM.from_pretrained("{USAGE_REF}"'
            + (', device_map="auto")\n' if note else ")\n")
            + f'tokenizer = AutoTokenizer.from_pretrained("{USAGE_REF}")')


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
