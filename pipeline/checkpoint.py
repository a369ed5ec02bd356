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


def save_model(folder: Path, model, tokenizer, state_dict: dict | None = None) -> None:
    """Weights (safetensors), config and tokenizer; rank 0 only, as `Trainer.save_model` does.
    `state_dict`: weights gathered from FSDP/DeepSpeed ranks, when `model` holds only a shard."""
    if not dist.is_main():
        return
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
