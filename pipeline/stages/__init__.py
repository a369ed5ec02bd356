"""The stage table: one row per stage, in pipeline order. Each stage is a module of this package with a
typed config dataclass and `run(cfg, ctx) -> Path`; the runner, the recipe schema and its checks, push and
evaluate take their lists of stages and folders from this table, so adding a stage is its module plus a row."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from pipeline.stages import distill, evaluate, finetune, load, prune, quantize


@dataclass(frozen=True)
class Stage:
    name: str  # as on the command line (--stages, --until) and as the recipe section
    config: type  # the settings dataclass that `run` takes
    run: Callable  # run(cfg, ctx) -> Path
    folder: str | None  # the model folder it writes under runs/<recipe>/ (None: it writes no model)
    section: bool = True  # a recipe section of its own (load's one setting is the recipe's top-level `model`)
    trains: bool = False  # every rank of a multi-process run takes part (the others run on rank 0 alone)
    relation: str | None = None  # Hub `base_model_relation` to the stage folder it was made from
    student: bool = False  # writes a smaller model than the one it was made from (quantize also tries that one)
    # (cfg, ctx) -> the fingerprint its folder has when current, for a stage that reads no stage folder (load);
    # the chained stages' is context.stage_fingerprint of their input's record
    fingerprint: Callable | None = None
    # ctx -> what more a chained stage's output depends on (its `begin(..., extra=)`), so the stale check agrees
    extra: Callable | None = None

    @property
    def chained(self) -> bool:
        """Reads the previous enabled stage's model folder (`<stage>.input: auto`) and writes its own."""
        return self.section and self.folder is not None


# Pruning and distillation change the parent's weights, so they count as a fine-tune: the Hub has no closer
# relation.
STAGES = (
    Stage("load", load.LoadConfig, load.run, "base", section=False, fingerprint=load.stage_fingerprint),
    Stage("finetune", finetune.FinetuneConfig, finetune.run, "finetune", trains=True, relation="finetune"),
    Stage("prune", prune.PruneConfig, prune.run, "prune", relation="finetune", student=True),
    Stage("distill", distill.DistillConfig, distill.run, "distill", trains=True, relation="finetune", student=True),
    Stage("quantize", quantize.QuantizeConfig, quantize.run, "quantize", relation="quantized",
          extra=quantize.scored_general),
    Stage("evaluate", evaluate.EvaluateConfig, evaluate.run, None),
)
ORDER = tuple(s.name for s in STAGES)
BY_NAME = {s.name: s for s in STAGES}
SECTIONS = tuple(s for s in STAGES if s.section)  # the recipe's stage sections, in pipeline order
CHAINED = tuple(s for s in STAGES if s.chained)  # stages with an `input` key
MODEL_FOLDERS = tuple(s.folder for s in STAGES if s.folder)  # base, finetune, ...: what evaluate and push read
BY_FOLDER = {s.folder: s for s in STAGES if s.folder}


def settings(stage: Stage, recipe):
    """The config `stage.run` takes from a parsed recipe: its section, or (load) the top-level keys it names."""
    if stage.section:
        return getattr(recipe, stage.name)
    return stage.config(**{f.name: getattr(recipe, f.name) for f in dataclasses.fields(stage.config)})


def enabled(stage: Stage, recipe) -> bool:
    return not stage.section or getattr(recipe, stage.name).enabled
