"""Load: materialise the source model (Hub id, folder, GGUF, alias) as a standard model folder `base/`."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from pydoc_data.topics import topics

from pipeline import data, models, source_check
from pipeline.context import Context, up_to_date
from pipeline.errors import StageError
from pipeline.folders import save_model, staging, write_record
from pipeline.records import StageRecord, fingerprint

log = logging.getLogger("pipeline")

# Hub ids for offline aliases, so cards point at the real upstream model.
ALIAS_HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}


@dataclass
class LoadConfig:
    model: str  # the recipe's `model`
    tokenizer: str | None = None  # the recipe's `tokenizer`
    check_source: bool = True  # the recipe's `check_source`
    text_only: bool = False  # the recipe's `text_only`


def stage_fingerprint(cfg: LoadConfig, ctx: Context, source: models.Source | None = None) -> str:
    """The base folder's fingerprint: the source as it is now (a local file's size and modification time)."""
    source = source or models.resolve(cfg.model, own_tokenizer=cfg.tokenizer is None)
    stamp = None
    if source.kind != "hub":
        path = Path(source.path) / (source.gguf_file or "config.json")
        stamp = (path.stat().st_size, int(path.stat().st_mtime))
    parts = ["load", cfg.model, stamp, ctx.trust_remote_code] + (["text_only"] if cfg.text_only else [])
    if cfg.tokenizer is not None:  # (only then: the folders of runs made before the key keep their fingerprint)
        named = models.tokenizer_source(cfg.tokenizer)
        parts.append([cfg.tokenizer, *((f.name, f.stat().st_size, int(f.stat().st_mtime))
                                       for f in sorted(Path(named.path).glob("tokenizer*")) if named.kind != "hub")])
    return fingerprint(*parts)


def run(cfg: LoadConfig, ctx: Context) -> Path:
    source = models.resolve(cfg.model, own_tokenizer=cfg.tokenizer is None)
    named = models.tokenizer_source(cfg.tokenizer) if cfg.tokenizer is not None else None
    out = ctx.run_dir / "base"
    fp = stage_fingerprint(cfg, ctx, source)
    if up_to_date(ctx, "load", out, fp):
        return out
    started = time.time()
    log.info("load: %s (%s)", source.label, source.kind)
    model = models.load_model(source, trust_remote_code=ctx.trust_remote_code, text_only=cfg.text_only)
    composite = models.composite(model.config)  # (a Hub id: validation could not read its config offline)
    if composite and not cfg.text_only:
        raise StageError(f"load: {models.text_only_refusal(cfg.model, composite)}")
    if composite:
        full = models.count_params(model)
        model = models.text_model(model)
        log.info("load: text_only: the %s language model alone (%d of %d parameters; the rest dropped)",
                 model.config.model_type, models.count_params(model), full)
    tokenizer = models.load_tokenizer(source, trust_remote_code=ctx.trust_remote_code, named=named)
    findings, problems = source_check.check(source, tokenizer, _check_text(ctx), model)
    if problems and cfg.check_source:
        raise StageError(f"load: '{source.label}' does not look like the model it was trained as: "
                         + "; ".join(problems) + ". Every number the run reported would be wrong. If you are sure it "
                         "is right, set check_source: false (the report will say so)")
    if problems:
        log.warning("load: check_source is false; running a suspect model: %s", "; ".join(problems))
        findings["problems"] = problems
    base_model = ALIAS_HUB_IDS.get(cfg.model) or (cfg.model if source.kind == "hub" else None)
    with staging(out) as tmp:
        save_model(tmp, model, tokenizer)
        write_record(tmp, StageRecord(
            stage="base", recipe=ctx.recipe, fingerprint=fp, parent=source.label, base_model=base_model,
            config={"model": cfg.model, "source_kind": source.kind,
                    **({"tokenizer": cfg.tokenizer} if named is not None else {}),
                    **({"text_only": composite} if composite else {})},
            metrics={"params": models.count_params(model)},
            summary=(f"The language model of `{cfg.model}` alone (text_only: the source is {composite}), "
                     "unmodified, saved as safetensors" if composite
                     else f"The unmodified source model `{cfg.model}`, saved as safetensors")
            + (" (dequantized from GGUF)" if source.gguf_file else "")
            + (f", with the tokenizer of `{cfg.tokenizer}`." if named is not None else "."),
            seconds=round(time.time() - started, 1),
            details={"source_check": findings},
        ))
    return out


def _check_text(ctx: Context) -> str:
    """Text for the source check: the recipe's validation documents (the model's language; the model is scored
    on a bounded sample of them), else the stdlib corpus; a data problem is the data-reading stage's to report,
    not the load stage's."""
    try:
        if ctx.data.format == "text":
            rows = data.load_splits(ctx.data, ctx.seed)["validation"][ctx.data.text_column]
            text = "\n".join(t for t in rows if isinstance(t, str))
            if len(text.split()) >= 200:
                return text
    except StageError:
        pass
    return "\n".join(topics[k] for k in sorted(topics))
