"""The stage record, `pipeline.json`: the contract between stages. Each stage folder holds one; the next
stage reads its input's record (its fingerprint, its lineage), evaluate adds its scores to it, and the model
card is rebuilt from it. `StageRecord` is its one typed reader and writer; `lineage` walks a folder's
parents back to the source model."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import StageError

RECORD = "pipeline.json"


def fingerprint(*parts) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class CorruptRecord(StageError):
    """A stage folder's pipeline.json cannot be read: the folder is not to be trusted or consumed."""


@dataclass
class StageRecord:
    """What a finished stage folder says about itself. Stage-specific details (prune's importance, quantize's
    candidate table, distill's loss, ...) live in `details` and sit at the top level of the JSON beside the
    common keys, as they always have."""

    stage: str  # the folder's stage: base (the load stage), finetune, prune, distill or quantize
    recipe: str = ""
    fingerprint: str = ""  # of the stage's input and settings: the next run skips the stage while it is unchanged
    parent: str = ""  # the folder it was made from; for base, the source (Hub id, folder or .gguf file)
    base_model: str | None = None  # the upstream model's Hub id, when known (model cards link it)
    dataset: str | None = None  # label of the recipe's data
    config: dict = field(default_factory=dict)  # the stage's resolved settings
    seconds: float | None = None
    metrics: dict = field(default_factory=dict)
    summary: str = ""  # a paragraph for the model card and the report
    tags: list = field(default_factory=list)  # Hub tags beyond llm-pipeline and the stage name
    chosen: str | None = None  # quantize: the candidate that was shipped
    teacher: dict | None = None  # distill: the teacher's folder, size and base model
    qat: dict | None = None  # finetune: the grid quantization-aware training trained for
    # written by the evaluate stage:
    evaluation: list = field(default_factory=list)  # perplexity per evaluated text
    tasks: dict = field(default_factory=dict)  # lm-eval scores by task
    answer_scores: dict = field(default_factory=dict)  # chat recipes: held-out answers, by metric
    scoreboard: dict = field(default_factory=dict)  # evaluate's whole row, with the fingerprint of its settings
    versions: dict = field(default_factory=dict)  # library versions that wrote it
    written_at: str | None = None
    details: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict) -> "StageRecord":
        known = {f.name for f in dataclasses.fields(cls)} - {"details"}
        if not isinstance(data.get("stage"), str):
            raise ValueError("it names no stage")
        return cls(**{k: v for k, v in data.items() if k in known},
                   details={k: v for k, v in data.items() if k not in known})

    def to_json(self) -> dict:
        """The JSON object: common keys that are set, then the details, flat."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name == "details":
                continue
            value = getattr(self, f.name)
            if f.name in ("stage", "recipe", "fingerprint", "parent"):
                out[f.name] = value
            elif value != (f.default if f.default is not dataclasses.MISSING else f.default_factory()):
                out[f.name] = value
        return {**out, **self.details}

    @property
    def params(self) -> int | None:
        return self.metrics.get("params")


def read_record(folder: str | Path) -> StageRecord | None:
    """The stage record of a finished folder, or None if the folder has none (missing, or unfinished).
    A pipeline.json that is there but unreadable (truncated, edited by hand) raises CorruptRecord."""
    path = Path(folder) / RECORD
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        problem = None if isinstance(data, dict) else f"a JSON {type(data).__name__}, not a stage record"
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        problem = f"line {err.lineno}, column {err.colno}: {err.msg}" if hasattr(err, "lineno") else str(err)
    if problem is None:
        try:
            return StageRecord.from_json(data)
        except (TypeError, ValueError) as err:
            problem = f"not a stage record: {err}"
    stage = "load" if Path(folder).name == "base" else Path(folder).name
    raise CorruptRecord(
        f"'{path}' is corrupt or truncated ({problem}), so '{folder}' cannot be used. Re-run the stage that wrote "
        f"it: python -m pipeline run RECIPE --stages {stage} --force"
    )


def read_stage(folder: str | Path) -> StageRecord | None:
    """The record of a stage folder, or of the stage folder a LoRA `adapter/` subfolder belongs to."""
    record = read_record(folder)
    if record is None and (Path(folder) / "adapter_config.json").is_file():
        record = read_record(Path(folder).parent)
    return record


def lineage(folder: str | Path) -> list[StageRecord]:
    """The records from `folder` back through each parent stage folder to the source model's `base` record
    (the last one), as far as the folders are still there."""
    chain, seen = [], set()
    record = read_stage(folder)
    while record is not None:
        chain.append(record)
        if record.stage == "base" or record.parent in seen:
            break
        seen.add(record.parent)
        record = read_stage(record.parent) if record.parent and Path(record.parent).is_dir() else None
    return chain


def origin(folder: str | Path) -> str | None:
    """The source a folder's lineage was loaded from (Hub id, folder or .gguf file), if its base is known."""
    chain = lineage(folder)
    return chain[-1].parent if chain and chain[-1].stage == "base" else None


def package_versions(packages) -> dict:
    """{package: version} of those installed."""
    import importlib.metadata as md

    out = {}
    for package in packages:
        try:
            out[package] = md.version(package)
        except md.PackageNotFoundError:
            pass
    return out


def versions() -> dict:
    """The core libraries every stage record names (a quantize record adds its format's own)."""
    return {"python": platform.python_version(),
            **package_versions(("torch", "transformers", "datasets", "accelerate", "peft", "bitsandbytes",
                                "huggingface_hub"))}


def write_json(folder: Path, record: StageRecord) -> StageRecord:
    """pipeline.json, stamped with the library versions and the time; returns the stamped record."""
    record = dataclasses.replace(record, versions=versions(), written_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    tmp = folder / (RECORD + ".tmp")
    tmp.write_text(json.dumps(record.to_json(), indent=2, default=str) + "\n")
    tmp.replace(folder / RECORD)
    return record
