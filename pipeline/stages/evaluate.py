"""Evaluate: perplexity, parameters and size on disk for the base model and every stage output."""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline import data, models, report
from pipeline.checkpoint import fingerprint, read_record, write_record
from pipeline.context import Context
from pipeline.metrics import perplexity

log = logging.getLogger("pipeline")
ModelName = Literal["base", "finetune", "distill", "quantize"]


@dataclass
class EvaluateConfig:
    enabled: bool = True
    models: list[ModelName] = field(default_factory=lambda: ["base", "finetune", "distill", "quantize"])
    context: int = 256  # tokens of each perplexity window
    stride: int = 128  # step between windows; each window scores only its last `stride`-ish new tokens
    max_tokens: int | None = 8192  # score at most this many validation tokens (null = all)

    def check(self) -> list[str]:
        problems = []
        if self.context < 2:
            problems.append(f"context: {self.context} must be at least 2")
        if not 1 <= self.stride <= self.context:
            problems.append(f"stride: {self.stride} must be between 1 and context ({self.context})")
        if self.max_tokens is not None and self.max_tokens < 2:
            problems.append(f"max_tokens: {self.max_tokens} must be at least 2, or null for all")
        return problems


def evaluate_folder(folder: Path, cfg: EvaluateConfig, ctx: Context) -> dict:
    """Perplexity of one model folder on the validation split (cached in its pipeline.json)."""
    record = read_record(folder)
    eval_fp = fingerprint("evaluate", dataclasses.asdict(cfg), dataclasses.asdict(ctx.data), ctx.seed,
                          record.get("fingerprint"))
    cached = [e for e in record.get("evaluation", []) if e.get("fingerprint") == eval_fp]
    if cached and not ctx.force:
        log.info("evaluate: %s already evaluated with these settings, reusing", folder.name)
        return cached[0]
    device = models.pick_device()
    started = time.time()
    model, tokenizer = models.load_folder(folder, device_map=str(device))
    tokenized = data.prepare(ctx.data, tokenizer, ctx.seed)
    result = perplexity(model, data.eval_stream(tokenized["validation"]), cfg.context, cfg.stride, cfg.max_tokens)
    result.update(
        dataset=ctx.data.label,
        split="validation",
        params=models.count_params(model),
        disk_mb=round(models.disk_size(folder) / 2**20, 2),
        device=str(device),
        seconds=round(time.time() - started, 1),
        fingerprint=eval_fp,
    )
    log.info("evaluate: %s perplexity %.3f on %d tokens", folder.name, result["perplexity"], result["scored_tokens"])
    # The stage folder's card and record carry their own evaluation, as Hub cards do.
    record["evaluation"] = [result]
    write_record(folder, record)
    return result


def run(cfg: EvaluateConfig, ctx: Context) -> Path:
    rows = []
    for name in cfg.models:
        folder = ctx.run_dir / name
        if read_record(folder) is None:
            log.info("evaluate: no finished %s folder in %s, skipping it", name, ctx.run_dir)
            continue
        row = {"name": name, "folder": str(folder), **evaluate_folder(folder, cfg, ctx)}
        if name == "distill":  # so the report can set the student against its teacher
            row["teacher"] = read_record(folder).get("parent")
        rows.append(row)
    report.write(ctx.run_dir, ctx.recipe, rows)
    return ctx.run_dir
