"""Quantize: try each candidate method, keep the best one whose perplexity stays within budget.

Every candidate is converted, saved, reloaded from its folder and scored on the validation split
with the evaluate stage's sliding windows, next to the unquantized input. Candidates over the
`max_ppl_increase` budget are rejected; `prefer` picks the winner among the rest, which becomes the
stage output. A candidate that cannot run here or fails to convert is reported and the others go on.
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from pipeline import data, errors, formats, models, qat
from pipeline import quant_backends as backends
from pipeline.context import Context, begin
from pipeline.errors import StageError
from pipeline.folders import save_model, staging, write_record
from pipeline.metrics import perplexity, speed
from pipeline.quant_backends import Candidate
from pipeline.records import origin
from pipeline.stages.evaluate import DEFAULT_PROMPTS, EvaluateConfig

log = logging.getLogger("pipeline")


@dataclass
class QuantizeConfig:
    enabled: bool = True  # run this stage
    # folder to quantize; `auto` = the previous enabled stage's output; a PEFT adapter folder is merged first
    input: str = "auto"
    # methods to try, each a mapping: `method`, its options (below), and an optional `name` to try one method twice
    candidates: list[Candidate] = field(default_factory=lambda: [Candidate("bnb-int8")])
    # percent perplexity a candidate may add over the unquantized input (on the fine-tuned SmolLM2-135M OpenVINO
    # int8 costs about +1%, data-free int4 +21% to +31%, data-aware int4 +5% to +12%: see below)
    max_ppl_increase: float = 3.0
    # winner among candidates within budget: `size` (smallest on disk), `speed` (fastest greedy generation),
    # `quality` (lowest perplexity)
    prefer: Literal["size", "speed", "quality"] = "size"
    # gate perplexity windows; the defaults are evaluate's: keep them equal to the `evaluate` section so gate and
    # report agree
    context: int = EvaluateConfig.context
    stride: int = EvaluateConfig.stride  # ditto
    max_tokens: int | None = EvaluateConfig.max_tokens  # ditto
    # greedy tokens generated per prompt (evaluate's default prompts) to time each candidate; 0 = no timing
    speed_tokens: int = 16

    def check(self) -> list[str]:
        problems = EvaluateConfig(context=self.context, stride=self.stride, max_tokens=self.max_tokens).check()
        if not self.candidates:
            problems.append("candidates: list at least one method, e.g. [{method: bnb-int8}]")
        labels = [c.label for c in self.candidates]
        for label in sorted({x for x in labels if labels.count(x) > 1}):
            problems.append(f"candidates: '{label}' appears twice; give each a distinct `name`")
        if self.max_ppl_increase < 0:
            problems.append(f"max_ppl_increase: {self.max_ppl_increase} must be a non-negative percentage")
        if self.speed_tokens < 0:
            problems.append(f"speed_tokens: {self.speed_tokens} must be non-negative")
        if self.prefer == "speed" and self.speed_tokens == 0:
            problems.append("prefer: speed needs speed_tokens > 0 to time the candidates")
        return problems


def full_precision(folder: Path, out: Path, trust_remote_code: bool = False) -> Path:
    """The input as a plain model folder: a PEFT adapter is merged into its base in float32 first,
    so that quantization rounds the merged weights once."""
    if not (folder / "adapter_config.json").is_file():
        return folder
    from peft import AutoPeftModelForCausalLM, PeftConfig

    log.info("quantize: %s holds a PEFT adapter; merging it into its base model in float32", folder)
    base = PeftConfig.from_pretrained(folder).base_model_name_or_path
    try:
        model = AutoPeftModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True,
                                                         trust_remote_code=trust_remote_code).merge_and_unload()
    except (OSError, ValueError) as err:
        raise StageError(
            f"quantize.input: the adapter in '{folder}' adapts '{base}', which could not be loaded ({err}). "
            "Point quantize.input at the stage folder that holds the merged weights (e.g. runs/<recipe>/finetune)."
        ) from err
    tok_source = folder if (folder / "tokenizer_config.json").is_file() else Path(folder).parent
    if not (tok_source / "tokenizer_config.json").is_file():  # an adapter saved on its own: the base's
        tok_source = base
    tokenizer = models.load_tokenizer(models.Source("folder", str(tok_source)))
    save_model(out, model, tokenizer)
    return out


def measure(model, tokenizer, ids: list[int], cfg: QuantizeConfig) -> dict:
    """Gate perplexity (the evaluate stage's windows) and, if asked, prefill/generate speed."""
    started = time.perf_counter()
    ppl = perplexity(model, ids, cfg.context, cfg.stride, cfg.max_tokens, batch_size=EvaluateConfig.batch_size)
    out = {"perplexity": ppl["perplexity"], "scored_tokens": ppl["scored_tokens"],
           "eval_tok_s": round(ppl["scored_tokens"] / (time.perf_counter() - started), 1)}
    if cfg.speed_tokens:  # the evaluate stage's prompts and prefill length, one timed run after a warm-up
        timed = speed(model, tokenizer, DEFAULT_PROMPTS, EvaluateConfig.prefill_tokens, cfg.speed_tokens, 1)
        out.update(prefill_tok_s=timed["prefill_tok_s"], gen_tok_s=timed["gen_tok_s"])
    return out


def try_candidate(cand: Candidate, source: Path, folder: Path, tokenizer, ids: list[int], cfg: QuantizeConfig,
                  device: torch.device, ctx: Context, calibration: backends.Calibration, name: str | None = None,
                  lineage_origin: str | None = None) -> dict:
    """Convert, save, reload and score one candidate; failures become a row, never an exception."""
    options = {k: v for k, v in dataclasses.asdict(cand).items() if v is not None and k not in ("method", "name")}
    row = {"name": cand.label, "method": cand.method, "backend": cand.backend, "bits": cand.bits,
           "options": options, "description": backends.describe(cand)}
    if cand.data_aware:
        sequences, tokens = cand.calibration_shape(calibration.block_size)
        row["calibration"] = {"split": "train", "sequences": sequences, "tokens_each": tokens}
    reason = backends.unavailable(cand, device)
    if reason:
        log.warning("quantize: %s cannot run here: %s", cand.label, reason)
        return {**row, "status": "unavailable", "error": reason}
    log.info("quantize: trying %s: %s", cand.label, row["description"])
    started = time.time()
    try:
        model = backends.quantize(cand, source, device, ctx.trust_remote_code, calibration, name, lineage_origin)
        backends.save(model, folder, cand)
        tokenizer.save_pretrained(folder)
        del model
        model, _ = formats.load_folder(folder, device_map=str(device))  # score exactly what is shipped
        row.update(measure(model, tokenizer, ids, cfg))
    except Exception as err:  # noqa: BLE001 -- a broken candidate is reported, the others still run
        if errors.is_disk_full(err):  # not the candidate's fault: no other one will fit either
            raise
        log.warning("quantize: %s failed: %s", cand.label, err)
        message = " ".join(str(err).strip().splitlines()[:2])[:300]
        return {**row, "status": "failed", "error": f"{type(err).__name__}: {message}"}
    row.update(disk_mb=round(formats.disk_size(folder) / 2**20, 2), seconds=round(time.time() - started, 1))
    return row


def gate(rows: list[dict], reference: dict, cfg: QuantizeConfig) -> dict | None:
    """Mark each measured row passed / over budget against `reference`; return the preferred passing row."""
    for row in rows:
        if "perplexity" not in row:
            continue
        row["ppl_increase_pct"] = round(100 * (row["perplexity"] / reference["perplexity"] - 1), 3)
        row["size_ratio"] = round(row["disk_mb"] / reference["disk_mb"], 4)
        if reference.get("gen_tok_s") and row.get("gen_tok_s"):
            row["speedup"] = round(row["gen_tok_s"] / reference["gen_tok_s"], 2)
        row["status"] = "passed" if row["ppl_increase_pct"] <= cfg.max_ppl_increase else "over budget"
    passed = [r for r in rows if r["status"] == "passed"]
    order = {
        "size": lambda r: (r["disk_mb"], r["perplexity"]),
        "speed": lambda r: (-(r.get("gen_tok_s") or 0), r["perplexity"]),
        "quality": lambda r: (r["perplexity"], r["disk_mb"]),
    }[cfg.prefer]
    return min(passed, key=order) if passed else None


def table(reference: dict, rows: list[dict], winner: dict | None) -> str:
    def num(row, key, fmt):
        return fmt.format(row[key]) if row.get(key) is not None else "–"

    lines = ["| candidate | method | bits | status | perplexity | Δ ppl | disk MB | size | gen tok/s |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| input | unquantized | – | reference | {num(reference, 'perplexity', '{:.3f}')} | – | "
             f"{num(reference, 'disk_mb', '{:.1f}')} | 100% | {num(reference, 'gen_tok_s', '{:.1f}')} |"]
    for r in rows:
        status = "**chosen**" if r is winner else r["status"]
        if r.get("error"):
            status += f": {r['error']}"
        lines.append(f"| {r['name']} | {r['method']} | {r['bits']} | {status} | {num(r, 'perplexity', '{:.3f}')} | "
                     f"{num(r, 'ppl_increase_pct', '{:+.2f}%')} | {num(r, 'disk_mb', '{:.1f}')} | "
                     f"{num(r, 'size_ratio', '{:.0%}')} | {num(r, 'gen_tok_s', '{:.1f}')} |")
    return "\n".join(lines)


def run(cfg: QuantizeConfig, ctx: Context) -> Path:
    stage = begin(ctx, "quantize", cfg)
    if stage is None:
        return ctx.run_dir / "quantize"
    device = models.pick_device()
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    for stale in ctx.run_dir.glob(".quantize-candidates-*"):  # left by a killed run; never consumed
        shutil.rmtree(stale, ignore_errors=True)
    # Candidate folders live next to the run (same disk, so the winner is moved, not copied) and are
    # removed whatever happens.
    with tempfile.TemporaryDirectory(prefix=".quantize-candidates-", dir=ctx.run_dir) as work:
        work = Path(work)
        source = full_precision(Path(ctx.inputs["quantize"]), work / "merged", ctx.trust_remote_code)
        # what formats name the model by (the GGUF file) and the source its lineage was loaded from (whose GGUF
        # pre-tokenizer a GGUF export keeps)
        name, lineage_origin = stage.parent.recipe or Path(ctx.inputs["quantize"]).name, origin(ctx.inputs["quantize"])
        model, tokenizer = formats.load_folder(source, device_map=str(device))
        ids = data.eval_stream(data.prepare(ctx.data, tokenizer, ctx.seed)["validation"])
        params = models.count_params(model)
        reference = {"name": "input", "disk_mb": round(formats.disk_size(source) / 2**20, 2),
                     **measure(model, tokenizer, ids, cfg)}
        del model
        log.info("quantize: input perplexity %.3f on %d tokens", reference["perplexity"], reference["scored_tokens"])
        # Data-aware candidates calibrate on the training split (the gate scores the validation split); the
        # float export, the collected inputs and nncf's statistics are shared by candidates that ask alike.
        calibration = backends.Calibration(
            work, lambda n, tokens: data.calibration_blocks(ctx.data, tokenizer, ctx.seed, n,
                                                            "quantize calibration", block_size=tokens),
            ctx.data.block_size)
        rows, folders = [], {}
        for i, cand in enumerate(cfg.candidates):
            folders[cand.label] = work / f"candidate-{i}"
            rows.append(try_candidate(cand, source, folders[cand.label], tokenizer, ids, cfg, device, ctx,
                                      calibration, name, lineage_origin))
        winner = gate(rows, reference, cfg)
        scores = table(reference, rows, winner)
        log.info("quantize: candidates (budget +%s%% perplexity, prefer %s):\n%s", cfg.max_ppl_increase, cfg.prefer,
                 scores)
        if winner is None and not any(r["status"] == "over budget" for r in rows):
            raise StageError(  # nothing was even scored: the budget is not what to change
                f"quantize: no candidate could be made (every one is unavailable or failed; the status column "
                f"says why):\n{scores}\nFix what it names, or add a candidate this model and machine support "
                "(bnb-int8 or openvino-int8)."
            )
        if winner is None:
            raise StageError(
                f"quantize: no candidate stayed within max_ppl_increase={cfg.max_ppl_increase}% of the input's "
                f"perplexity {reference['perplexity']:.3f}:\n{scores}\n"
                "Raise quantize.max_ppl_increase, or add a gentler candidate (bnb-int8 or openvino-int8)."
            )
        cand = next(c for c in cfg.candidates if c.label == winner["name"])
        qat_grid = _qat_check(stage.parent.qat, cand)
        with staging(stage.out) as tmp:
            for item in folders[cand.label].iterdir():
                shutil.move(str(item), str(tmp / item.name))
            write_record(tmp, stage.record(
                ctx,
                metrics={"params": params, "method": cand.method, "bits": cand.bits,
                         "input_mb": reference["disk_mb"], "disk_mb": winner["disk_mb"],
                         "size_ratio": winner["size_ratio"], "perplexity": winner["perplexity"],
                         "input_perplexity": reference["perplexity"], "ppl_increase_pct": winner["ppl_increase_pct"],
                         "gen_tok_s": winner.get("gen_tok_s"), "input_gen_tok_s": reference.get("gen_tok_s")},
                chosen=cand.label,
                backend_versions=backends.versions(cand),
                reference=reference,
                candidates=rows,
                gate={"max_ppl_increase": cfg.max_ppl_increase, "prefer": cfg.prefer, "context": cfg.context,
                      "stride": cfg.stride, "scored_tokens": reference["scored_tokens"], "device": str(device),
                      "speed": {"prompts": DEFAULT_PROMPTS, "prefill_tokens": EvaluateConfig.prefill_tokens,
                                "new_tokens": cfg.speed_tokens, "repeats": 1}},
                qat=qat_grid,
                tags=backends.tags(cand),
                summary=summary(cand, winner, reference, rows, cfg, scores),
            ))
    return stage.out


def _qat_check(trained: dict | None, cand: Candidate) -> dict | None:
    """Whether the input was trained (finetune.qat) for the grid the chosen candidate rounds to; warns if not."""
    if not trained:
        return None
    shipped = backends.grid(cand)
    # the record keeps the training schedule beside the grid; compare the grid's own keys
    matches = shipped == {key: trained.get(key) for key in qat.QatSettings().grid}
    if cand.bits == 4 and not matches:
        log.warning("quantize: the input was trained for %s (finetune.qat) but %s rounds to %s; set the candidate's "
                    "group_size/sym (or finetune.qat) so the grids agree", qat.describe(trained), cand.label,
                    qat.describe(shipped) if shipped else "a float code book")
    return {"trained_for": trained, "shipped": shipped, "matches": matches}


def summary(cand: Candidate, winner: dict, reference: dict, rows: list[dict], cfg: QuantizeConfig,
            scores: str) -> str:
    passed = sum(r["status"] == "passed" for r in rows)
    return (
        f"**{cand.label}**: {winner['description']}. {reference['disk_mb']:.1f} MB → {winner['disk_mb']:.1f} MB "
        f"on disk ({winner['size_ratio']:.0%}), perplexity {reference['perplexity']:.3f} → "
        f"{winner['perplexity']:.3f} ({winner['ppl_increase_pct']:+.2f}%). Chosen for {cfg.prefer} among "
        f"{passed} of {len(rows)} candidates within the +{cfg.max_ppl_increase}% perplexity budget.\n\n"
        f"{scores}\n\nPerplexity: validation split, context {cfg.context}, stride {cfg.stride}, "
        f"{reference['scored_tokens']} tokens. Generation speed: greedy, {cfg.speed_tokens} new tokens for each of "
        f"{len(DEFAULT_PROMPTS)} prompts, one timed run (noisy on a shared machine)."
    )
