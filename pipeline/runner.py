"""Chain the stages of a recipe: each reads the previous enabled stage's folder (or an explicit path)."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from pipeline import dist
from pipeline.context import Context, stage_fingerprint
from pipeline.errors import StageError
from pipeline.push import Publisher
from pipeline.recipe import Recipe
from pipeline.records import CorruptRecord, read_record, read_stage
from pipeline.runlock import run_lock
from pipeline.stages import (
    BY_FOLDER,
    BY_NAME,
    CHAINED,
    MODEL_FOLDERS,
    ORDER,
    STAGES,
    enabled,
    settings,
)

log = logging.getLogger("pipeline")


def context(recipe: Recipe, force: bool = False) -> Context:
    """Resolve which folder each stage reads: `input: auto` means the last enabled stage before it."""
    ctx = Context(recipe=recipe.name, run_dir=recipe.run_dir, seed=recipe.seed, data=recipe.data, general=recipe.general,
                  force=force, trust_remote_code=recipe.trust_remote_code, model_folders=MODEL_FOLDERS)
    previous = ctx.run_dir / STAGES[0].folder
    ctx.reference = ctx.run_dir / ("finetune" if recipe.finetune.enabled else STAGES[0].folder)
    for stage in CHAINED:
        cfg = getattr(recipe, stage.name)
        ctx.inputs[stage.name] = previous if cfg.input == "auto" else Path(cfg.input)
        if getattr(cfg, "inputs", False) is not False:  # a stage that reads several folders
            folders = several_inputs(cfg, ctx, previous, ctx.inputs[stage.name])
            ctx.inputs[stage.name], ctx.also[stage.name] = folders[0], folders[1:]
        if cfg.enabled:
            previous = ctx.run_dir / stage.folder
    return ctx


def several_inputs(cfg, ctx: Context, previous: Path, given: Path) -> list[Path]:
    """`inputs` as folders: `auto` is the previous enabled stage's, a stage folder name is the run's. By default
    (null) the stage's input and, when that is auto and a student (pruned or distilled), the reference model it
    descends from: the plain quantization of the fine-tuned model then competes with the chain's."""
    if cfg.inputs is None:
        names = [given] + ([ctx.reference] if cfg.input == "auto" and is_student(previous, ctx) else [])
    else:
        names = [previous if n == "auto" else ctx.run_dir / n if n in MODEL_FOLDERS else Path(n) for n in cfg.inputs]
    return list(dict.fromkeys(Path(n) for n in names))


def is_student(folder: Path, ctx: Context) -> bool:
    stage = BY_FOLDER.get(folder.name) if folder.parent == ctx.run_dir else None
    return stage is not None and stage.student


def stale_folders(recipe: Recipe, ctx: Context) -> dict[str, str]:
    """The run's model folders that the recipe, as it is now, would not make: a disabled stage's folder from an
    earlier run, a folder made with other settings or data (a re-run that was interrupted leaves the old one),
    and everything made from a stale folder. {folder: why}."""
    out: dict[str, str] = {}
    for stage in STAGES:
        folder = ctx.run_dir / stage.folder if stage.folder else None
        try:
            record = read_record(folder) if folder else None
        except CorruptRecord:
            continue  # the stage that reads it says so
        if record is None:
            continue
        if not enabled(stage, recipe):
            out[stage.folder] = f"{stage.name} is disabled in the recipe; this folder is from an earlier run"
            continue
        parent = Path(ctx.inputs[stage.name]) if stage.chained else None
        if parent is not None and parent.parent == ctx.run_dir and parent.name in out:
            out[stage.folder] = f"made from {parent.name}, which is stale"
            continue
        cfg = settings(stage, recipe)
        if stage.fingerprint is not None:
            expected = stage.fingerprint(cfg, ctx)
        else:
            parent_record = read_stage(parent)
            extra = stage.extra(ctx) if stage.extra else ()
            expected = stage_fingerprint(ctx, stage.name, cfg, parent_record, extra) if parent_record else None
        if record.fingerprint != expected:
            out[stage.folder] = (f"made with other settings, input or data than the recipe's now; run "
                                 f"`--stages {stage.name}` (or the whole recipe) to refresh it")
    return out


def _warn_stale_inputs(recipe: Recipe, ctx: Context, stage: str) -> None:
    """Say so when `stage` is about to read a run folder that the recipe, as it is now, would not make (`--stages
    quantize` after distill's settings changed): what it makes from it is marked stale by evaluate in turn."""
    reads = [Path(ctx.inputs[stage]), *map(Path, ctx.also.get(stage, []))]
    reads = [f for f in reads if f.parent == ctx.run_dir]
    if not reads:
        return
    stale = stale_folders(recipe, ctx)
    for folder in reads:
        if folder.name in stale:
            log.warning("%s: reads %s, which is stale: %s", stage, folder.name, stale[folder.name])


def enabled_stages(recipe: Recipe) -> list[str]:
    return [s.name for s in STAGES if enabled(s, recipe)]


def run(recipe: Recipe, stages: list[str] | None = None, force: bool = False,
        until: str | None = None, wait: bool = False) -> dict[str, Path]:
    """Run the chosen stages (default: all enabled ones, or those up to `until`) in pipeline order, holding
    the run folder so that no other run writes it meanwhile (`wait`: queue behind one that does)."""
    asked = list(stages or []) + ([until] if until else [])
    unknown = [s for s in asked if s not in ORDER]
    if unknown:
        raise StageError(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(ORDER)}")
    enabled = enabled_stages(recipe)
    disabled = [s for s in asked if s not in enabled]
    if disabled:  # running something else instead (everything, for --until) is not what was asked for
        flag = "--until" if until in disabled and not stages else "--stages"
        raise StageError(f"{flag} names {', '.join(disabled)}, which the recipe disables "
                         f"({disabled[0]}.enabled: false); enable it ({disabled[0]}.enabled=true) or name enabled "
                         f"stages: {', '.join(enabled)}")
    with run_lock(recipe.run_dir, wait=wait):
        return _run(recipe, stages, force, until)


def _run(recipe: Recipe, stages: list[str] | None, force: bool, until: str | None) -> dict[str, Path]:
    enabled = enabled_stages(recipe)
    chosen = stages or (enabled[: enabled.index(until) + 1] if until else enabled)
    ctx = context(recipe, force)
    publisher = None
    if recipe.push.push_to_hub:  # check the token and namespace before hours of training, not after
        publisher = Publisher(recipe)
    outputs: dict[str, Path] = {}
    took: dict[str, float] = {}
    for stage in ORDER:
        if stage not in chosen:
            continue
        row = BY_NAME[stage]
        # Under `accelerate launch` every rank trains; rank 0 alone loads, quantizes and evaluates. All ranks
        # meet before and after each training stage, so nobody reads a folder rank 0 is still writing.
        together = row.trains
        if not together and not dist.is_main():
            continue
        if together:
            dist.barrier()
        started = time.time()
        log.info("=== %s ===", stage)
        if not row.folder:  # a stage that reads every folder (evaluate) marks those the recipe would not make now
            ctx.stale = stale_folders(recipe, ctx)
        elif row.chained:  # one that reads an earlier stage's folder names it when the recipe would not make it now
            _warn_stale_inputs(recipe, ctx, stage)
        outputs[stage] = row.run(settings(row, recipe), ctx)
        if together:
            dist.barrier()
        took[stage] = time.time() - started
        log.info("%s: done in %.1fs → %s", stage, took[stage], outputs[stage])
        if publisher:
            publisher.after_stage(stage)
    if took and dist.is_main():
        log.info("summary:\n%s", summary(ctx, outputs, took))
    return outputs


def summary(ctx: Context, outputs: dict[str, Path], took: dict[str, float]) -> str:
    """One line per stage that ran (or was already current), and where the report is."""
    lines = []
    for stage, seconds in took.items():
        state = "up to date, skipped" if stage in ctx.skipped else f"{seconds:.0f}s"
        lines.append(f"  {stage:<9} {state:>22}  → {outputs[stage]}")
    lines.append(f"  {'total':<9} {sum(took.values()):>21.0f}s")
    report = ctx.run_dir / "report.md"
    if "evaluate" in outputs and report.is_file():
        lines.append(f"  report: {report} (plot: {ctx.run_dir / 'report.png'})")
    return "\n".join(lines)
