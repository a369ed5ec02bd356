"""What every stage needs to know about the run it belongs to."""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.data import DataConfig
from pipeline.data import stamps as data_stamps
from pipeline.errors import StageError
from pipeline.general import GeneralConfig
from pipeline.records import (
    CorruptRecord,
    StageRecord,
    fingerprint,
    read_record,
    read_stage,
)

log = logging.getLogger("pipeline")


@dataclass
class Context:
    recipe: str  # recipe name: runs/<recipe>/...
    run_dir: Path
    seed: int = 42
    data: DataConfig = field(default_factory=DataConfig)
    general: GeneralConfig = field(default_factory=GeneralConfig)  # the recipe's general-English text
    force: bool = False  # re-run stages even when their inputs and config are unchanged
    trust_remote_code: bool = False
    inputs: dict[str, Path] = field(default_factory=dict)  # stage name -> folder it reads
    also: dict[str, list[Path]] = field(default_factory=dict)  # stage name -> more folders it reads (quantize.inputs)
    model_folders: tuple[str, ...] = ()  # the run's model folders in pipeline order (from the stage table)
    # the model every other is compared with (KL divergence, top-1 agreement, quality budgets): the fine-tuned
    # model, or the base model when fine-tuning is off
    reference: Path | None = None
    stale: dict[str, str] = field(default_factory=dict)  # model folder -> why it does not match the recipe now
    skipped: set[str] = field(default_factory=set)  # stages whose output was already current


@dataclass
class StageRun:
    """A stage about to run: where it writes, its fingerprint, and the record of its input."""

    stage: str
    out: Path
    fingerprint: str
    parent: StageRecord
    config: dict
    started: float = field(default_factory=time.time)

    def record(self, ctx: Context, *, metrics: dict, summary: str, tags: list[str], chosen: str | None = None,
               teacher: dict | None = None, qat: dict | None = None, parent: str | None = None,
               **details) -> StageRecord:
        """The record of the folder this stage writes; `details` are its own keys (importance, candidates, ...);
        `parent`: the folder it was made from, when not its (first) input."""
        return StageRecord(stage=self.stage, recipe=ctx.recipe, fingerprint=self.fingerprint,
                           parent=parent or str(ctx.inputs.get(self.stage, "")), base_model=self.parent.base_model,
                           dataset=ctx.data.label, config=self.config, seconds=round(time.time() - self.started, 1),
                           metrics=metrics, summary=summary, tags=tags, chosen=chosen, teacher=teacher, qat=qat,
                           details=details)


def begin(ctx: Context, stage: str, cfg, out: Path | None = None, extra: tuple = ()) -> StageRun | None:
    """Prepare a stage; None means its output is already current and the stage is skipped. `extra`: more that the
    stage's output depends on (see stage_fingerprint)."""
    folder = ctx.inputs[stage]
    parent = read_stage(folder)  # a finetune's adapter/ subfolder: the finetune folder's record
    if parent is None:
        raise StageError(
            f"{stage}: input folder '{folder}' is missing or incomplete (no pipeline.json). "
            f"Run the stage that writes it first, or set {stage}.input to a finished stage folder."
        )
    out = out or ctx.run_dir / stage
    config = dataclasses.asdict(cfg)
    fp = stage_fingerprint(ctx, stage, cfg, parent, extra)
    if up_to_date(ctx, stage, out, fp):
        return None
    log.info("%s: reading %s, writing %s", stage, folder, out)
    return StageRun(stage, out, fp, parent, config)


def stage_fingerprint(ctx: Context, stage: str, cfg, parent: StageRecord, extra: tuple = ()) -> str:
    """What a stage's record says when its output matches its input (`parent`), its settings, the recipe's data
    and the local data files as they are now, and `extra` (what else a stage's output depends on: nothing by
    default, so that the fingerprints of stages that give none stay what they were)."""
    parts = (stage, result_settings(cfg), parent.fingerprint, dataclasses.asdict(ctx.data), ctx.seed)
    files = data_stamps(ctx.data, getattr(cfg, "data", None))
    # (no files, no other inputs: as before, nothing re-runs)
    also = [(read_stage(f) or StageRecord(stage="missing")).fingerprint for f in ctx.also.get(stage, [])]
    return fingerprint(*parts, *([files] if files else []), *([also] if also else []), *extra)


def result_settings(cfg) -> dict:
    """The settings that can change a stage's output; fields marked `metadata={"fingerprint": False}`
    (where checkpoints go, progress bars, ...) are left out so changing them re-runs nothing. Fields marked
    `metadata=training.ADDED` count only when set to something else than their default: keys added after runs were
    made, so that a run folder made before them is still current."""
    values = dataclasses.asdict(cfg)
    out = {}
    for f in dataclasses.fields(cfg):
        mark = f.metadata.get("fingerprint", True)
        if mark == "unless_default" and values[f.name] == _default(f):
            continue
        if mark:
            out[f.name] = values[f.name]
    return out


def _default(f: dataclasses.Field):
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def up_to_date(ctx: Context, stage: str, out: Path, fp: str) -> bool:
    try:
        current = read_record(out)
    except CorruptRecord as err:  # the stage's own output: writing it again is the fix
        log.warning("%s: %s; running the stage again", stage, err)
        current = None
    if ctx.force or current is None or current.fingerprint != fp:
        return False
    log.info("%s: %s is up to date (same input, config and data files), skipping; use --force to re-run", stage, out)
    ctx.skipped.add(stage)
    return True
