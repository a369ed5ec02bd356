"""Load: materialise the source model (Hub id, folder, GGUF, alias) as a standard model folder `base/`."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline import models
from pipeline.context import Context, up_to_date
from pipeline.folders import save_model, staging, write_record
from pipeline.records import StageRecord, fingerprint

log = logging.getLogger("pipeline")

# Hub ids for offline aliases, so cards point at the real upstream model.
ALIAS_HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}


@dataclass
class LoadConfig:
    model: str  # the recipe's `model`


def run(cfg: LoadConfig, ctx: Context) -> Path:
    source = models.resolve(cfg.model)
    out = ctx.run_dir / "base"
    stamp = None
    if source.kind != "hub":
        path = Path(source.path) / (source.gguf_file or "config.json")
        stamp = (path.stat().st_size, int(path.stat().st_mtime))
    fp = fingerprint("load", cfg.model, stamp, ctx.trust_remote_code)
    if up_to_date(ctx, "load", out, fp):
        return out
    started = time.time()
    log.info("load: %s (%s)", source.label, source.kind)
    model = models.load_model(source, trust_remote_code=ctx.trust_remote_code)
    tokenizer = models.load_tokenizer(source, trust_remote_code=ctx.trust_remote_code)
    base_model = ALIAS_HUB_IDS.get(cfg.model) or (cfg.model if source.kind == "hub" else None)
    with staging(out) as tmp:
        save_model(tmp, model, tokenizer)
        write_record(tmp, StageRecord(
            stage="base", recipe=ctx.recipe, fingerprint=fp, parent=source.label, base_model=base_model,
            config={"model": cfg.model, "source_kind": source.kind},
            metrics={"params": models.count_params(model)},
            summary=f"The unmodified source model `{cfg.model}`, saved as safetensors"
            + (" (dequantized from GGUF)." if source.gguf_file else "."),
            seconds=round(time.time() - started, 1),
        ))
    return out
